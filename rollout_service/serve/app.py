"""The Ray Serve application: `EngineReplica` x N (or autoscaled) behind one `Ingress`, each a thin
Serve deployment class over the code the single-process server runs too.

It is deployed from a Serve config (`app_config`), by `rollout-service serve` and by `serve deploy
deploy/serve.yaml` alike: `app_builder(args)` builds it from ServerConfig's fields, and the replica
count / autoscaling sit in the config's `deployments:` entry. Serve applies a change of those alone
as a lightweight update (replicas added or removed, none restarted); the builder's arguments carry
no scaling field, so scaling never changes them.
"""

from __future__ import annotations

import contextlib
import os

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from rollout_service import faults
from rollout_service.api.access import Access
from rollout_service.config import ServerConfig
from rollout_service.serve.handle import ServeReplicas
from rollout_service.serve.ingress import Ingress
from rollout_service.serve.replica import EngineReplica
from rollout_service.tools.machine import usable_cores
from rollout_service.weights.versions import open_store

APP_NAME = "rollout"
ENGINE_DEPLOYMENT = "EngineReplica"
# Generate calls in flight per replica before Serve queues them: high, because the engine batches
# them (Serve's default of 5 would cap a replica at five concurrent batches).
MAX_ONGOING_PER_REPLICA = 1024
# Engines take 45-90 s to start; Serve replaces a replica whose health check fails this long.
HEALTH_CHECK_PERIOD_S = 10
HEALTH_CHECK_TIMEOUT_S = 60
# Serve logs every call by default, status and registry broadcasts included: too chatty.
_LOGGING = {"enable_access_log": False}
# Serve runs a replica's code on an event loop in a thread of its own, and a handle's router on a
# third loop: every call and every streamed item hops between them (futures chained across
# threads, the GIL handed over each time). Ray's throughput-optimized mode
# (RAY_SERVE_THROUGHPUT_OPTIMIZED) runs all three on one loop; these are its two loop settings.
# Our replica code blocks its loop nowhere (engine work is in vLLM's processes, file and CPU work
# in threads).
_ONE_LOOP = {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0", "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0"}


_SCALING_FIELDS = ("replicas", "autoscale", "target_ongoing_requests")


class ServedEngineReplica(EngineReplica):
    """The engine replica as a Serve deployment: its id and cores from Serve's replica context."""

    async def __init__(self, config: ServerConfig):
        context = serve.get_replica_context()
        ours = "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and not config.replica_gpus
        bind_cores(config, context.rank.local_rank)
        if ours:
            # The replica's own threads and the engine's processes it starts (vLLM's front end,
            # its scheduler) go to the cores left; vLLM's worker binds itself back onto the
            # replica's cores (VLLM_CPU_OMP_THREADS_BIND), where nothing else of ours then runs.
            keep_off_engine_cores(config)
        await self._start(config, context.replica_id.unique_id, open_store(config, shared=True))


class ServedIngress:
    """The ingress as a Serve deployment, holding only the engine replicas' handle."""

    async def __init__(self, config: ServerConfig, engines):
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ and not config.replica_gpus:  # else: not our binding
            keep_off_engine_cores(config)
        access = Access.from_config(config)
        self.ingress = await Ingress.start(config, ServeReplicas(engines), open_store(config, shared=True), access)

    async def endpoints(self) -> dict:
        return self.ingress.endpoints()

    async def check_health(self) -> None:
        """Serve's health check of the ingress itself (its servers run); replica health is separate."""

    async def __del__(self):
        await self.ingress.close()


def cores_per_replica(config: ServerConfig) -> float:
    """`replica_cpus`, or its default for this node (see the field): as `vllm serve` binds its
    engine to all cores but one, the replicas that may run here share all cores but one, which Ray's
    processes, the ingress and each engine's scheduler process run on."""
    if config.replica_cpus is not None:
        return config.replica_cpus
    if config.replica_gpus:
        return 1.0
    most = config.autoscale[1] if config.autoscale else config.replicas
    return float(max(1, (len(usable_cores()) - 1) // max(most, 1)))


def _bound_cores(config: ServerConfig) -> tuple[list[int], list[int]]:
    """(cores the replicas that may run on this node are bound to, the cores left)."""
    allowed, per = usable_cores(), max(1, round(cores_per_replica(config)))
    most = config.autoscale[1] if config.autoscale else config.replicas
    bound = sorted({allowed[(r * per + i) % len(allowed)] for r in range(most) for i in range(per)})
    return bound, [c for c in allowed if c not in bound]


def core_plan(config: ServerConfig) -> str:
    """The log line's account of this node's cores: what each replica is bound to, what is left."""
    if config.replica_gpus or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return f"{cores_per_replica(config):g} CPU(s) reserved per replica"
    bound, rest = _bound_cores(config)
    most = config.autoscale[1] if config.autoscale else config.replicas
    left = f"cores {','.join(map(str, rest))}" if rest else "the same cores (none left)"
    return (f"{most} replica(s) x {max(1, round(cores_per_replica(config)))} core(s) bound (cores "
            f"{','.join(map(str, bound))}) for the engines' model threads; the ingress, the replicas' front ends and "
            f"the engines' schedulers on {left}; Ray's own processes on any")


def keep_off_engine_cores(config: ServerConfig) -> None:
    """Run this process (the ingress, an engine replica's front end) on the cores no engine's
    model thread is bound to, where there are any: its per-token work would otherwise preempt a
    model thread mid-step."""
    _, rest = _bound_cores(config)
    if not rest:
        return
    # Every thread of the process (Ray's and gRPC's included): a thread's mask is its own.
    for tid in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            os.sched_setaffinity(int(tid), rest)


def bind_cores(config: ServerConfig, local_rank: int) -> None:
    """Give each CPU replica its own cores: vLLM's CPU worker binds its OpenMP threads to the
    cores in VLLM_CPU_OMP_THREADS_BIND, and without it every replica on a node lands on the same
    ones (measured: two replicas on one core were 1.5x slower than on two). The cores are taken
    from those this process may run on (taskset, a container's cpuset), never outside them."""
    if config.replica_gpus or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    allowed = usable_cores()
    per = max(1, min(len(allowed), round(cores_per_replica(config))))
    first = (local_rank * per) % len(allowed)
    cores = [allowed[(first + i) % len(allowed)] for i in range(per)]
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))


def _scaling(config: ServerConfig) -> dict:
    if config.autoscale is None:
        return {"num_replicas": config.replicas}
    low, high = config.autoscale
    return {
        "autoscaling_config": {
            "min_replicas": low,
            "initial_replicas": max(low, 1),
            "max_replicas": high,
            "target_ongoing_requests": config.target_ongoing_requests,
        }
    }


def _engine_env(config: ServerConfig) -> dict[str, str]:
    env = {"VLLM_CPU_KVCACHE_SPACE": str(config.kv_cache_gib), **_ONE_LOOP}
    # Settings given to the driver reach the replicas' processes too.
    # (Tests arm fault points, rollout_service/faults.py, through ROLLOUT_FAULT_FILE.)
    for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_LOGGING_LEVEL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", faults.ENV):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _ingress_options() -> dict:
    env = dict(_ONE_LOOP)
    if faults.ENV in os.environ:
        env[faults.ENV] = os.environ[faults.ENV]
    return {"num_cpus": 0, "runtime_env": {"env_vars": env}}


def build_app(config: ServerConfig) -> Application:
    # Resolved here, on the node that builds the app, so Ray's reservation and the replicas'
    # binding agree.
    config = config.model_copy(update={"replica_cpus": cores_per_replica(config)})
    engines = serve.deployment(
        ServedEngineReplica,
        name=ENGINE_DEPLOYMENT,
        ray_actor_options={
            "num_cpus": config.replica_cpus,
            "num_gpus": config.replica_gpus,
            "runtime_env": {"env_vars": _engine_env(config)},
        },
        max_ongoing_requests=MAX_ONGOING_PER_REPLICA,
        logging_config=_LOGGING,
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        request_router_config=RequestRouterConfig(
            request_router_class="rollout_service.serve.routing:SessionAffinityRouter"
        ),
        **_scaling(config),
    ).bind(config)
    ingress = serve.deployment(
        ServedIngress, name="Ingress", num_replicas=1, max_ongoing_requests=MAX_ONGOING_PER_REPLICA,
        ray_actor_options=_ingress_options(), logging_config=_LOGGING,
    )
    return ingress.bind(config, engines)


def app_builder(args: dict) -> Application:
    """For Serve config files: `import_path: rollout_service.serve.app:app_builder`, `args:` the
    ServerConfig fields (e.g. model, quantization, redis_url); scaling goes in `deployments:`."""
    return build_app(ServerConfig(**args))


def app_config(config: ServerConfig) -> dict:
    """The Serve application config (ServeApplicationSchema) that deploys `config`."""
    return {
        "name": APP_NAME,
        "import_path": "rollout_service.serve.app:app_builder",
        "route_prefix": None,
        "args": config.model_dump(mode="json", exclude=set(_SCALING_FIELDS)),
        "deployments": [{"name": ENGINE_DEPLOYMENT, **_scaling(config)}],
    }
