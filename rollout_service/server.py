"""The embedded single-process server: one engine, a grpc.aio server and a FastAPI app on one loop.

No Ray and no Redis are needed. `run()` blocks until SIGINT/SIGTERM, then stops gracefully:
health goes NOT_SERVING, in-flight calls get a grace period, the engine shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket

import uvicorn

from rollout_service.api.grpc_server import create_server
from rollout_service.api.http_app import create_app
from rollout_service.config import ServerConfig
from rollout_service.engine import RolloutEngine
from rollout_service.errors import ConfigError
from rollout_service.launcher import READY_PREFIX

log = logging.getLogger("rollout_service")

SHUTDOWN_GRACE_S = 5.0


async def _start_http(engine: RolloutEngine, host: str, port: int) -> tuple[uvicorn.Server, asyncio.Task, int]:
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host=host, port=port, log_level="warning", lifespan="off"))
    # The runner owns the signals; uvicorn would otherwise install its own handlers.
    server.install_signal_handlers = lambda: None
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises the bind error
            raise OSError(f"HTTP server on {host}:{port} stopped during start-up")
        await asyncio.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    return server, task, bound


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


async def serve(config: ServerConfig) -> None:
    """Start everything, log one ready line, run until a stop signal."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    check_ports_free(config)
    log.info("starting the engine on %s (dtype=%s, quantization=%s)", config.model, config.dtype, config.quantization)
    engine = await RolloutEngine.start(config)
    grpc_server = http_server = http_task = None
    try:
        grpc_server, grpc_port = await create_server(engine, config.host, config.port)
        http_desc = "off"
        if config.http_port is not None:
            http_server, http_task, http_port = await _start_http(engine, config.host, config.http_port)
            http_desc = f"{config.host}:{http_port}"
        log.info(
            "%s grpc=%s:%d http=%s model=%s dtype=%s quantization=%s logprobs=%s weight_version=%d",
            READY_PREFIX, config.host, grpc_port, http_desc, config.model, config.dtype,
            config.quantization, config.logprobs_mode, engine.weight_version,
        )
        await stop.wait()
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
        log.info("stopped")


def run(config: ServerConfig) -> None:
    asyncio.run(serve(config))



