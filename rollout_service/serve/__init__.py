"""The deployment: engine replicas (replica.py) behind an ingress (ingress.py: the front ends, the
backend in backend.py) that reaches them only through the replica set (replicas.py: in this
process for the single-process server; handle.py: Ray Serve's handle); pushes to every replica or
none (push.py); shared state in Redis or embedded (coordinator.py); session-affine routing
(routing.py) and split batches (split.py); on Ray Serve, the application and its Serve config
(app.py) and `rollout-service serve` (runner.py)."""
