"""OpenRLHF's own PPO/GRPO training with rollout-service as its rollout engines.

    ROLLOUT_SERVICE_ADDRESS=svc:50051 ROLLOUT_SERVICE_API_KEY=... \\
    python -m rollout_client.integrations.openrlhf_train --vllm.num_engines 4 <openrlhf.cli.train_ppo_ray flags>

It runs OpenRLHF 0.11.2's `openrlhf.cli.train_ppo_ray` unchanged (its flags, checks and `train()`),
with two of its parts replaced before the script runs:
- `create_vllm_engines` → `service_engines`: `--vllm.num_engines` CPU Ray actors, each a
  `RolloutServiceEngine` (the OpenRLHF adapter), reserving no GPUs; OpenRLHF's samples generator
  balances prompts over them and the service's replicas generate;
- `PolicyModelActor` → a subclass whose trainer joins no NCCL group (`_init_vllm_sync_group`
  is never called: it is given no engines) and whose `broadcast_to_vllm` is one PushWeights:
  `push_actor`, on every actor rank, rank 0 streaming while the others step their ZeRO-3 gathers.
  Each sync makes one service version, fenced on the previous one (a push by anyone else in
  between fails the sync with FAILED_PRECONDITION).

The actor, critic, reference and reward models still need OpenRLHF's GPUs: its actor module
imports DeepSpeed and flash-attn at import time, and flash-attn builds only with CUDA, so the
launcher as a whole runs on a GPU machine only. `service_engines` and `push_actor` need neither
and are tested on CPU (tests/clients/test_openrlhf_launcher.py).
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Iterator
from typing import Any

from rollout_client.client import RolloutClient
from rollout_client.integrations import lockstep
from rollout_client.integrations.connection import Connection
from rollout_client.integrations.openrlhf import RolloutServiceEngine, gathered_parameters
from rollout_client.push import PushResult

SCRIPT = "openrlhf.cli.train_ppo_ray"


def service_engines(num_engines: int, *vllm_args: Any, agent_func_path: str | None = None,
                    remote_rm_url: str | list[str] | None = None, connection: Connection | None = None,
                    **vllm_kwargs: Any) -> list:
    """In place of `openrlhf.trainer.ray.create_vllm_engines` (same call): `num_engines` engine
    actors on the service from the environment (`Connection.from_env`). The vLLM arguments (model,
    tensor parallel size, GPU memory, sleep...) are the service's business and ignored here; the
    agent function and reward URL are OpenRLHF's, used by each engine's agent executor."""
    import ray

    connection = connection or Connection.from_env()
    options = connection.client_options()
    address = options.pop("address")
    return [
        ray.remote(_ServiceEngine).options(num_cpus=0).remote(
            address, agent_func_path=agent_func_path, remote_rm_url=remote_rm_url, **options
        )
        for _ in range(num_engines)
    ]


class _ServiceEngine(RolloutServiceEngine):
    """A RolloutServiceEngine whose agent executor is chosen as OpenRLHF's RolloutRayActor chooses
    it: the user's `AgentExecutor` from `--train.agent_func_path`, else single-turn with the reward."""

    def __init__(self, address: str, *, agent_func_path: str | None, remote_rm_url: Any, **options: Any):
        executor = None
        if agent_func_path:
            from openrlhf.trainer.ray.vllm_engine import _load_agent_executor

            executor = _load_agent_executor(agent_func_path)
        super().__init__(address, remote_rm_url=remote_rm_url, executor=executor, **options)


def push_actor(model: Any, connection: Connection, group: Any, *, label: str,
               expected_version: int | None, bucket_bytes: int | None = None) -> PushResult:
    """One weight sync from OpenRLHF's actor (`actor.model.module`), called on every actor rank:
    under ZeRO-3 each parameter is gathered by all ranks in turn while rank 0 streams it. Every
    rank returns rank 0's PushResult, or raises (see `lockstep`)."""

    def push(weights: Iterator) -> PushResult:
        with RolloutClient(**{**connection.client_options(), "timeout": None}) as client:
            options = {} if bucket_bytes is None else {"bucket_bytes": bucket_bytes}
            return client.push_weights(weights, label=label, expected_version=expected_version, progress=False, **options)

    return lockstep.push_in_lockstep(gathered_parameters(model), push, group)


def service_policy_actor() -> Any:
    """OpenRLHF's PolicyModelActor, syncing into the service (imports OpenRLHF's actor: GPU only)."""
    import ray
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

    class ServicePolicyModelActor(PolicyModelActor.__ray_metadata__.modified_class):
        def init_model_from_pretrained(self, strategy: Any, pretrain: str, max_steps: int | None = None, vllm_engines: Any = None):
            # No engines for the trainer: it then joins no NCCL group. The sync is ours (below).
            super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines=None)
            if strategy.args.ds.tensor_parallel_size > 1:
                raise ValueError("--ds.tensor_parallel_size > 1: the rollout-service launcher gathers ZeRO-3 shards only")
            self.vllm_engines = vllm_engines
            self._connection = Connection.from_env()
            self._group = lockstep.gloo_group()  # every actor rank reaches this line together
            self._pushes = 0
            self._last_push: PushResult | None = None

        def broadcast_to_vllm(self) -> None:
            self._pushes += 1
            self._last_push = push_actor(
                self.trainer.actor.model.module, self._connection, self._group, label=f"openrlhf sync {self._pushes}",
                expected_version=self._last_push.version if self._last_push is not None else None,
            )

    return ray.remote(num_gpus=1)(ServicePolicyModelActor)


def _refuse(argv: list[str]) -> None:
    """Flags that cannot work with the engines in the service, refused before anything starts."""
    if "--vllm.num_engines" not in argv:
        raise SystemExit("--vllm.num_engines N is required: without engines OpenRLHF generates with the actor model itself")
    if "--train.colocate_all" in argv:
        raise SystemExit("--train.colocate_all: the engines run in rollout-service, not on the trainer's GPUs; drop the flag")
    if "--vllm.enable_sleep" in argv:
        raise SystemExit("--vllm.enable_sleep: the service's engines are not on the trainer's GPUs; drop the flag")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _refuse(argv)
    Connection.from_env()  # a missing address fails here, not inside a Ray actor
    import openrlhf.trainer.ray as ray_pkg
    import openrlhf.trainer.ray.ppo_actor as ppo_actor

    # The script imports both names from these modules when it runs, so it gets ours.
    ray_pkg.create_vllm_engines = service_engines
    ppo_actor.PolicyModelActor = service_policy_actor()
    sys.argv = [SCRIPT, *argv]
    runpy.run_module(SCRIPT, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
