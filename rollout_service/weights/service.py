"""WeightService: runs pushes against one engine, one at a time.

`begin(header)` checks the header and opens a PushSession; the API layer feeds it chunks and calls
`commit`. Anything else -- an error, a cancelled call, a stream that ends without its commit --
leaves through `begin`'s exit, which deletes what was staged: the engine never saw any of it.
A second push while one runs is rejected (ABORTED), not queued: a trainer that pushes twice at
once has a bug, and queueing would hide it behind a long wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import time
import typing
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from rollout_service.config import InflightPolicy, ServerConfig
from rollout_service.errors import Conflict, FailedPrecondition
from rollout_service.types import PushResult
from rollout_service.weights.convert import to_engine_format
from rollout_service.weights.manifest import ParamTable, PushHeader
from rollout_service.weights.session import PushSession
from rollout_service.weights.staging import Spool
from rollout_service.weights.store import WeightSet

if typing.TYPE_CHECKING:
    from rollout_service.engine import RolloutEngine

log = logging.getLogger(__name__)

POLICIES: tuple[str, ...] = typing.get_args(InflightPolicy)
# Size of the staged part files the engine reads back.
PART_BYTES = 64 * 1024 * 1024


class WeightService:
    def __init__(self, engine: RolloutEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.table = ParamTable.from_checkpoint(config.model)
        base = config.staging_dir or config.cache_dir / "staging"
        base.mkdir(parents=True, exist_ok=True)
        self._root = Path(tempfile.mkdtemp(prefix="server-", dir=base))
        self.weights = WeightSet(engine.checkpoint, self._root, engine.packed_modules)
        self._dtype = getattr(torch, config.dtype)
        # Conversions use torch in this process; the engine and the front end need the other cores.
        # On 2 cores one thread cut a push's conversion CPU time by about a third (OpenMP threads
        # spin against the gRPC threads), see BENCHMARKS.md.
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        self._quant = None if config.quantization == "none" else config.quantization
        self._busy = False
        self.last_push: PushResult | None = None

    def _convert(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return to_engine_format(name, tensor, self._dtype, self._quant)

    @contextlib.asynccontextmanager
    async def begin(self, header: PushHeader) -> AsyncIterator[PushSession]:
        if self._busy:
            raise Conflict("another push is in progress; pushes are not queued: retry once it has committed")
        self.table.check_header(header, POLICIES)
        if header.expected_version is not None and header.expected_version != self.engine.weight_version:
            raise FailedPrecondition(
                f"header.expected_version: {header.expected_version} is stale, the server serves version "
                f"{self.engine.weight_version}"
            )
        self._busy = True
        try:
            session = PushSession(
                header, self.table, self._convert, Spool(self._root, PART_BYTES), self.config.push_buffer_mib << 20
            )
        except BaseException:
            self._busy = False
            raise
        try:
            yield session
        finally:
            session.close()
            if not session.committed:
                session.spool.discard()
            self._busy = False

    async def commit(self, session: PushSession) -> PushResult:
        """Finish receiving, then load the push into the engine: version + 1."""
        receive_s = time.monotonic() - session.started
        await session.finish()
        # The commit point: from here the push completes even if the caller goes away, so the
        # engine never holds weights without the version that names them.
        task = asyncio.ensure_future(self._apply(session, receive_s))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            await task
            raise

    async def _apply(self, session: PushSession, receive_s: float) -> PushResult:
        pushed = session.spool.files
        policy = session.header.inflight or self.config.inflight
        try:
            apply_s, pause_ms, drain_ms = await self.engine.apply_weights(self.weights.plan(pushed), policy)
        except Exception:
            # Not a bad push (those fail before this point) but an engine error: put back the
            # current weights of the modules it may have half loaded, then report it.
            log.exception("applying a push failed; restoring the modules it touched")
            await self.engine.apply_weights(self.weights.plan({n: self.weights.files[n] for n in pushed}), policy, bump=False)
            raise
        self.weights.commit(pushed)
        session.committed = True
        self.last_push = PushResult(
            version=self.engine.weight_version,
            bytes_received=session.bytes_received,
            tensors_applied=len(session.tensors),
            receive_s=receive_s,
            requantize_s=session.convert_s,
            apply_s=apply_s,
            pause_ms=pause_ms,
            drain_ms=drain_ms,
            label=session.header.label,
        )
        return self.last_push

    def close(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)
