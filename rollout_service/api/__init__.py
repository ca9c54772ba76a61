"""Network front ends: gRPC (rollout.v1.RolloutService) and HTTP (FastAPI), both thin over the engine."""
