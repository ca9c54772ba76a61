"""`rollout-service serve` on Ray Serve: start (or join) Ray, deploy the application, log the
ready line once every replica serves, stop on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading

import ray
from ray import serve

from rollout_service.config import ServerConfig
from rollout_service.engine.engine import resolve_model
from rollout_service.launcher import READY_PREFIX
from rollout_service.serve.app import APP_NAME, build_app
from rollout_service.server import check_ports_free

log = logging.getLogger("rollout_service")


def deploy(config: ServerConfig):
    """Deploy (or update) the application on the connected Ray cluster; returns the ingress handle
    once every replica has started."""
    # Serve's own HTTP/gRPC proxies are not used: the ingress serves both (serve/ingress.py).
    serve.start(proxy_location="Disabled")
    return serve.run(build_app(config), name=APP_NAME, route_prefix=None)


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
