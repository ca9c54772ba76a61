"""ServeBackend: the front ends' Backend (api/backend.py) over the engine replicas' handle.

Generate goes to one replica (serve/routing.py picks it), or, for a batch larger than one engine
step, in parts to every replica (serve/split.py); status and health ask every replica;
pushes go through serve/push.py. Errors raised in a replica reach the client as the replica raised
them (serve/errors.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from ray.serve.handle import DeploymentHandle

from rollout_service.config import ServerConfig
from rollout_service.errors import EngineUnavailable, Overloaded
from rollout_service.serve import split
from rollout_service.serve.errors import broadcast, broadcast_all, unwrap
from rollout_service.serve.push import ClusterPush
from rollout_service.types import Completion, Counters, GenerateRequest, PushResult, ServerStatus
from rollout_service.weights.manifest import HeaderReader


class ServeBackend:
    def __init__(self, config: ServerConfig, engines: DeploymentHandle, push: ClusterPush):
        self.config = config
        self.engines = engines
        self.push = push
        self._stream = engines.options(stream=True)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Completion]:
        req = req.at_least(self.push.store.current_version)  # each replica then holds it until it serves that
        runs = await self._split(req)
        responses, merged = [], None
        try:
            for replica, a, b in runs:  # inside the try: parts already sent are cancelled if one fails
                responses.append(self._stream.generate_stream.remote(split.part(req, a, b), replica))
            if len(runs) > 1:
                merged = split.merged([(a, r) for (_, a, _), r in zip(runs, responses)])
            async for completion in merged or responses[0]:
                yield completion
        except Exception as exc:
            raise unwrap(exc) from None
        finally:
            if merged is not None:
                await merged.aclose()  # stops its pumps
            for response in responses:
                response.cancel()  # no-op when finished; aborts the replica's requests otherwise

    async def _split(self, req: GenerateRequest) -> list[tuple[str, int, int]]:
        """Where the batch goes: one part for Serve to route, or one part per replica with room
        (Overloaded when no replica has any)."""
        whole = [("", 0, len(req.prompts))]
        if req.session_id or len(req.prompts) < 2 or len(req.prompts) * req.sampling.n <= self.config.max_num_seqs:
            return whole
        replicas = [r for r in await broadcast(self.engines, "served") if isinstance(r, tuple)]
        if len(replicas) < 2:
            return whole
        limit = self.config.max_inflight_sequences
        free = {i["replica_id"]: limit - s.counters.sequences_running - s.counters.sequences_waiting for i, s in replicas}
        if max(free.values()) <= 0:
            raise Overloaded(f"every replica is full (at most max_inflight_sequences={limit} each); retry shortly")
        return split.shares(len(req.prompts), free)

    async def _replica_statuses(self) -> list[ServerStatus]:
        results = await broadcast(self.engines, "status")
        return [r for r in results if isinstance(r, ServerStatus)]

    async def status(self) -> ServerStatus:
        served = [r for r in await broadcast(self.engines, "served") if isinstance(r, tuple)]
        statuses = [status for _, status in served]
        if not statuses:
            raise EngineUnavailable("no engine replica is serving yet (engines take about a minute to start)")
        counters = Counters()
        for s in statuses:
            for name in Counters.__slots__:
                setattr(counters, name, getattr(counters, name) + getattr(s.counters, name))
        # The version every replica serves: a replica still catching up holds it back, so a client
        # that waits for version N (wait_for_version) gets no sample of an older one after.
        return dataclasses.replace(
            statuses[0],
            weight_version=min(s.weight_version for s in statuses),
            uptime_s=max(s.uptime_s for s in statuses),
            counters=counters,
            last_push=self.push.last_push,
            replicas=len(statuses),
            replica_versions={info["replica_id"]: status.weight_version for info, status in served},
            committed_version=self.push.store.current_version(),
        )

    def begin_push(self, read_header: HeaderReader):
        return self.push.begin(read_header)

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

    async def pause(self, mode, stepped: bool = False) -> None:
        await broadcast_all(self.engines, "pause", mode, stepped)

    async def resume(self) -> None:
        await broadcast_all(self.engines, "resume")
