"""Ingress: the gRPC server (rollout.v1, all four RPCs) and the FastAPI app of a Serve deployment,
holding only the engine replicas' DeploymentHandle.

It runs its own grpc.aio and uvicorn servers inside its replica instead of Serve's proxies: Serve's
gRPC proxy pulls every message of a client stream from the proxy actor with its own actor call,
which measured 0.16-0.28 GB/s for a bulk push against 0.54-0.60 for a grpc.aio server on the same
cores (FACTS.md, "Transport reference figures"; bench/serve_scaling.py measures this design). One
ingress replica serves a node's port; with Redis, more ingresses (one per node) share the push lock.

Every few seconds it writes the replica registry (heartbeats) and, after Redis lost its data,
writes the weight store's current version back. Once after it starts, as soon as no push runs
(another ingress may be pushing), it drops what a push cut off by a crash left in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ray.serve.handle import DeploymentHandle

from rollout_service.api.access import Access
from rollout_service.api.grpc_server import create_server
from rollout_service.api.http_app import create_app
from rollout_service.api.metrics import Metered
from rollout_service.config import ServerConfig
from rollout_service.errors import EngineUnavailable
from rollout_service.serve.backend import ServeBackend
from rollout_service.serve.coordinator import make_coordinator
from rollout_service.serve.errors import broadcast
from rollout_service.serve.push import ClusterPush
from rollout_service.api.http_server import start_http
from rollout_service.server import SHUTDOWN_GRACE_S, log_exposure, watch_health
from rollout_service.weights.versions import open_store

log = logging.getLogger("rollout_service.ingress")

REGISTRY_EVERY_S = 2.0
REGISTRY_TTL_S = 10.0


class Ingress:
    async def __init__(self, config: ServerConfig, engines: DeploymentHandle):
        self.config = config
        self.engines = engines
        self.coordinator = make_coordinator(config)
        self.store = open_store(config, shared=True)
        self.push = ClusterPush(config, engines, self.coordinator, self.store)
        self._cleaned = False  # what a push cut off by a crash left in the store; done under the push lock
        self.backend = Metered(ServeBackend(config, engines, self.push))
        access = Access.from_config(config)
        log_exposure(config, access)
        self.grpc_server, self.grpc_port = await create_server(self.backend, config, access)
        self.http = None
        self.http_port = None
        if config.http_port is not None:
            app = create_app(self.backend, access, events=self.coordinator.events)
            self.http, self._http_task, self.http_port = await start_http(app, config)
        self._tasks = [
            asyncio.create_task(watch_health(self.backend, self.grpc_server.health)),
            asyncio.create_task(self._keep_registry()),
        ]

    async def endpoints(self) -> dict:
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
        infos = await broadcast(self.engines, "info")
        live = {i["replica_id"]: i for i in infos if isinstance(i, dict)}
        await self.coordinator.heartbeat(live, REGISTRY_TTL_S)
        version = self.store.current_version()
        if version and await self.coordinator.ensure_version(version, self.store.manifest_path(version)):
            log.info("wrote version %d back to the coordinator", version)
        if not self._cleaned:
            self._cleaned = await self.push.clean_store()

    async def check_health(self) -> None:
        """Serve's health check of the ingress itself (its servers run); replica health is separate."""

    async def __del__(self):
        for t in self._tasks:
            t.cancel()
        await self.grpc_server.health.enter_graceful_shutdown()
        await self.grpc_server.stop(SHUTDOWN_GRACE_S)
        if self.http is not None:
            self.http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, SHUTDOWN_GRACE_S)
        await self.coordinator.close()
