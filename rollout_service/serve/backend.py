"""ServeBackend: the front ends' Backend (api/backend.py) over the engine replicas' handle.

Generate goes to one replica (serve/routing.py picks it); status and health ask every replica;
pushes go through serve/push.py. Errors raised in a replica reach the client as the replica raised
them (serve/errors.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentHandle

from rollout_service.config import ServerConfig
from rollout_service.errors import EngineUnavailable
from rollout_service.serve.errors import broadcast, broadcast_all, unwrap
from rollout_service.serve.push import ClusterPush
from rollout_service.types import Completion, Counters, GenerateRequest, PushResult, ServerStatus
from rollout_service.weights.manifest import PushHeader


class ServeBackend:
    def __init__(self, config: ServerConfig, engines: DeploymentHandle, push: ClusterPush):
        self.config = config
        self.engines = engines
        self.push = push
        self._stream = engines.options(stream=True)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Completion]:
        response = self._stream.generate_stream.remote(req)
        try:
            async for completion in response:
                yield completion
        except Exception as exc:
            raise unwrap(exc) from None
        finally:
            response.cancel()  # no-op when finished; aborts the replica's requests otherwise

    async def _replica_statuses(self) -> list[ServerStatus]:
        results = await broadcast(self.engines, "status")
        return [r for r in results if isinstance(r, ServerStatus)]

    async def status(self) -> ServerStatus:
        statuses = await self._replica_statuses()
        if not statuses:
            raise EngineUnavailable("no engine replica is serving yet (engines take about a minute to start)")
        counters = Counters()
        for s in statuses:
            for name in Counters.__slots__:
                setattr(counters, name, getattr(counters, name) + getattr(s.counters, name))
        return dataclasses.replace(
            statuses[0],
            weight_version=self.push.store.current_version(),
            uptime_s=max(s.uptime_s for s in statuses),
            counters=counters,
            last_push=self.push.last_push,
            replicas=len(statuses),
        )

    def begin_push(self, header: PushHeader):
        return self.push.begin(header)

    async def commit_push(self, session) -> PushResult:
        return await self.push.commit(session)

    async def check_health(self) -> None:
        if not await self._replica_statuses():
            raise EngineUnavailable("no engine replica is serving")

    async def snapshot(self) -> bytes:
        try:
            return await self.engines.snapshot.remote()
        except Exception as exc:
            raise unwrap(exc) from None

    async def pause(self, mode) -> None:
        await broadcast_all(self.engines, "pause", mode)

    async def resume(self) -> None:
        await broadcast_all(self.engines, "resume")
