"""`rollout-service serve` on Ray Serve: start (or join) Ray, deploy the application, log the
ready line once every replica serves, stop on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import ray
from ray import serve
from ray.serve._private import api as _private_api
from ray.serve.schema import ServeDeploySchema

from rollout_service.api.access import Access
from rollout_service.config import ServerConfig
from rollout_service.engine.engine import resolve_model, with_context
from rollout_service.launcher import READY_PREFIX
from rollout_service.errors import ConfigError
from rollout_service.serve import local_ray
from rollout_service.serve.app import APP_NAME, ENGINE_DEPLOYMENT, app_config, core_plan
from rollout_service.serve.coordinator import redacted
from rollout_service.serve.ingress import check_ports_free
from rollout_service.weights.versions import store_root

log = logging.getLogger("rollout_service")
DEFAULT_CACHE_DIR: Path = ServerConfig.model_fields["cache_dir"].default


def start_ray(address: str | None = None, *, host: str = "127.0.0.1", private_dir: Path = DEFAULT_CACHE_DIR,
              **kwargs) -> None:
    """`ray.init(address, **kwargs)`. A new local node (no `address`) is started as
    `serve/local_ray.py` says: on loopback unless `host` (the service's bind address) is not, with
    Ray's token authentication (token from the environment or generated into
    `private_dir`/ray), and with 120 s for its GCS to come up; a cluster given by `address` keeps
    its own settings.

    A new node is tried twice. Ray gives its raylet a fixed 30 s to register with the GCS (a literal
    in ray/_private/node.py) and the GCS `RAY_gcs_server_port_wait_time_s` to write its port file,
    and on a loaded machine a first start can miss either ("... timed out during startup", "Timed
    out waiting for file .../gcs_server_port_..."); a second start is the remedy Ray's own message
    suggests. The second failure is raised with the machine's free memory and the node's log
    files, to tell why."""
    local = address is None and not os.environ.get("RAY_ADDRESS")  # which ray.init joins when given no address
    if local:
        local_ray.prepare(host, private_dir)
        kwargs["runtime_env"] = local_ray.runtime_env(host, kwargs.get("runtime_env"))
        # "local", not None: given None, ray.init joins the cluster named in
        # /tmp/ray/ray_current_cluster (a trainer's `ray start` on this host, maybe open and without
        # a token), and stopping would then shut down Serve there.
        address = "local"
    try:
        ray.init(address=address, **kwargs)
        return
    except Exception as exc:  # noqa: BLE001 -- Ray raises a bare Exception / RuntimeError for these
        if not local or not any(m in str(exc) for m in ("timed out during startup", "Timed out waiting for file")):
            raise
        log.warning("Ray's node did not start (%s); shutting it down and starting again", exc)
        ray.shutdown()
    try:
        ray.init(address=address, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"Ray's local node failed to start twice: {exc} ({_ray_diagnostics()})") from exc


def _ray_diagnostics() -> str:
    import psutil

    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs"
    files = sorted(p.name for p in logs.glob("*")) if logs.is_dir() else []
    memory = psutil.virtual_memory()
    return (f"memory available {memory.available / 2**30:.1f} of {memory.total / 2**30:.1f} GiB; "
            f"log files in {logs}: {', '.join(files) or 'none'}")


def deploy(config: ServerConfig, timeout_s: float = 900):
    """Deploy (or update) the application on the connected Ray cluster, as `serve deploy` does with
    a config file; returns the ingress handle once the engine replicas the config asks for run."""
    schema = ServeDeploySchema.model_validate(
        # Serve's own HTTP/gRPC proxies are not used: the ingress serves both (serve/ingress.py).
        {"proxy_location": "Disabled", "applications": [app_config(config)]}
    )
    # Serve's public Python API (serve.run) deploys code, not configs, and restarts every replica on
    # each call; the config path (what `serve deploy` sends) makes scaling a lightweight update.
    # Disabled at the controller's start too: the config's proxy_location applies only from the
    # deploy on, and by then serve_start's default (an HTTP proxy on port 8000) is running.
    _private_api.serve_start(proxy_location="Disabled").deploy_apps(schema)
    want = config.autoscale[0] if config.autoscale else config.replicas
    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(APP_NAME)
        if app is not None and app.status == "DEPLOY_FAILED":
            raise ConfigError(f"deploying on Ray Serve failed: {app.message}")
        if app is not None and app.status == "RUNNING":
            engines = app.deployments.get(ENGINE_DEPLOYMENT)
            if engines is not None and engines.replica_states.get("RUNNING", 0) >= want:
                return serve.get_app_handle(APP_NAME)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the application was not running after {timeout_s:.0f} s: {app}")
        time.sleep(0.5)


def run(config: ServerConfig) -> None:
    check_ports_free(config)
    Access.from_config(config)  # a bad keys file fails here, not in the ingress replica
    # Settings errors (FP8 on CPU, a quantized checkpoint given with --quantization) surface here
    # rather than as replicas failing to start; the quantized copy is made once, before the replicas.
    resolve_model(config)
    config = with_context(config)  # the ingress checks requests against the context its replicas serve
    # ray.init joins RAY_ADDRESS when given no address: that cluster is the operator's, not ours to shut down.
    own_cluster = config.ray_address is None and not os.environ.get("RAY_ADDRESS")
    start_ray(config.ray_address, host=config.host, private_dir=config.cache_dir, logging_level=logging.WARNING,
              include_dashboard=False, configure_logging=False, log_to_driver=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    n = f"{config.autoscale[0]}-{config.autoscale[1]} (autoscaled)" if config.autoscale else str(config.replicas)
    log.info("deploying on Ray Serve: %s engine replica(s) of %s; each engine takes about a minute to start", n, config.model)
    log.info("cores: %s", core_plan(config))
    try:
        ingress = deploy(config)
        ends = ingress.endpoints.remote().result()
        log.info(
            "%s grpc=%s http=%s model=%s dtype=%s quantization=%s backend=ray replicas=%s weights_dir=%s redis=%s",
            READY_PREFIX, ends["grpc"], ends["http"] or "off", config.model, config.dtype, config.quantization,
            n, store_root(config), redacted(config.redis_url) if config.redis_url else "embedded",
        )
        stop.wait()
        log.info("stopping: deleting the application")
    finally:
        serve.delete(APP_NAME)
        if own_cluster:
            serve.shutdown()
        ray.shutdown()  # the driver's connection; a joined cluster runs on
        log.info("stopped")
