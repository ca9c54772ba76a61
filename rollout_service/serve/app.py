"""The Ray Serve application: `EngineReplica` x N (or autoscaled) behind one `Ingress`, each a thin
Serve deployment class over the code the single-process server runs too.

It is deployed from a Serve config (`app_config`), by `rollout-service serve` and by `serve deploy
deploy/serve.yaml` alike: `app_builder(args)` builds it from ServerConfig's fields, and the replica
count / autoscaling sit in the config's `deployments:` entry. Serve applies a change of those alone
as a lightweight update (replicas added or removed, none restarted); the builder's arguments carry
no scaling field, so scaling never changes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import ray
import ray.exceptions
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from rollout_service import faults
from rollout_service.api.access import Access
from rollout_service.config import ServerConfig
from rollout_service.serve.handle import ServeReplicas, SharedPart
from rollout_service.serve.ingress import Ingress
from rollout_service.serve.replica import EngineReplica
from rollout_service.tools.machine import usable_cores
from rollout_service.errors import ConfigError
from rollout_service.observe import logs, tracing
from rollout_service.weights.versions import VersionStore, is_url, open_store, store_root

log = logging.getLogger("rollout_service.replica")

APP_NAME = "rollout"
ENGINE_DEPLOYMENT = "EngineReplica"
# Generate calls in flight per replica before Serve queues them: high, because the engine batches
# them (Serve's default of 5 would cap a replica at five concurrent batches).
MAX_ONGOING_PER_REPLICA = 1024
# Engines take 45-90 s to start; Serve replaces a replica whose health check fails this long.
HEALTH_CHECK_PERIOD_S = 10
HEALTH_CHECK_TIMEOUT_S = 60
# Serve's LoggingConfig: its own lines in the encoding of ours (observe/logs.py); no access log
# (by default it logs every call, status and registry broadcasts included: too chatty).
SERVE_ENCODING = {"text": "TEXT", "json": "JSON"}
# Generate streams over Serve's inter-deployment gRPC (serve/handle.py), whose messages Ray caps at
# 4 MiB by default: a whole completion of long samples with top logprobs, or a large batch, is more.
# Read by Ray at import in each process: the replicas' servers and the ingress's channels alike.
SERVE_ENV = {"RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(2**31 - 1)}


_SCALING_FIELDS = ("replicas", "autoscale", "target_ongoing_requests")
HEAD_NODE = "node:__internal_head__"  # Ray's resource of the head node
# How long a replica waits for the ingress to make a new weight store directory.
STORE_WAIT_S = 120


class ServedEngineReplica(EngineReplica):
    """The engine replica as a Serve deployment: its id and cores from Serve's replica context."""

    async def __init__(self, config: ServerConfig):
        observe_process(config)
        context = serve.get_replica_context()
        ours = ours_to_bind(config)
        bind_cores(config, context.rank.local_rank)
        if ours:
            # The replica's own threads and the engine's processes it starts (vLLM's front end,
            # its scheduler) go to the cores left; vLLM's worker binds itself back onto the
            # replica's cores (VLLM_CPU_OMP_THREADS_BIND), where nothing else of ours then runs.
            keep_off_engine_cores(config)
        await self._start(config, context.replica_id.unique_id, await replica_store(config))

    async def node(self) -> str:
        """The Ray node this replica runs on (serve/handle.py `locate`)."""
        return ray.get_runtime_context().get_node_id()

    async def take(
        self, push_id: str, version: int, fingerprint: str | None, part: str, source: SharedPart, names: list[str],
    ) -> None:
        # On the ingress's node the file itself (linked, no copy); elsewhere its Ray object, read
        # zero-copy from this node's object store once Ray brought it here; neither (a replica
        # that started after the push looked where replicas run, an object Ray lost): the
        # version from the store once committed.
        data = None
        if source.node == await self.node() and source.path.exists():
            data = source.path
        elif source.data is not None:
            try:
                data = await source.data
            except ray.exceptions.RayError as exc:
                log.warning("replica %s: part %s of version %d cannot be fetched (%s); it loads the version from the store",
                            self.replica_id, part, version, exc)
        await super().take(push_id, version, fingerprint, part, data, names)


