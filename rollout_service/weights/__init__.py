"""Weight pushes: the manifest and its checks, chunk assembly, conversion to the engine's format,
the weight store of committed versions, and the record of where each current tensor lives.

A pushed tensor's path: api/ hands chunks to `session.PushSession`; each finished tensor is checked
and cast to the engine dtype (`convert.store_converter`) and staged by `staging.Spool` into the
weight store's incoming/ (`versions.VersionStore`). The push protocol -- `local.LocalPush` in the
single-process server, serve/push.py on Ray Serve -- then has `service.WeightService` requantize it
for an int8/fp8 engine (prepare), writes the version's manifest (commit), and loads it: the
service asks `store.WeightSet` for the load plan and `engine.RolloutEngine.apply_weights` loads it
(engine/worker_ext.py).
"""
