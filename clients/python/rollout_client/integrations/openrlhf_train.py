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
  between fails the sync with FAILED_PRECONDITION), and, when it streams (the service on another
  host), goes as a delta against the previous one (rank 0 keeps a bf16 copy of the model in host
  memory for that); through shared memory on the same host it goes whole. The actor also syncs once
  when its model is loaded, so the first rollout is of the weights it trains.

The actor, critic, reference and reward models still need OpenRLHF's GPUs: its actor module
imports DeepSpeed and flash-attn at import time, and flash-attn builds only with CUDA, so the
launcher as a whole runs on a GPU machine only. `service_engines` and `push_actor` need neither
and are tested on CPU (tests/clients/test_openrlhf_adapter.py).
"""

from __future__ import annotations

import argparse
import functools
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
    engine = ray.remote(_ServiceEngine).options(num_cpus=0)
    return [
        engine.remote(address, agent_func_path=agent_func_path, remote_rm_url=remote_rm_url, **options)
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


def push_actor(model: Any, client: RolloutClient | None, group: Any, *, label: str,
               expected_version: int | None, delta: bool | None = None) -> PushResult:
    """One weight sync from OpenRLHF's actor (`actor.model.module`), called on every actor rank
    (`client`: rank 0's, kept across syncs for its delta base; None on the others): under ZeRO-3
    each parameter is gathered by all ranks in turn while rank 0 streams it. Every rank returns
    rank 0's PushResult, or raises (see `lockstep`)."""

    def push(weights: Iterator) -> PushResult:
        return client.push_weights(weights, label=label, expected_version=expected_version, progress=False, delta=delta)

    return lockstep.push_in_lockstep(gathered_parameters(model), push, group)


def push_client(connection: Connection) -> RolloutClient | None:
    """Rank 0's client for the syncs (None on the other ranks, which push nothing)."""
    return connection.push_client() if lockstep.rank() == 0 else None


def service_policy_actor(connection: Connection) -> Any:
    """OpenRLHF's PolicyModelActor, syncing into the service at `connection` (resolved on the
    driver: a Ray worker on another node has not its environment). Imports OpenRLHF's actor: GPU only."""
    import ray
    from openrlhf.trainer.ray.ppo_actor import PolicyModelActor

    class ServicePolicyModelActor(PolicyModelActor.__ray_metadata__.modified_class):
        def init_model_from_pretrained(self, strategy: Any, pretrain: str, max_steps: int | None = None, vllm_engines: Any = None):
            # No engines for the trainer: it then joins no NCCL group. The sync is ours (below).
            super().init_model_from_pretrained(strategy, pretrain, max_steps, vllm_engines=None)
            self.vllm_engines = vllm_engines
            self._group = lockstep.gloo_group()  # every actor rank reaches this line together
            self._client = push_client(connection)
            self._pushes = 0
            self._last_push: PushResult | None = None
            self.broadcast_to_vllm()  # the first rollout is of the weights this run trains

        def broadcast_to_vllm(self) -> None:
            self._last_push = push_actor(
                self.trainer.actor.model.module, self._client, self._group, label=f"openrlhf sync {self._pushes}",
                expected_version=self._last_push.version if self._last_push is not None else None,
            )
            self._pushes += 1

    return ray.remote(num_gpus=1)(ServicePolicyModelActor)


def _check_flags(argv: list[str]) -> None:
    """The flags that cannot work with the engines in the service, refused before anything starts
    (parsed as OpenRLHF parses them; the rest are OpenRLHF's to check)."""
    parser = argparse.ArgumentParser(allow_abbrev=False, add_help=False)
    parser.add_argument("--vllm.num_engines", dest="num_engines", type=int, default=None)
    parser.add_argument("--train.colocate_all", dest="colocate_all", action="store_true")
    parser.add_argument("--ds.tensor_parallel_size", dest="ds_tp", type=int, default=1)
    parser.add_argument("--ds.lora.rank", dest="lora_rank", type=int, default=0)
    parser.add_argument("--ds.load_in_4bit", dest="load_in_4bit", action="store_true")
    args, _ = parser.parse_known_args(argv)
    problems = {
        "--vllm.num_engines N (N >= 1) is required: without engines OpenRLHF generates with the actor model itself":
            not args.num_engines or args.num_engines < 1,
        "--train.colocate_all: the engines run in rollout-service, not on the trainer's GPUs; drop the flag": args.colocate_all,
        "--ds.tensor_parallel_size > 1: the launcher gathers ZeRO-3 shards only, not DeepSpeed tensor-parallel ones": args.ds_tp > 1,
        "--ds.lora.rank > 0: a LoRA actor's parameters are adapters the service cannot load; train full weights": args.lora_rank > 0,
        "--ds.load_in_4bit: a 4-bit actor's parameters are not bf16 weights the service can load": args.load_in_4bit,
    }
    refused = [message for message, bad in problems.items() if bad]
    if refused:
        raise SystemExit("rollout-service launcher: " + "; ".join(refused))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _check_flags(argv)
    connection = Connection.from_env()  # a missing address fails here, not inside a Ray actor
    import openrlhf.trainer.ray as ray_pkg
    import openrlhf.trainer.ray.ppo_actor as ppo_actor

    # The script imports both names from these modules when it runs, so it gets ours.
    ray_pkg.create_vllm_engines = functools.partial(service_engines, connection=connection)
    ppo_actor.PolicyModelActor = service_policy_actor(connection)
    sys.argv = [SCRIPT, *argv]
    runpy.run_module(SCRIPT, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
