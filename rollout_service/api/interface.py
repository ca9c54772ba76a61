"""What the gRPC and HTTP front ends call: the deployment's backend (serve/backend.py), for Ray
Serve and the single-process server alike; test doubles of the front ends' tests follow it too."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import AsyncContextManager, Protocol

from rollout_service.config import ServerConfig
from rollout_service.types import Completion, GenerateRequest, PushResult, ServerStatus
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
