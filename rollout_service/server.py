"""The embedded single-process server: one engine, a grpc.aio server and a FastAPI app on one loop.

No Ray and no Redis are needed. Pushes go through a weight store as on Ray Serve
(weights/local.py), which this server holds alone; given --weights-dir it loads the store's current
version at start, so a restart resumes where it stopped (without, the store is temporary).
`run()` blocks until SIGINT/SIGTERM, then stops gracefully: health goes NOT_SERVING, in-flight
calls get a grace period, the engine shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

from grpc_health.v1 import health_pb2

from rollout_service.api.access import Access
from rollout_service.api.backend import LocalBackend
from rollout_service.api.grpc_server import SERVICE_NAME, create_server
from rollout_service.api.http_app import create_app
from rollout_service.api.http_server import start_http
from rollout_service.api.metrics import Metered
from rollout_service.config import ServerConfig, is_loopback
from rollout_service.engine import RolloutEngine
from rollout_service.engine.engine import with_context
from rollout_service.errors import ConfigError, EngineUnavailable
from rollout_service.launcher import READY_PREFIX
from rollout_service.weights.local import LocalPush, local_store
from rollout_service.weights.service import WeightService

log = logging.getLogger("rollout_service")

SHUTDOWN_GRACE_S = 5.0
HEALTH_POLL_S = 2.0


async def watch_health(backend, health) -> None:
    """Keep gRPC health in step with the backend: NOT_SERVING while it cannot serve (a dead engine,
    no replica yet), so an orchestrator holds traffic back or replaces this server."""
    serving = True  # create_server starts it SERVING
    while True:
        await asyncio.sleep(HEALTH_POLL_S)
        try:
            await backend.check_health()
            alive = True
        except EngineUnavailable as exc:
            alive = False
            if serving:
                log.error("engine unavailable, reporting NOT_SERVING: %s", exc)
        if alive != serving:
            status = health_pb2.HealthCheckResponse.SERVING if alive else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await health.set(name, status)
            serving = alive


def check_ports_free(config: ServerConfig) -> None:
    """Fail in a second, not after the engine's minute-long start, when a port is taken."""
    ports = [("port", config.port), ("http_port", config.http_port)]
    for name, port in ports:
        if not port:  # None (off) or 0 (any free port)
            continue
        with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as probe:
            try:
                probe.bind((config.host, port))
            except OSError as exc:
                raise ConfigError(f"{name}={port}: cannot bind {config.host}:{port} ({exc.strerror})") from None


def log_exposure(config: ServerConfig, access: Access) -> None:
    """Say at start who may call this server."""
    where = f"{config.host} ({'this machine only' if is_loopback(config.host) else 'the network'})"
    if access.keys is None:
        log.warning("no --api-keys: every caller that reaches %s may generate and push weights", where)
    elif config.tls_cert is None and not is_loopback(config.host):
        log.warning("API keys travel in plain text to %s: give --tls-cert/--tls-key", where)
    else:
        log.info("API keys required on %s%s", where, ", TLS" if config.tls_cert else "")


async def serve(config: ServerConfig) -> None:
    """Start everything, log one ready line, run until a stop signal."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    check_ports_free(config)
    config = with_context(config)
    access = Access.from_config(config)  # a bad keys file fails here, before the engine starts
    log_exposure(config, access)
    store = local_store(config)  # a second server on a --weights-dir fails here, before the engine starts
    store.clean()
    log.info("starting the engine on %s (dtype=%s, quantization=%s)", config.model, config.dtype, config.quantization)
    try:
        engine = await RolloutEngine.start(config)
    except BaseException:
        store.close()
        raise
    weights = WeightService(engine, config)
    push = LocalPush(weights, store, config)
    grpc_server = http_server = http_task = None
    try:
        await push.resume()
        backend = Metered(LocalBackend(engine, push))
        grpc_server, grpc_port = await create_server(backend, config, access)
        watchdog = asyncio.create_task(watch_health(backend, grpc_server.health))
        http_desc = "off"
        if config.http_port is not None:
            http_server, http_task, http_port = await start_http(create_app(backend, access), config)
            http_desc = f"{config.host}:{http_port}"
        log.info(
            "%s grpc=%s:%d http=%s model=%s dtype=%s quantization=%s logprobs=%s inflight=%s weight_version=%d weights_dir=%s",
            READY_PREFIX, config.host, grpc_port, http_desc, config.model, config.dtype,
            config.quantization, config.logprobs_mode, config.inflight, engine.weight_version, store.root,
        )
        await stop.wait()
        watchdog.cancel()
        log.info("stopping: finishing in-flight calls (up to %.0f s)", SHUTDOWN_GRACE_S)
    finally:
        if grpc_server is not None:
            await grpc_server.health.enter_graceful_shutdown()
            await grpc_server.stop(SHUTDOWN_GRACE_S)
        if http_server is not None:
            http_server.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(http_task, SHUTDOWN_GRACE_S)
        engine.shutdown()
        weights.close()
        store.close()
        log.info("stopped")


def run(config: ServerConfig) -> None:
    asyncio.run(serve(config))



