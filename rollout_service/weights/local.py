"""The single-process server's pushes: the protocol of Serve's (serve/push.py) with this process's
engine as the only replica, so both backends keep the same weight store and a restarted server
comes back on the last committed version (`resume`).

    receive  the stream once: checked, cast to the engine dtype, CRC-32'd, written as shards to the
             weight store's incoming/ (weights/session.py); for an int8/fp8 engine each tensor is
             also requantized as it arrives (prepare, overlapped with receiving); nothing loaded
    commit   the manifest, then CURRENT, written: the commit point
    apply    the engine loads the prepared tensors and labels further tokens with the new version

Without `weights_dir` the store is temporary (`local_store`): versions are not kept across restarts.
A push that fails before the commit leaves the store and the engine as they were. After it the push
stands (the store's commit raises only before its commit point, and a push whose commit raised is
discarded only if the store does not hold it): an engine that fails to load it is given the whole
version from the store once more; if that fails too the push reports UNAVAILABLE, and the server
loads the version when it restarts.
One push runs at a time; a second is rejected (ABORTED), not queued: a trainer that pushes twice at
once has a bug, and queueing would hide it behind a long wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import torch

from rollout_service.config import ServerConfig
from rollout_service.errors import Conflict, EngineUnavailable
from rollout_service.types import ApplyStats, PushResult
from rollout_service.weights.convert import store_converter
from rollout_service.weights.manifest import HeaderReader
from rollout_service.weights.service import WeightService, receiving, shielded
from rollout_service.weights.session import PushSession
from rollout_service.weights.versions import VersionStore, open_store, storage_errors

log = logging.getLogger(__name__)


def local_store(config: ServerConfig) -> VersionStore:
    """The single-process server's weight store, held alone while it runs: `weights_dir` (kept,
    resumed from at start), or without it a temporary one under the staging directory, deleted at
    stop, so a new run starts from the checkpoint and never on an earlier run's pushes."""
    if config.weights_dir is not None:
        return open_store(config, shared=False)
    config.staging_root.mkdir(parents=True, exist_ok=True)
    store = VersionStore(Path(tempfile.mkdtemp(prefix="store-", dir=config.staging_root)), config.keep_versions, temporary=True)
    store.lock()
    log.info("pushed versions are not kept across restarts: give --weights-dir to resume on them after one")
    return store


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
            # Shielded: a load cut off half-way would leave modules of two versions under one number.
            await shielded(self.weights.load_version(self.store, version, self.config.inflight))
            manifest = self.store.current()
            log.warning(
                "serving weight version %d (%r, committed %s) from %s, loaded in %.1f s", version, manifest.label,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.created)), self.store.root,
                time.monotonic() - start,
            )
        return self.engine.weight_version

    @contextlib.asynccontextmanager
    async def begin(self, read_header: HeaderReader) -> AsyncIterator[PushSession]:
        if self._busy:
            raise Conflict("another push is in progress; pushes are not queued: retry once it has committed")
        self._busy = True
        session: PushSession | None = None
        try:
            header = await read_header()  # only now that this push holds the store
            await self.resume()  # the next version is numbered after the store's, which the engine must serve
            cast_crc: dict[str, int] = {}
            with storage_errors():  # a read-only or full store fails here, before anything is received
                spool = self.store.spool()
            prepare, prepared = self.weights.preparer()
            convert = store_converter(self._dtype, cast_crc, prepare)
            try:
                async with receiving(header, self.weights.table, convert, spool, self.config, self.store, self.store.current_version()) as session:
                    session.cast_crc, session.prepared = cast_crc, prepared
                    yield session
            finally:
                # After receiving's exit, which waited for the conversion running now.
                if prepared is not None and not (session is not None and session.committed):
                    prepared.discard()
        finally:
            self._busy = False

    async def commit(self, session: PushSession) -> PushResult:
        receive_s = time.monotonic() - session.started
        await session.finish()
        version = self.store.current_version() + 1
        files = self.store.adopt(session.spool.dir, session.spool.files, version)
        start = time.monotonic()
        try:
            requantized = await session.prepared_files()
            prepared = files if requantized is None else requantized
        except BaseException:
            self.store.discard(files)
            raise
        prepare_s = time.monotonic() - start
        return await shielded(self._commit_and_apply(session, version, files, prepared, receive_s, prepare_s))

    async def _commit_and_apply(
        self, session: PushSession, version: int, files: dict[str, Path], prepared: dict[str, Path],
        receive_s: float, prepare_s: float,
    ) -> PushResult:
        crc = {**session.crc32, **session.cast_crc}
        warnings: list[str] = []
        try:
            await asyncio.to_thread(self.store.commit, version, files, crc, session.header.label, None, warnings)
        except BaseException as exc:  # e.g. the disk is full: nothing committed, the old version serves on
            if not await asyncio.to_thread(self.store.holds, version, files):
                self.store.discard(files)
                raise
            # Past the commit point the version stands, whatever failed: never discard it.
            log.exception("version %d is committed, though its commit raised afterwards; it stands", version)
            warnings.append(f"version {version} is committed, though its commit raised afterwards ({exc})")
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
            stats = ApplyStats()  # the whole version's load is not this push's
        self.last_push = session.result(version, receive_s, prepare_s, [stats], [], warnings)
        return self.last_push
