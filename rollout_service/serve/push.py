"""A push to every replica or to none (runs in the ingress): the only push protocol, for a Ray Serve
deployment and for the single-process server, whose engine is its only replica (serve/replicas.py).

    receive  the stream once: checked, cast to the engine dtype, CRC-32'd, written as shards to the
             weight store's spool (weights/session.py); for int8/fp8 replicas each tensor is also
             requantized as it arrives, once for all replicas
    prepare  as the parts in the engines' format are written (the requantized ones, else the
             stored shards), each is handed to every replica (serve/fanout.py: a Ray object, read
             by the replicas of each node from Ray's object store, so no replica needs the
             ingress's filesystem), which stages it; once all are, every replica is asked whether it
             has them all; nothing is loaded yet
    commit   only when every replica has prepared: the shards are adopted into the store, the
             manifest and CURRENT are written (the commit point), the coordinator records the
             version and appends its event
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

Each phase is a span (observe/tracing.py) under the call's: push.receive, push.prepare (each
replica's replica.prepare under it), push.commit, push.apply (each replica's replica.apply).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import torch
from opentelemetry.trace import Span

from rollout_service.config import ServerConfig
from rollout_service.errors import Conflict, EngineUnavailable
from rollout_service.observe import tracing
from rollout_service.serve.coordinator import Coordinator
from rollout_service.serve.fanout import Fanout
from rollout_service.serve.replicas import ApplyFailed, Replicas, broadcast_all
from rollout_service.types import ApplyStats, PushResult
from rollout_service.weights.engine_format import requantizer, store_converter
from rollout_service.weights.manifest import HeaderReader, ParamTable
from rollout_service.weights.service import receiving, uncancellable
from rollout_service.weights.session import PushSession
from rollout_service.weights.staging import ShardWriter
from rollout_service.weights.versions import VersionStore, storage_errors

log = logging.getLogger(__name__)

LOCK_TTL_S = 30.0


@dataclasses.dataclass
class Claim:
    """What a push holds while its session receives: the push lock (its owner token and fencing
    token), the version it will commit as and its id, the CRC-32s of the tensors it cast, its
    tensors requantized as they arrive (None: the engines are not quantized), and the handing of
    its parts to the replicas."""

    owner: str
    fence: int
    version: int
    push_id: str
    cast_crc: dict[str, int]
    requantized: ShardWriter | None
    fanout: Fanout
    receive: Span  # the push.receive span, ended as the commit begins
    aborted: bool = False


class Push:
    def __init__(
        self, config: ServerConfig, replicas: Replicas, coordinator: Coordinator, store: VersionStore, table: ParamTable,
        requantize_into: Path | None = None,
    ):
        """`table`: the checkpoint's parameters, which a push's tensors are checked against.
        `requantize_into`: where an int8/fp8 push's parts are written as they arrive (default: the
        staging directory; the single-process server gives its engine's, whose staging links them
        on the same filesystem, never a copy)."""
        self.config = config
        self.replicas = replicas
        self.coordinator = coordinator
        self.store = store
        self.table = table
        self._requantize_into = requantize_into or config.staging_root
        self._dtype = getattr(torch, config.dtype)
        self.last_push: PushResult | None = None
        # The pushes this ingress is receiving. Usually one; two when one's lock lapsed while it
        # ran and another began (its commit is then refused by the fence).
        self._claims: dict[PushSession, Claim] = {}

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[tuple[str, int]]:
        """The push lock, held (and renewed) while the body runs: (its owner token, its fencing
        token). Conflict when another push (or rollback, serve/rollback.py) holds it."""
        owner = uuid.uuid4().hex
        fence = await self.coordinator.lock(owner, LOCK_TTL_S, floor=self.store.fence_mark())
        if not fence:
            raise Conflict("another push is in progress in this deployment; pushes are not queued: retry once it has committed")
        keeper = asyncio.create_task(self._keep_lock(owner))
        try:
            yield owner, fence
        finally:
            keeper.cancel()
            try:
                await self.coordinator.unlock(owner)
            except EngineUnavailable:
                log.warning("could not release the push lock; it expires in %.0f s", LOCK_TTL_S)

    @contextlib.asynccontextmanager
    async def begin(self, read_header: HeaderReader) -> AsyncIterator[PushSession]:
        async with self.locked() as (owner, fence):
            header = await read_header()  # only now that this push holds the lock
            with storage_errors():  # a read-only or full store fails here, before anything is received
                await asyncio.to_thread(self.store.raise_fence, fence)  # a push under an older lock cannot commit now
                # This push becomes the version after the one committed now, or nothing: numbered here,
                # where expected_version is checked, so the commit cannot land on another version.
                committed = self.store.current_version()
                spool = self.store.spool()
            version = committed + 1
            push_id = f"v{version}-{uuid.uuid4().hex[:8]}"
            recipe = self.config.recipe()
            requantized = fanout = receive = None
            try:
                await self.replicas.locate()
                fanout = Fanout(self.replicas, push_id, version, recipe.fingerprint() if recipe is not None else None)
                # The parts every replica stages: the requantized ones, else the stored shards themselves.
                prepare, requantized = requantizer(self._dtype, recipe, self._requantize_into, fanout.part_written)
                if requantized is None:
                    spool.on_part = fanout.part_written
                receive = tracing.start("push.receive", version=version, push_id=push_id)
                claim = Claim(owner, fence, version, push_id, {}, requantized, fanout, receive)
                convert = store_converter(self._dtype, claim.cast_crc, prepare)
            except BaseException as exc:
                tracing.end(receive, exc)
                spool.discard()
                if requantized is not None:
                    requantized.discard()
                if fanout is not None:
                    await fanout.close()
                raise
            try:
                async with receiving(header, self.table, convert, spool, self.config, self.store, committed) as session:
                    self._claims[session] = claim
                    try:
                        yield session
                    except BaseException as exc:  # a receive that failed; an ended receive span is left alone
                        tracing.end(claim.receive, exc)
                        raise
                    finally:
                        tracing.end(claim.receive)
                        del self._claims[session]
                        await fanout.close()
                        if not session.committed and fanout.parts:  # the replicas drop what they staged
                            await self._abort(claim)
            except BaseException as exc:  # a refusal before the session (a stale expected_version) too
                tracing.end(claim.receive, exc)  # an ended span is left alone
                raise
            finally:
                tracing.end(claim.receive)
                if fanout is not None:
                    await fanout.close()
                if requantized is not None:  # the replicas staged their own copies, or the push failed
                    await asyncio.to_thread(requantized.discard)

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

    async def _abort(self, claim: Claim) -> None:
        """Every replica drops what it staged of this push (once)."""
        if not claim.aborted:
            claim.aborted = True
            with contextlib.suppress(Exception):
                await broadcast_all(self.replicas, "abort", claim.push_id)

    async def hold_lock(self, owner: str) -> None:
        """Hold the lock at the commit point, or commit nothing."""
        if not await self.coordinator.refresh(owner, LOCK_TTL_S):
            raise Conflict(
                "this push lost the push lock before its commit (renewals failed or it lapsed, and another push "
                "may be running); nothing was committed: push again"
            )

    async def commit(self, session: PushSession) -> PushResult:
        claim = self._claims[session]
        receive_s = time.monotonic() - session.started
        with tracing.ended(claim.receive):
            await session.finish()  # the last stored part is written: handed to the replicas
            tracing.note(claim.receive, tensors=len(session.header.tensors), bytes=session.bytes_received)
        version, push_id = claim.version, claim.push_id
        files: dict[str, Path] = {}
        committing = None
        try:
            start = time.monotonic()
            with tracing.span("push.prepare", version=version, push_id=push_id) as span:
                if claim.requantized is not None:  # its last part is written: handed to the replicas
                    await asyncio.to_thread(claim.requantized.flush)
                parts = await claim.fanout.finish()
                tracing.note(span, parts=len(set(parts.values())))
                await broadcast_all(self.replicas, "prepare", push_id, version, parts, tracing.carrier(tracing.within(span)))
            prepare_s = time.monotonic() - start  # what the replicas took beyond the receive
            committing = tracing.start("push.commit", version=version, push_id=push_id)
            files = self.store.adopt(session.spool.dir, session.spool.files, version)
            await self.hold_lock(claim.owner)
        except BaseException as exc:
            tracing.end(committing, exc)
            log.warning("push %s failed to prepare (%s); every replica stays on version %d", push_id, exc, version - 1)
            await self._abort(claim)
            self.store.discard(files)
            raise
        return await uncancellable(self._commit_and_apply(session, claim, files, receive_s, prepare_s, committing))

    async def _commit_and_apply(
        self, session: PushSession, claim: Claim, files: dict[str, Path], receive_s: float, prepare_s: float,
        committing: Span,
    ) -> PushResult:
        with tracing.ended(committing):
            label, warnings = await self._commit(session, claim, files)
        policy = session.header.inflight or self.config.inflight
        applied, catching_up = await self.publish(claim.version, claim.push_id, label, policy, warnings)
        self.last_push = session.result(claim.version, receive_s, prepare_s, applied, catching_up, warnings)
        return self.last_push

    async def _commit(self, session: PushSession, claim: Claim, files: dict[str, Path]) -> tuple[str, list[str]]:
        """The commit point (the store's manifest and CURRENT); the version's label and the
        commit's warnings."""
        version = claim.version
        crc = {**session.crc32, **claim.cast_crc}
        warnings: list[str] = []
        try:
            manifest = await asyncio.to_thread(
                self.store.commit, version, files, crc, session.header.label, claim.fence, warnings, False
            )
        except BaseException as exc:  # e.g. the disk is full, or fenced off: nothing committed, every replica drops its prepared push
            if not await asyncio.to_thread(self.store.holds, version, files):
                await self._abort(claim)
                self.store.discard(files)
                raise
            # Past the commit point the version stands, whatever failed: never discard it.
            log.exception("version %d is committed, though its commit raised afterwards; it stands", version)
            warnings.append(f"version {version} is committed, though its commit raised afterwards ({exc})")
            manifest = self.store.manifest(version)
        session.committed = True
        return manifest.label, warnings

    async def publish(
        self, version: int, push_id: str, label: str, policy: str, warnings: list[str],
    ) -> tuple[list[ApplyStats], list[str]]:
        """After the commit point of `version` (push `push_id`): record it in the coordinator, have
        every replica apply it, then delete the versions beyond keep. Returns what the replicas that
        applied it took, and the ids of those that catch up from the store instead."""
        try:
            await self.coordinator.set_version(version, self.store.manifest_path(version), label)
        except EngineUnavailable as exc:  # the store has it; the ingress writes it back when Redis returns
            log.warning("version %d committed but not recorded in the coordinator: %s", version, exc)
        with tracing.span("push.apply", version=version, push_id=push_id, policy=policy) as span:
            outcomes = await self.replicas.broadcast("apply", push_id, policy, tracing.carrier(tracing.within(span)))
            applied = [a for a in outcomes if not isinstance(a, BaseException)]
            failed = [e for e in outcomes if isinstance(e, BaseException)]
            for exc in failed:
                log.warning("version %d is committed; a replica failed to load it and catches up from the store: %s", version, exc)
            catching_up = sorted(e.replica_id if isinstance(e, ApplyFailed) else f"unknown ({e})" for e in failed)
            tracing.note(span, replicas_applied=len(applied), replicas_catching_up=len(catching_up))
        # Only now: deleting old versions (seconds for a large model) must not stand between the
        # commit and the apply, where a replica would take the push for an orphan (serve/replica.py).
        await asyncio.to_thread(self.store.delete_old_versions, version, warnings)
        return applied, catching_up
