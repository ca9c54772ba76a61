"""What the front ends (api/) call: the backend over the engine replicas (serve/replicas.py): the same
for a Ray Serve deployment and for the single-process server.

Generate goes to one replica (serve/routing.py picks it), or, for a batch larger than one engine
step, in parts to every replica (serve/split.py); status and health ask every replica; pushes go
through serve/push.py (a rollback too: serve/rollback.py). Errors raised in a replica reach the client as the replica raised them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from rollout_service.config import ServerConfig
from rollout_service.errors import EngineUnavailable, Overloaded
from rollout_service.observe import tracing
from rollout_service.serve import split
from rollout_service.serve.push import Push
from rollout_service.serve.replicas import Replicas
from rollout_service.serve.rollback import rollback
from rollout_service.types import Completion, Counters, GenerateRequest, PushResult, ServerStatus
from rollout_service.weights.delta import codecs_for
from rollout_service.weights.manifest import HeaderReader
from rollout_service.weights.versions import Manifest


class Backend:
    def __init__(self, config: ServerConfig, replicas: Replicas, push: Push):
        self.config = config
        self.replicas = replicas
        self.push = push

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Completion]:
        # The one place a call is held for a weight version: at least the committed one, so no
        # sample of an older version follows a push's reply; each replica holds the call until it
        # serves that version.
        req = req.at_least(self.push.store.current_version)
        runs = await self._split(req)
        streams, merged = [], None
        try:
            carried = tracing.carrier()  # the call's request id and span, for the replica's log lines and spans
            for replica, a, b in runs:  # inside the try: parts already sent are cancelled if one fails
                streams.append(self.replicas.generate(split.part(req, a, b), replica, carried))
            if len(runs) > 1:
                merged = split.merged([(a, s) for (_, a, _), s in zip(runs, streams)])
            async for completion in merged or streams[0]:
                yield completion
        finally:
            if merged is not None:
                await merged.aclose()  # stops its pumps
            for stream in streams:
                await stream.aclose()  # no-op when finished; aborts the replica's requests otherwise

    async def _split(self, req: GenerateRequest) -> list[tuple[str, int, int]]:
        """Where the batch goes: one part for the router to place, or one part per replica with
        room (Overloaded when no replica has any)."""
        whole = [("", 0, len(req.prompts))]
        if req.session_id or len(req.prompts) < 2 or len(req.prompts) * req.sampling.n <= self.config.max_num_seqs:
            return whole
        served = await self._served()
        if len(served) < 2:
            return whole
        limit = self.config.max_inflight_sequences
        free = {i["replica_id"]: limit - s.counters.sequences_running - s.counters.sequences_waiting for i, s in served}
        if max(free.values()) <= 0:
            raise Overloaded(f"every replica is full (at most max_inflight_sequences={limit} each); retry shortly")
        return split.shares(len(req.prompts), free)

    async def _served(self) -> list[tuple[dict, ServerStatus]]:
        """(registry entry, status) of every replica that answers."""
        return [r for r in await self.replicas.broadcast("served") if isinstance(r, tuple)]

    async def status(self) -> ServerStatus:
        served = await self._served()
        if not served:
            raise EngineUnavailable("no engine replica is serving yet (engines take about a minute to start)")
        return deployment_status(served, self.push.last_push, self.push.store.current_version())

    async def list_versions(self) -> list[Manifest]:
        """The committed versions the weight store keeps, newest first."""
        return await asyncio.to_thread(self.push.store.kept)

    async def engine_metrics(self) -> list[tuple[str, str]]:
        """(replica id, its engine's metrics in Prometheus' text format) of every replica that answers."""
        return [r for r in await self.replicas.broadcast("engine_metrics") if isinstance(r, tuple)]

    def begin_push(self, read_header: HeaderReader):
        return self.push.begin(read_header)

    async def commit_push(self, session) -> PushResult:
        return await self.push.commit(session)

    async def rollback(self, to_version: int, expected_version: int | None) -> PushResult:
        """Serve kept version `to_version` again as a new version (serve/rollback.py)."""
        return await rollback(self.push, to_version, expected_version)

    async def check_health(self) -> None:
        """Serving while one replica can: Serve replaces the others (their own health checks)."""
        results = await self.replicas.broadcast("check_health")
        if not any(r is None for r in results):
            problems = "; ".join(str(r) for r in results) or "none has started yet"
            raise EngineUnavailable(f"no engine replica is serving ({problems})")


def deployment_status(served: list[tuple[dict, ServerStatus]], last_push: PushResult | None, committed: int) -> ServerStatus:
    """GetStatus of the deployment, from each replica's (registry entry, status)."""
    statuses = [status for _, status in served]
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
        last_push=last_push,
        replicas=len(statuses),
        replica_versions={info["replica_id"]: status.weight_version for info, status in served},
        committed_version=committed,
        delta_codecs=codecs_for(statuses[0].dtype),
    )
