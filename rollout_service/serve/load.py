"""LoadWeights: a checkpoint read by the server (weights/checkpoint_source.py) goes through the push
protocol (serve/push.py) as a push of the same tensors would: the same session checks, converts
and requantizes it, the same fencing (expected_version, the push lock) and all-or-nothing commit
apply, and it returns the push's result.

Every file's header is read before the push lock is taken, and every tensor is declared (checked
against the model, a refusal naming its file) before any tensor byte is read. Reading runs on a
thread one chunk ahead of the session; the session's push buffer bounds what waits for conversion,
so a load holds at most push_buffer_mib plus a few chunks, whatever the checkpoint's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator

from rollout_service.api.limits import PushBudget
from rollout_service.errors import InvalidArgument
from rollout_service.observe import tracing
from rollout_service.types import PushResult
from rollout_service.weights.checkpoint_source import CheckpointSource
from rollout_service.weights.manifest import PushHeader
from rollout_service.weights.session import PushSession

log = logging.getLogger(__name__)

PROGRESS_EVERY_BYTES = 1 << 30


async def load_weights(backend, url: str, expected_version: int | None, label: str, inflight: str) -> PushResult:
    """Load the checkpoint at `url` into every replica as a new version through `backend` (its
    begin_push / commit_push, as the PushWeights handlers call them)."""
    source = await asyncio.to_thread(CheckpointSource.open, url, backend.config.load_dirs, backend.config.load_urls)
    PushBudget(backend.config).add(source.tensors)

    async def read_header() -> PushHeader:  # the tensors are declared file by file, to name the file
        return PushHeader((), expected_version, label, inflight, loaded_from=url)

    log.info("loading %s: %d tensors, %.3f GB in %d file(s)", url, len(source.tensors), source.nbytes / 1e9, len(source.shards))
    async with backend.begin_push(read_header) as session:
        _declare(session, source)
        started, reported = time.monotonic(), 0
        with tracing.span("load.read", url=url, files=len(source.shards), tensors=len(source.tensors), bytes=source.nbytes):
            async with contextlib.aclosing(_read_ahead(source.chunks())) as chunks:
                async for index, offset, data in chunks:
                    await session.add_chunk(index, offset, data)
                    if session.bytes_received - reported >= PROGRESS_EVERY_BYTES:
                        reported = session.bytes_received
                        log.info("loading %s: %.2f of %.2f GB read (%.2f GB/s)", url, reported / 1e9, source.nbytes / 1e9,
                                 reported / 1e9 / max(time.monotonic() - started, 1e-9))
        return await backend.commit_push(session)


def _declare(session: PushSession, source: CheckpointSource) -> None:
    """Every tensor of the checkpoint into the session, checked against the served model; a
    refusal names the file and the tensor."""
    for shard in source.shards:
        for spec in shard.tensors:
            try:
                session.declare([spec])
            except InvalidArgument as exc:
                raise InvalidArgument(f"{shard.url}: {spec.name}", str(exc)) from None


async def _read_ahead(chunks: Iterator) -> AsyncIterator:
    """`chunks`' items, each next one read on a thread while the caller handles the last."""
    done = object()
    pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, done))
    try:
        while (item := await pending) is not done:
            pending = asyncio.ensure_future(asyncio.to_thread(next, chunks, done))
            yield item
    finally:  # a read in flight cannot be cut short: let it end, then close the file it reads
        with contextlib.suppress(BaseException):
            await asyncio.shield(pending)
        await asyncio.to_thread(chunks.close)
