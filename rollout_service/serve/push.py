"""A push to every replica or to none (runs in the ingress).

    receive  the stream once: checked, cast to the engine dtype, CRC-32'd, written as shards to the
             weight store's incoming/ (weights/session.py, as the single-process server does); for
             int8/fp8 replicas each tensor is also requantized as it arrives, once for all replicas
    prepare  broadcast: every replica takes the push in its engine's format into its own staging
             area: the requantized parts hard-linked (copied across filesystems), or for bf16 the
             stored shards themselves; nothing is loaded yet
    commit   only when every replica has prepared: the manifest and CURRENT are written (the commit
             point), the coordinator records the version and appends its event
    apply    broadcast: every replica loads its prepared tensors and labels further tokens with the
             new version

A replica that fails to prepare fails the push: every replica drops what it prepared, the version's
shards are deleted, and all keep serving the old version. One push runs at a time in the whole
deployment (the coordinator's push lock, held while the push runs); a second one is ABORTED. The
lock is checked (and renewed) once more right before the commit point, so a push whose lock lapsed
(its renewals failed, another ingress took it) commits nothing; and the weight store commits only
under the newest fencing token (issued with the lock, recorded in the store as a push begins) and
only onto the version the push was numbered after, so neither does a push that stalled between
that check and its commit. After the commit point (CURRENT renamed: the store's commit raises only
before it, and a push whose commit raised is discarded only if the store does not hold it) the push
stands: a replica that fails to load it names itself in `replicas_catching_up` and loads the
version from the store (serve/replica.py), and GetStatus reports the version once all serve it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator

import torch
from ray.serve.handle import DeploymentHandle

from rollout_service.config import ServerConfig
from rollout_service.errors import Conflict, EngineUnavailable
from rollout_service.serve.coordinator import Coordinator
from rollout_service.serve.errors import ApplyFailed, broadcast, broadcast_all
from rollout_service.types import PushResult
from rollout_service.weights.convert import requantizer, store_converter
from rollout_service.weights.manifest import HeaderReader, ParamTable
from rollout_service.weights.service import receiving, shielded
from rollout_service.weights.session import PushSession
from rollout_service.weights.versions import VersionStore, storage_errors

log = logging.getLogger(__name__)

LOCK_TTL_S = 30.0


class ClusterPush:
    def __init__(self, config: ServerConfig, engines: DeploymentHandle, coordinator: Coordinator, store: VersionStore):
        self.config = config
        self.engines = engines
        self.coordinator = coordinator
        self.store = store
        self.table = ParamTable.from_checkpoint(config.model)
        self._dtype = getattr(torch, config.dtype)
        self.last_push: PushResult | None = None

    @contextlib.asynccontextmanager
    async def begin(self, read_header: HeaderReader) -> AsyncIterator[PushSession]:
        owner = uuid.uuid4().hex
        fence = await self.coordinator.lock(owner, LOCK_TTL_S, floor=self.store.fence_mark())
        if not fence:
            raise Conflict("another push is in progress in this deployment; pushes are not queued: retry once it has committed")
        keeper = asyncio.create_task(self._keep_lock(owner))
        try:
            header = await read_header()  # only now that this push holds the lock
            with storage_errors():  # a read-only or full store fails here, before anything is received
                await asyncio.to_thread(self.store.raise_fence, fence)  # a push under an older lock cannot commit now
                # This push becomes the version after the one committed now, or nothing: numbered here,
                # where expected_version is checked, so the commit cannot land on another version.
                committed = self.store.current_version()
                spool = self.store.spool()
            cast_crc: dict[str, int] = {}
            prepare, prepared = requantizer(self._dtype, self.config.recipe(), self.store.incoming)
            convert = store_converter(self._dtype, cast_crc, prepare)
            try:
                async with receiving(header, self.table, convert, spool, self.config, self.store, committed) as session:
                    session.push_owner, session.fence, session.version = owner, fence, committed + 1  # this push's own
                    session.cast_crc, session.prepared = cast_crc, prepared
                    yield session
            finally:  # the replicas took their own links to the requantized parts, or the push failed
                if prepared is not None:
                    await asyncio.to_thread(prepared.discard)
        finally:
            keeper.cancel()
            try:
                await self.coordinator.unlock(owner)
            except EngineUnavailable:
                log.warning("could not release the push lock; it expires in %.0f s", LOCK_TTL_S)

    async def _keep_lock(self, owner: str) -> None:
        while True:
            await asyncio.sleep(LOCK_TTL_S / 3)
            try:
                if not await self.coordinator.refresh(owner, LOCK_TTL_S):
                    log.error("push %s lost its lock (it lapsed or another push took it); it will not commit", owner[:8])
            except EngineUnavailable as exc:
                log.warning("could not renew the push lock: %s", exc)

    async def clean_store(self) -> bool:
        """Drop what pushes cut off mid-way (their ingress killed) left in the weight store, if no
        push is running now (it takes the push lock for that); True when done."""
        owner = uuid.uuid4().hex
        if not await self.coordinator.lock(owner, LOCK_TTL_S, floor=self.store.fence_mark()):
            return False
        try:
            await asyncio.to_thread(self.store.clean)
        finally:
            await self.coordinator.unlock(owner)
        return True

    async def _fence(self, owner: str) -> None:
        """Hold the lock at the commit point, or commit nothing."""
        if not await self.coordinator.refresh(owner, LOCK_TTL_S):
            raise Conflict(
                "this push lost the push lock before its commit (renewals failed or it lapsed, and another push "
                "may be running); nothing was committed: push again"
            )

    async def commit(self, session: PushSession) -> PushResult:
        receive_s = time.monotonic() - session.started
        await session.finish()
        version = session.version
        files = self.store.adopt(session.spool.dir, session.spool.files, version)
        push_id = f"v{version}-{uuid.uuid4().hex[:8]}"
        try:
            start = time.monotonic()
            prepared = await session.prepared_files()
            requantized = None if prepared is None else {n: str(p) for n, p in prepared.items()}
            flush_s = time.monotonic() - start
            stored = {n: str(p) for n, p in files.items()}
            recipe = self.config.recipe()
            requantized_for = recipe.fingerprint() if recipe is not None else None
            prepare_s = await broadcast_all(self.engines, "prepare", push_id, version, stored, requantized, requantized_for)
            await self._fence(session.push_owner)
        except BaseException as exc:
            log.warning("push %s failed to prepare (%s); every replica stays on version %d", push_id, exc, version - 1)
            with contextlib.suppress(Exception):
                await broadcast_all(self.engines, "abort", push_id)
            self.store.discard(files)
            raise
        prepare_s = flush_s + max(prepare_s, default=0.0)
        return await shielded(self._commit_and_apply(session, push_id, version, files, receive_s, prepare_s))

    async def _commit_and_apply(self, session, push_id, version, files, receive_s, prepare_s) -> PushResult:
        crc = {**session.crc32, **session.cast_crc}
        warnings: list[str] = []
        try:
            manifest = await asyncio.to_thread(
                self.store.commit, version, files, crc, session.header.label, session.fence, warnings
            )
        except BaseException as exc:  # e.g. the disk is full, or fenced off: nothing committed, every replica drops its prepared push
            if not await asyncio.to_thread(self.store.holds, version, files):
                with contextlib.suppress(Exception):
                    await broadcast_all(self.engines, "abort", push_id)
                self.store.discard(files)
                raise
            # Past the commit point the version stands, whatever failed: never discard it.
            log.exception("version %d is committed, though its commit raised afterwards; it stands", version)
            warnings.append(f"version {version} is committed, though its commit raised afterwards ({exc})")
            manifest = self.store.manifest(version)
        session.committed = True
        try:
            await self.coordinator.set_version(version, self.store.manifest_path(version), manifest.label)
        except EngineUnavailable as exc:  # the store has it; the ingress writes it back when Redis returns
            log.warning("version %d committed but not recorded in the coordinator: %s", version, exc)
        policy = session.header.inflight or self.config.inflight
        outcomes = await broadcast(self.engines, "apply", push_id, policy)
        applied = [a for a in outcomes if not isinstance(a, BaseException)]
        failed = [e for e in outcomes if isinstance(e, BaseException)]
        for exc in failed:
            log.warning("version %d is committed; a replica failed to load it and catches up from the store: %s", version, exc)
        catching_up = sorted(e.replica_id if isinstance(e, ApplyFailed) else f"unknown ({e})" for e in failed)
        self.last_push = session.result(version, receive_s, prepare_s, applied, catching_up, warnings)
        return self.last_push
