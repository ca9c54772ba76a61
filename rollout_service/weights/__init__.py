"""Weight pushes: the manifest and its checks, chunk assembly, conversion to the engine's format,
the weight store of committed versions, and the record of where each current tensor lives.

A pushed tensor's path: api/ hands chunks to `session.PushSession`; each finished tensor is checked
and cast to the engine dtype (`engine_format.store_converter`) and staged by `staging.ShardWriter`
into the weight store's spool (`versions.VersionStore`), and requantized as it arrives for an
int8/fp8 engine (`engine_format.requantizer`). The push protocol (serve/push.py, for Ray Serve and
the single-process server alike) hands each part in the engines' format to every replica as it is
written (serve/fanout.py), which stages it (`service.WeightService.spool`); then it writes the
version's manifest (commit), and has every replica load it: the service asks `store.WeightSet`
for the load plan and `engine.RolloutEngine.apply_weights` loads it (engine/worker_ext.py).
"""
