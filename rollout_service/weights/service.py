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

import safetensors
import torch

from rollout_service.config import InflightPolicy, ServerConfig
from rollout_service.errors import Conflict, FailedPrecondition
from rollout_service.types import ApplyStats, PushResult
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
        self._recipe = config.recipe()
        self._busy = False
        self.last_push: PushResult | None = None

    def _convert(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return to_engine_format(name, tensor, self._dtype, self._recipe)

    @contextlib.asynccontextmanager
    async def begin(self, header: PushHeader) -> AsyncIterator[PushSession]:
        if self._busy:
            raise Conflict("another push is in progress; pushes are not queued: retry once it has committed")
        self._busy = True
        try:
            spool = Spool(self._root, PART_BYTES)
            async with receiving(header, self.table, self._convert, spool, self.config, self.engine.weight_version) as session:
                yield session
        finally:
            self._busy = False

    async def commit(self, session: PushSession) -> PushResult:
        """Finish receiving, then load the push into the engine: version + 1."""
        receive_s = time.monotonic() - session.started
        await session.finish()
        policy = session.header.inflight or self.config.inflight
        # The commit point: from here the push completes even if the caller goes away, so the
        # engine never holds weights without the version that names them.
        stats = await shielded(self.apply(session.spool.files, policy, self.engine.weight_version + 1))
        session.committed = True
        self.last_push = PushResult(
            version=self.engine.weight_version,
            bytes_received=session.bytes_received,
            tensors_applied=len(session.tensors),
            receive_s=receive_s,
            requantize_s=session.convert_s,
            apply_s=stats.apply_s,
            pause_ms=stats.pause_ms,
            drain_ms=stats.drain_ms,
            label=session.header.label,
            samples_in_flight=stats.samples_in_flight,
        )
        return self.last_push

    async def apply(self, pushed: dict[str, Path], policy: str, version: int | None) -> ApplyStats:
        """Load tensors already in the engine's format (name -> staged file) and label further
        tokens with `version`."""
        try:
            result = await self.engine.apply_weights(self.weights.plan(pushed), policy, version)
        except Exception:
            # Not a bad push (those fail before this point) but an engine error: put back the
            # current weights of the modules it may have half loaded, then report it.
            log.exception("applying a push failed; restoring the modules it touched")
            await self.engine.apply_weights(self.weights.plan({n: self.weights.files[n] for n in pushed}), policy, None)
            raise
        self.weights.commit(pushed)
        return result

    async def stage(self, stored: dict[str, Path]) -> tuple[dict[str, Path], Spool | None]:
        """Tensors of a weight-store version (name -> shard, in the engine's dtype) in the engine's
        format: the shards themselves when the engine is not quantized, else requantized into a
        staging directory (returned, to discard when the push is dropped)."""
        if self._recipe is None:
            return dict(stored), None
        spool = Spool(self._root, PART_BYTES)

        def convert_all() -> None:
            by_file: dict[Path, list[str]] = {}
            for name, path in stored.items():
                by_file.setdefault(path, []).append(name)
            for path, names in by_file.items():
                with safetensors.safe_open(str(path), "pt") as f:
                    for name in names:
                        spool.add(self._convert(name, f.get_tensor(name)))
            spool.flush()

        try:
            await asyncio.get_running_loop().run_in_executor(None, convert_all)
        except BaseException:
            spool.discard()
            raise
        return spool.files, spool

    def close(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)


@contextlib.asynccontextmanager
async def receiving(
    header: PushHeader, table: ParamTable, convert, spool: Spool, config: ServerConfig, served_version: int
) -> AsyncIterator[PushSession]:
    """A checked push session staging into `spool`; whatever it staged is deleted unless the
    session ends committed."""
    try:
        table.check_header(header, POLICIES)
        if header.expected_version is not None and header.expected_version != served_version:
            raise FailedPrecondition(
                f"header.expected_version: {header.expected_version} is stale, the server serves version {served_version}"
            )
        session = PushSession(header, table, convert, spool, config.push_buffer_mib << 20)
    except BaseException:
        spool.discard()
        raise
    try:
        yield session
    finally:
        await closed(session, spool)


async def closed(session: PushSession, spool: Spool) -> None:
    """Close `session` (waiting for the conversion running now) and drop its staging unless it
    committed. On a thread, so a failed or cancelled push does not stall the event loop, which
    Generate shares in the single-process server; shielded, so a second cancel cannot skip it."""

    def close_and_discard() -> None:
        session.close()
        if not session.committed:
            spool.discard()

    await shielded(asyncio.to_thread(close_and_discard))


async def shielded(coro):
    """Run `coro` to its end even if the caller is cancelled meanwhile (then re-raise the cancel)."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
