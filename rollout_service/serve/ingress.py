"""The ingress: the one assembly of the front ends (gRPC, HTTP with the OpenAI routes, health,
metrics) over the backend (serve/backend.py), the push protocol (serve/push.py) and the replica
set, for a Ray Serve deployment (its `Ingress` deployment, serve/app.py) and for the single-process
server (server.py) alike.

It runs its own grpc.aio and uvicorn servers instead of Serve's proxies: Serve's gRPC proxy pulls
every message of a client stream from the proxy actor with its own actor call, which measured
0.16-0.28 GB/s for a bulk push against 0.54-0.60 for a grpc.aio server on the same cores (FACTS.md,
"Transport reference figures"; bench/serve_scaling.py measures this design). One ingress serves a
node's port; with Redis, more ingresses (one per node) share the push lock.

Every few seconds it writes the replica registry (heartbeats) and, after Redis lost its data,
writes the weight store's current version back. Once after it starts, as soon as no push runs
(another ingress may be pushing), it drops what a push cut off by a crash left in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from pathlib import Path

from grpc_health.v1 import health_pb2

from rollout_service.api.access import Access
from rollout_service.api.grpc_server import SERVICE_NAME, create_server
from rollout_service.api.http_app import create_app
from rollout_service.api.http_server import start_http
from rollout_service.config import ServerConfig, is_loopback
from rollout_service.errors import ConfigError, EngineUnavailable
from rollout_service.observe.metrics import Metered
from rollout_service.serve.backend import Backend
from rollout_service.serve.coordinator import Coordinator, make_coordinator
from rollout_service.serve.debug_routes import debug_router
from rollout_service.serve.push import Push
from rollout_service.serve.replicas import Replicas
from rollout_service.weights.manifest import ParamTable
from rollout_service.weights.versions import VersionStore

log = logging.getLogger("rollout_service.ingress")

REGISTRY_EVERY_S = 2.0
REGISTRY_TTL_S = 10.0
SHUTDOWN_GRACE_S = 5.0
HEALTH_POLL_S = 2.0


class Ingress:
    """Start one with `await Ingress.start(...)`; `close()` stops it gracefully."""

    @classmethod
    async def start(
        cls, config: ServerConfig, replicas: Replicas, store: VersionStore, access: Access, *,
        coordinator: Coordinator | None = None, requantize_into: Path | None = None, store_cleaned: bool = False,
    ) -> Ingress:
        """The front ends over `replicas` and `store`, serving as soon as this returns.

        Args:
            config: the server's settings.
            replicas: the engine replicas (serve/replicas.py).
            store: the weight store, opened by the caller (shared, or held alone).
            access: the API keys and limits.
            coordinator: the push lock, version record and events; default from `config`
                (Redis with redis_url, else embedded).
            requantize_into: where pushes requantize into (serve/push.py `Push`).
            store_cleaned: the caller dropped what an earlier crash left in the store while no
                push could run; else the ingress does, under the push lock, once it can.
        """
        self = cls()
        self.config = config
        self.replicas = replicas
        self.store = store
        self.coordinator = coordinator or make_coordinator(config)
        version = store.current_version()
        if version:  # the record starts from the store; later, only a coordinator that lost it is written back
            with contextlib.suppress(EngineUnavailable):  # Redis away: the registry loop writes it once it is back
                await self.coordinator.ensure_version(version, store.manifest_path(version))
        table = ParamTable.from_checkpoint(config.model)
        self.push = Push(config, replicas, self.coordinator, store, table, requantize_into)
        self._cleaned = store_cleaned
        self.backend = Metered(Backend(config, replicas, self.push))
        log_exposure(config, access)
        self.grpc_server, self.grpc_port = await create_server(self.backend, config, access)
        self.http = self._http_task = self.http_port = None
        if config.http_port is not None:
            debug = debug_router(replicas) if config.debug_endpoints else None
            app = create_app(self.backend, access, events=self.coordinator.events, debug=debug)
            self.http, self._http_task, self.http_port = await start_http(app, config)
        self._tasks = [
            asyncio.create_task(watch_health(self.backend, self.grpc_server.health)),
            asyncio.create_task(self._keep_registry()),
        ]
        return self

    def endpoints(self) -> dict:
        """Where this ingress serves: {"grpc": "host:port", "http": "host:port" or None}."""
        http = f"{self.config.host}:{self.http_port}" if self.http_port is not None else None
        return {"grpc": f"{self.config.host}:{self.grpc_port}", "http": http}

    async def _keep_registry(self) -> None:
        warned = False
        while True:
            try:
                await self.sync_coordinator()
                if warned:
                    log.info("coordinator reachable again")
                warned = False
            except EngineUnavailable as exc:
                if not warned:
                    log.warning("%s; generation goes on, pushes fail until it is back", exc)
                warned = True
            except Exception:
                log.exception("updating the replica registry failed")
            await asyncio.sleep(REGISTRY_EVERY_S)

    async def sync_coordinator(self) -> None:
        """Heartbeat every live replica; write the current version back if the coordinator lost it."""
        infos = await self.replicas.broadcast("info")
        live = {i["replica_id"]: i for i in infos if isinstance(i, dict)}
        await self.coordinator.heartbeat(live, REGISTRY_TTL_S)
        version = self.store.current_version()
        if version and await self.coordinator.ensure_version(version, self.store.manifest_path(version)):
            log.info("wrote version %d back to the coordinator", version)
        if not self._cleaned:
            self._cleaned = await self.push.clean_store()

    async def close(self) -> None:
        """Health NOT_SERVING, calls in flight given SHUTDOWN_GRACE_S, then the servers stop."""
        for t in self._tasks:
            t.cancel()
        await self.grpc_server.health.enter_graceful_shutdown()
        await self.grpc_server.stop(SHUTDOWN_GRACE_S)
        if self.http is not None:
            self.http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, SHUTDOWN_GRACE_S)
        await self.coordinator.close()


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
