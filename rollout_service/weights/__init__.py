"""Weight pushes: the manifest and its checks, chunk assembly, conversion to the engine's format,
staging until the commit, and the record of where each current tensor lives.

A pushed tensor's path: api/ hands chunks to `session.PushSession`; each finished tensor is checked
and converted by `convert.to_engine_format` (requantized with quant/ when the engine runs int8/fp8)
and staged to disk by `staging.Spool`; on commit `service.WeightService` asks `store.WeightSet` for
the load plan and `engine.RolloutEngine.apply_weights` loads it (engine/worker_ext.py).
"""
