"""The single-process server's pushes: the protocol of Serve's (serve/push.py) with this process's
engine as the only replica, so both backends keep the same weight store and a restarted server
comes back on the last committed version (`resume`).

    receive  the stream once: checked, cast to the engine dtype, CRC-32'd, written as shards to the
             weight store's incoming/ (weights/session.py)
    prepare  the shards converted into the engine's format (requantized for int8/fp8); nothing loaded
    commit   the manifest, then CURRENT, written: the commit point
    apply    the engine loads the prepared tensors and labels further tokens with the new version

A push that fails before the commit leaves the store and the engine as they were. After it the push
stands: an engine that fails to load it is given the whole version from the store once more; if
that fails too the push reports UNAVAILABLE, and the server loads the version when it restarts.
One push runs at a time; a second is rejected (ABORTED), not queued: a trainer that pushes twice at
once has a bug, and queueing would hide it behind a long wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from rollout_service.config import ServerConfig
from rollout_service.errors import Conflict, EngineUnavailable
from rollout_service.types import ApplyStats, PushResult
from rollout_service.weights.convert import store_converter
from rollout_service.weights.manifest import PushHeader
from rollout_service.weights.service import PART_BYTES, WeightService, receiving, shielded
from rollout_service.weights.session import PushSession
from rollout_service.weights.staging import Spool
from rollout_service.weights.versions import VersionStore

log = logging.getLogger(__name__)


class LocalPush:
    def __init__(self, weights: WeightService, store: VersionStore, config: ServerConfig):
        self.weights = weights
        self.engine = weights.engine
        self.store = store
        self.config = config
        self._dtype = getattr(torch, config.dtype)
        self._busy = False
        self.last_push: PushResult | None = None

    async def resume(self) -> int:
        """Load the store's current version when the engine is behind it (at start, after a
        restart; after a committed push the engine failed to load); returns the served version."""
        version = self.store.current_version()
        if version > self.engine.weight_version:
            start = time.monotonic()
            await self.weights.load_version(self.store, version, self.config.inflight)
            log.info("loaded weight version %d from %s in %.1f s", version, self.store.root, time.monotonic() - start)
        return self.engine.weight_version

    @contextlib.asynccontextmanager
    async def begin(self, header: PushHeader) -> AsyncIterator[PushSession]:
        if self._busy:
            raise Conflict("another push is in progress; pushes are not queued: retry once it has committed")
        self._busy = True
        try:
            await self.resume()  # the next version is numbered after the store's, which the engine must serve
            cast_crc: dict[str, int] = {}
            spool = Spool(self.store.incoming, PART_BYTES)
            convert = store_converter(self._dtype, cast_crc)
            async with receiving(header, self.weights.table, convert, spool, self.config, self.engine.weight_version) as session:
                session.cast_crc = cast_crc
                yield session
        finally:
            self._busy = False

    async def commit(self, session: PushSession) -> PushResult:
        receive_s = time.monotonic() - session.started
        await session.finish()
        version = self.store.current_version() + 1
        files = self.store.adopt(session.spool.dir, session.spool.files, version)
        start = time.monotonic()
        try:
            prepared, spool = await self.weights.stage(files)
        except BaseException:
            self.store.discard(version)
            raise
        prepare_s = time.monotonic() - start
        return await shielded(self._commit_and_apply(session, version, files, prepared, spool, receive_s, prepare_s))

    async def _commit_and_apply(
        self, session: PushSession, version: int, files: dict[str, Path], prepared: dict[str, Path],
        spool: Spool | None, receive_s: float, prepare_s: float,
    ) -> PushResult:
        crc = {**session.crc32, **session.cast_crc}
        try:
            await asyncio.to_thread(self.store.commit, version, files, crc, session.header.label)
        except BaseException:  # e.g. the disk is full: nothing committed, the old version serves on
            self.store.discard(version)
            if spool is not None:
                spool.discard()
            raise
        session.committed = True
        policy = session.header.inflight or self.config.inflight
        try:
            stats = await self.weights.apply(prepared, policy, version)
        except Exception as exc:  # apply put the modules it touched back: the engine serves version - 1
            log.exception("version %d is committed but the engine failed to load it; loading it whole from the store", version)
            try:
                await self.resume()
            except Exception as again:
                raise EngineUnavailable(
                    f"weight version {version} is committed, but the engine failed to load it ({exc}) and to load it "
                    f"from the weight store ({again}); it serves version {self.engine.weight_version} until the "
                    f"server restarts, which loads version {version}"
                ) from None
            stats = ApplyStats()
        self.last_push = PushResult(
            version=version,
            bytes_received=session.bytes_received,
            tensors_applied=len(session.tensors),
            receive_s=receive_s,
            requantize_s=session.convert_s + prepare_s,
            apply_s=stats.apply_s,
            pause_ms=stats.pause_ms,
            drain_ms=stats.drain_ms,
            label=session.header.label,
            samples_in_flight=stats.samples_in_flight,
        )
        return self.last_push