async def replica_store(config: ServerConfig) -> VersionStore:
    """The deployment's weight store as a replica opens it. An object store is the same from every
    node; a directory must be the one the ingress (on the head) made and bound to the checkpoint
    (BASE.json): a replica on a node that does not see it would open an empty store of its own and
    never load a pushed version, so it fails, saying what to give instead."""
    root = store_root(config)
    if not is_url(root):
        deadline = time.monotonic() + STORE_WAIT_S
        while not (root / "BASE.json").exists():  # the ingress may still be starting
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"weights_dir {root} is not on this replica's node ({os.uname().nodename}; the ingress made it on "
                    f"the head {STORE_WAIT_S} s ago or never): give replicas on other nodes an object store "
                    f"(--weights-dir s3://bucket/prefix) or a directory every node sees (NFS, a RWX volume)"
                )
            await asyncio.sleep(1)
    return open_store(config, shared=True)


class ServedIngress:
    """The ingress as a Serve deployment, holding only the engine replicas' handle."""

    async def __init__(self, config: ServerConfig, engines):
        observe_process(config)
        if ours_to_bind(config):
            keep_off_engine_cores(config)
        access = Access.from_config(config)
        self.ingress = await Ingress.start(config, ServeReplicas(engines), open_store(config, shared=True), access)

    async def endpoints(self) -> dict:
        return self.ingress.endpoints()

    async def check_health(self) -> None:
        """Serve's health check of the ingress itself (its servers run); replica health is separate."""

    async def __del__(self):
        await self.ingress.close()


def observe_process(config: ServerConfig) -> None:
    """Log lines (at the level Serve's LoggingConfig gives this process) and traces of a Serve
    process as the single-process server's: each replica and the ingress is a process of its own."""
    logs.setup(logging.getLevelName(logging.getLogger("ray.serve").getEffectiveLevel()), config.log_format)
    tracing.setup(config)


def _logging_config(config: ServerConfig) -> dict:
    return {"enable_access_log": False, "encoding": SERVE_ENCODING[config.log_format]}


def node_cores() -> int:
    """The cores this node gives us: the affinity mask (taskset, a container's cpuset), bounded by
    what Ray counts (a container's CPU quota, `ray start --num-cpus`) once Ray runs here."""
    import ray

    cores = len(usable_cores())
    if ray.is_initialized():
        cores = min(cores, max(1, int(ray.cluster_resources().get("CPU", cores))))
    return cores


def cores_per_replica(config: ServerConfig) -> float:
    """`replica_cpus`, or its default for this node (see the field): as `vllm serve` binds its
    engine to all cores but one, the replicas that may run here share all cores but one, which the
    ingress, the replicas' front ends and the engines' schedulers run on. Resolved where the
    deployment is made (app_config), where the replica count is known."""
    if config.replica_cpus is not None:
        return config.replica_cpus
    if config.replica_gpus:
        return 1.0
    return float(max(1, (node_cores() - 1) // max(most_replicas(config), 1)))


def most_replicas(config: ServerConfig) -> int:
    """The most engine replicas the deployment may run: its count, or its autoscaling maximum."""
    return config.autoscale[1] if config.autoscale else config.replicas


def engine_cores(config: ServerConfig) -> tuple[list[list[int]], list[int]]:
    """(the cores of each replica slot on this node, the cores left), from replica_cpus alone (a
    Serve config's replica count is not in the replicas' arguments): as many slots as fit leaving
    a core; replicas beyond them share the slots (local rank modulo the slots)."""
    allowed, per = usable_cores(), max(1, round(cores_per_replica(config)))
    per = min(per, len(allowed))
    slots = max(1, (len(allowed) - 1) // per)
    return [allowed[i * per:(i + 1) * per] for i in range(slots)], allowed[slots * per:]


def ours_to_bind(config: ServerConfig) -> bool:
    """CPU replicas whose cores the service picks (not an operator's VLLM_CPU_OMP_THREADS_BIND)."""
    return not config.replica_gpus and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ


def core_plan(config: ServerConfig) -> str:
    """The log line's account of this node's cores: what each replica is bound to, what is left."""
    if not ours_to_bind(config):
        return f"{cores_per_replica(config):g} CPU(s) reserved per replica"
    slots, rest = engine_cores(config)
    most = most_replicas(config)
    shared = " (replicas beyond them share them)" if most > len(slots) else ""
    left = f"cores {','.join(map(str, rest))}" if rest else "the same cores (none left)"
    return (f"{most} replica(s); model threads bound to cores {' | '.join(','.join(map(str, s)) for s in slots)}"
            f"{shared}; the ingress, the replicas' front ends and the engines' schedulers on {left}; Ray's own "
            "processes on any")


def keep_off_engine_cores(config: ServerConfig) -> None:
    """Run this process (the ingress, an engine replica's front end) on the cores no engine's
    model thread is bound to, where there are any: its per-token work would otherwise preempt a
    model thread mid-step (measured, BENCHMARKS.md, agentic load). vLLM's worker still binds its
    model thread onto the replica's cores: torch's libgomp binds by GOMP_CPU_AFFINITY, beyond the
    mask it inherits."""
    _, rest = engine_cores(config)
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
    if not ours_to_bind(config):
        return
    slots, _ = engine_cores(config)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, slots[local_rank % len(slots)]))


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
    env = {"VLLM_CPU_KVCACHE_SPACE": str(config.kv_cache_gib), **SERVE_ENV}
    # Settings given to the driver reach the replicas' processes too.
    # (Tests arm fault points, rollout_service/faults.py, through ROLLOUT_FAULT_FILE.)
    for name in ("VLLM_CPU_OMP_THREADS_BIND", "VLLM_LOGGING_LEVEL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", faults.ENV):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _ingress_options() -> dict:
    env = dict(SERVE_ENV)
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):  # the replicas' binding, so the ingress keeps off it
        env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    if faults.ENV in os.environ:
        env[faults.ENV] = os.environ[faults.ENV]
    # On the head node: where `serve` prints the address of, and where Serve's own actors run.
    return {"num_cpus": 0, "resources": {HEAD_NODE: 0.001}, "runtime_env": {"env_vars": env}}


