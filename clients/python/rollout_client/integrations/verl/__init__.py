"""verl plugin: rollout-service as verl's rollout, chosen by one config line.

    VERL_USE_EXTERNAL_MODULES=rollout_client.integrations.verl   (or the `verl.plugins` entry
                                                                 point, loaded by default)
    actor_rollout_ref.rollout.name=rollout_service
    +actor_rollout_ref.rollout.custom={address: "svc:50051"}    (or ROLLOUT_SERVICE_ADDRESS)

Importing this package registers the name `rollout_service` with both of verl's registries:
- driver side (`RolloutReplicaRegistry`): `server.RolloutServiceReplica`, whose server is a CPU
  Ray actor (`server.RolloutServiceServer`) that verl's agent loops call for every turn; it fills
  in `max_tokens` as verl's vLLM server does, keeps a trajectory's turns on one service replica,
  and returns each sample's `weight_version` (and `global_steps`) in `TokenOutput.extra_fields`;
- trainer side (`_ROLLOUT_REGISTRY`): `rollout.RolloutServiceRollout`, whose `update_weights`
  pushes from rank 0 while the other ranks step their gathers in lockstep: one service version
  per sync, labelled with verl's `global_steps`.

`agent_loop.RolloutServiceServerManager` runs verl's agent loops (ToolAgentLoop, ...) against
the service directly, without verl's trainer, replicas or Ray.

verl imports this module in every process that imports verl with the variable set (its Ray
workers too, when the variable reaches them); registering twice is harmless.
"""

from __future__ import annotations

from verl.workers.rollout.base import _ROLLOUT_REGISTRY
from verl.workers.rollout.replica import RolloutReplicaRegistry

from rollout_client.integrations.connection import Connection
from rollout_client.integrations.verl.agent_loop import RolloutServiceServerManager
from rollout_client.integrations.verl.rollout import RolloutServiceRollout
from rollout_client.integrations.verl.server import RolloutServiceReplica, RolloutServiceServer

NAME = "rollout_service"

_ROLLOUT_REGISTRY[(NAME, "async")] = f"{RolloutServiceRollout.__module__}.{RolloutServiceRollout.__name__}"
RolloutReplicaRegistry.register(NAME, lambda: RolloutServiceReplica)

__all__ = [
    "NAME", "Connection", "RolloutServiceReplica", "RolloutServiceRollout", "RolloutServiceServer", "RolloutServiceServerManager",
]
