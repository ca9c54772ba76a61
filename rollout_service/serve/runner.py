"""`rollout-service serve` on Ray Serve: start (or join) Ray, deploy the application, log the
ready line once every replica serves, stop on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
import time

import ray
from ray import serve
from ray.serve._private import api as _private_api
from ray.serve.schema import ServeDeploySchema

from rollout_service.config import ServerConfig
from rollout_service.engine.engine import resolve_model
from rollout_service.launcher import READY_PREFIX
from rollout_service.errors import ConfigError
from rollout_service.serve.app import APP_NAME, ENGINE_DEPLOYMENT, app_config
from rollout_service.server import check_ports_free

log = logging.getLogger("rollout_service")


def deploy(config: ServerConfig, timeout_s: float = 900):
    """Deploy (or update) the application on the connected Ray cluster, as `serve deploy` does with
    a config file; returns the ingress handle once the engine replicas the config asks for run."""
    schema = ServeDeploySchema.model_validate(
        # Serve's own HTTP/gRPC proxies are not used: the ingress serves both (serve/ingress.py).
        {"proxy_location": "Disabled", "applications": [app_config(config)]}
    )
    # Serve's public Python API (serve.run) deploys code, not configs, and restarts every replica on
    # each call; the config path (what `serve deploy` sends) makes scaling a lightweight update.
    _private_api.serve_start().deploy_apps(schema)
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
    # Settings errors (FP8 on CPU, a quantized checkpoint given with --quantization) surface here
    # rather than as replicas failing to start; the quantized copy is made once, before the replicas.
    resolve_model(config)
    own_cluster = config.ray_address is None
    ray.init(address=config.ray_address, logging_level=logging.WARNING, include_dashboard=False,
             configure_logging=False, log_to_driver=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    n = f"{config.autoscale[0]}-{config.autoscale[1]} (autoscaled)" if config.autoscale else str(config.replicas)
    log.info("deploying on Ray Serve: %s engine replica(s) of %s; each engine takes about a minute to start", n, config.model)
    try:
        ingress = deploy(config)
        ends = ingress.endpoints.remote().result()
        log.info(
            "%s grpc=%s http=%s model=%s dtype=%s quantization=%s backend=ray replicas=%s weights_dir=%s redis=%s",
            READY_PREFIX, ends["grpc"], ends["http"] or "off", config.model, config.dtype, config.quantization,
            n, config.store_dir, config.redis_url or "embedded",
        )
        stop.wait()
        log.info("stopping: deleting the application")
    finally:
        serve.delete(APP_NAME)
        if own_cluster:
            serve.shutdown()
            ray.shutdown()
        log.info("stopped")
