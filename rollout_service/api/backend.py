"""What the gRPC and HTTP front ends call: one interface, two implementations.

`LocalBackend` is one engine in this process (`--backend local`); `serve.backend.ServeBackend` is
the Ray Serve deployment (engine replicas behind `DeploymentHandle`s). The front ends, the error
mapping and the metrics are the same for both.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import AsyncContextManager, Protocol

from rollout_service.config import InflightPolicy, ServerConfig
from rollout_service.engine import RolloutEngine
from rollout_service.types import Completion, GenerateRequest, PushResult, ServerStatus
from rollout_service.weights.local import LocalPush
from rollout_service.weights.manifest import HeaderReader
from rollout_service.weights.session import PushSession


class Backend(Protocol):
    config: ServerConfig

    def generate(self, req: GenerateRequest) -> AsyncIterator[Completion]:
        """Completions as they finish (closing the iterator aborts the rest)."""

    async def status(self) -> ServerStatus: ...

    def begin_push(self, read_header: HeaderReader) -> AsyncContextManager[PushSession]:
        """A checked push session; what it staged is dropped unless it is committed. Its header is
        read (`read_header`) once the push lock is held."""

    async def commit_push(self, session: PushSession) -> PushResult: ...

    async def check_health(self) -> None:
        """Raise EngineUnavailable unless requests can be served."""

    async def snapshot(self) -> bytes:
        """The engine's weights as it computes with them (debug endpoint)."""

    async def pause(self, mode: InflightPolicy, stepped: bool = False) -> None:
        """Hold generation until resume() (debug endpoint; see RolloutEngine.pause)."""

    async def resume(self) -> None: ...


class LocalBackend:
    def __init__(self, engine: RolloutEngine, push: LocalPush):
        self.engine = engine
        self.push = push
        self.config = engine.config

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Completion]:
        req = req.at_least(self.push.store.current_version)
        async with contextlib.aclosing(self.engine.generate(req)) as stream:
            async for c in stream:
                yield c

    async def status(self) -> ServerStatus:
        result = self.engine.status()
        result.last_push = self.push.last_push
        result.replica_versions = {"local": result.weight_version}
        result.committed_version = self.push.store.current_version()
        return result

    def begin_push(self, read_header: HeaderReader) -> AsyncContextManager[PushSession]:
        return self.push.begin(read_header)

    async def commit_push(self, session: PushSession) -> PushResult:
        return await self.push.commit(session)

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def snapshot(self) -> bytes:
        return await self.engine.snapshot()

    async def pause(self, mode: InflightPolicy, stepped: bool = False) -> None:
        await self.engine.pause(mode, stepped)

    async def resume(self) -> None:
        await self.engine.resume()
