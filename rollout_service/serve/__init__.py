"""The Ray Serve deployment: engine replicas (replica.py) behind an ingress (ingress.py) that holds
only their handle; pushes to every replica or none (push.py); shared state in Redis or embedded
(coordinator.py); session-affine routing (routing.py); the application and its Serve config
(app.py); `rollout-service serve` (runner.py)."""