def build_app(config: ServerConfig) -> Application:
    if config.replica_cpus is None:  # a Serve config file that left it out: its replica count is not known here
        config = config.model_copy(update={"replica_cpus": cores_per_replica(config)})
    engines = serve.deployment(
        ServedEngineReplica,
        name=ENGINE_DEPLOYMENT,
        ray_actor_options={
            "num_cpus": config.replica_cpus,
            "num_gpus": config.replica_gpus,
            "resources": {config.replica_resource: 1} if config.replica_resource else {},
            "runtime_env": {"env_vars": _engine_env(config)},
        },
        max_ongoing_requests=MAX_ONGOING_PER_REPLICA,
        logging_config=_logging_config(config),
        health_check_period_s=HEALTH_CHECK_PERIOD_S,
        health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S,
        request_router_config=RequestRouterConfig(
            request_router_class="rollout_service.serve.routing:SessionAffinityRouter"
        ),
        **_scaling(config),
    ).bind(config)
    ingress = serve.deployment(
        ServedIngress, name="Ingress", num_replicas=1, max_ongoing_requests=MAX_ONGOING_PER_REPLICA,
        ray_actor_options=_ingress_options(), logging_config=_logging_config(config),
    )
    return ingress.bind(config, engines)


def _otel_env() -> dict[str, str]:
    """The OpenTelemetry settings given to the driver (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME,
    ...), for the processes that trace (observe/tracing.py)."""
    return {name: value for name, value in os.environ.items() if name.startswith("OTEL_")}


def app_builder(args: dict) -> Application:
    """For Serve config files: `import_path: rollout_service.serve.app:app_builder`, `args:` the
    ServerConfig fields (e.g. model, quantization, redis_url); scaling goes in `deployments:`."""
    return build_app(ServerConfig(**args))


def app_config(config: ServerConfig) -> dict:
    """The Serve application config (ServeApplicationSchema) that deploys `config`. The default
    replica_cpus is resolved here, where the replica count is known (it is not in the arguments,
    so that scaling stays a lightweight update): with it left to its default, a new replica count
    re-splits the cores, which restarts the replicas; give --replica-cpus to scale without."""
    args = config.model_dump(mode="json", exclude=set(_SCALING_FIELDS))
    args["replica_cpus"] = cores_per_replica(config)
    return {
        "name": APP_NAME,
        "import_path": "rollout_service.serve.app:app_builder",
        "route_prefix": None,
        # The application's environment reaches every deployment, also one whose ray_actor_options
        # a config file replaces (deploy/serve.yaml's Ingress).
        "runtime_env": {"env_vars": {**SERVE_ENV, **_otel_env()}},
        "args": args,
        "deployments": [{"name": ENGINE_DEPLOYMENT, **_scaling(config)}],
    }
