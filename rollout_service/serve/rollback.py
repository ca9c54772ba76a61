"""Rollback (RolloutService.Rollback): a kept version's weights served again as a new version,
through the push protocol's lock, fencing, numbering and all-or-nothing commit (serve/push.py).

    lock     the push lock (a push or rollback running: Conflict), its fencing token raised in
             the store; then numbered committed + 1, where expected_version is checked as a push's
    build    the new version in the store: the kept version's shards by reference, plus the
             checkpoint's values of the tensors pushed since that it lacks (weights/rollback.py)
    prepare  every replica is told of the version with no parts: it loads the version whole from
             the store at apply, as a replica that missed a push does (serve/replica.py), checking
             its CRC-32s and requantizing it where the engine is int8/fp8
    commit   the lock checked once more, then the store's compare-and-set commit (the commit point)
    apply    as a push's (`Push.publish`): the coordinator records it and appends its event, every
             replica loads it, versions beyond keep are deleted

Anything failing before the commit point changes nothing: the replicas drop the prepared version,
its new shards are deleted, all keep serving the old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from pathlib import Path

import torch

from rollout_service.errors import FailedPrecondition
from rollout_service.serve.push import Push
from rollout_service.serve.replicas import broadcast_all
from rollout_service.types import PushResult
from rollout_service.weights.rollback import (
    checkpoint_values,
    committed_as,
    kept_version,
)
from rollout_service.weights.service import uncancellable
from rollout_service.weights.versions import storage_errors

log = logging.getLogger(__name__)


async def rollback(push: Push, to_version: int, expected_version: int | None) -> PushResult:
    """Serve kept version `to_version` again as the version after the committed one."""
    store = push.store
    async with push.locked() as (owner, fence):
        with storage_errors():
            await asyncio.to_thread(store.raise_fence, fence)  # a push under an older lock cannot commit now
            committed = store.current_version()
        if expected_version is not None and expected_version != committed:
            raise FailedPrecondition(f"expected_version: {expected_version} is stale, the last committed version is {committed}")
        target = await asyncio.to_thread(kept_version, store, to_version)
        version = committed + 1
        push_id = f"v{version}-rollback-{uuid.uuid4().hex[:8]}"
        files: dict[str, Path] = {}
        spool = None
        try:
            with storage_errors():
                current = await asyncio.to_thread(store.manifest, committed)
                spool, crc32 = await asyncio.to_thread(
                    checkpoint_values, store, target, current, push.config.model, getattr(torch, push.config.dtype),
                )
                if spool.files:
                    files = store.adopt(spool.dir, spool.files, version)
                else:
                    spool.discard()
            await push.replicas.locate()
            await broadcast_all(push.replicas, "prepare", push_id, version, {})  # no parts: from the store at apply
            await push.hold_lock(owner)
        except BaseException as exc:
            log.warning("rollback %s failed before its commit (%s); every replica stays on version %d", push_id, exc, committed)
            await _abort(push, push_id)
            store.discard(files)
            if spool is not None and not files:  # written, not adopted
                spool.discard()
            raise
        return await uncancellable(_commit_and_apply(push, to_version, version, push_id, files, crc32, fence))


async def _commit_and_apply(
    push: Push, to_version: int, version: int, push_id: str, files: dict[str, Path], crc32: dict[str, int], fence: int,
) -> PushResult:
    store = push.store
    started = time.monotonic()
    warnings: list[str] = []
    try:
        manifest = await asyncio.to_thread(
            store.commit, version, files, crc32, f"rollback to v{to_version}", fence, warnings, False, to_version,
        )
    except BaseException as exc:  # fenced off, the disk full: nothing committed, every replica drops the prepared version
        if not await asyncio.to_thread(committed_as, store, version, fence):
            await _abort(push, push_id)
            store.discard(files)
            raise
        # Past the commit point the version stands, whatever failed: never discard it.
        log.exception("version %d (a rollback) is committed, though its commit raised afterwards; it stands", version)
        warnings.append(f"version {version} is committed, though its commit raised afterwards ({exc})")
        manifest = store.manifest(version)
    _, catching_up = await push.publish(version, push_id, manifest.label, push.config.inflight, warnings)
    log.info("version %d serves the weights of version %d again (%d tensors, %d from the checkpoint)",
             version, to_version, len(manifest.tensors), len(files))
    # A replica loading a version from the store reports no figures (serve/replica.py `apply`), so
    # apply_s is measured here: from the commit until every replica serves it.
    push.last_push = PushResult(
        version=version, bytes_received=0, tensors_applied=len(manifest.tensors), receive_s=0.0, requantize_s=0.0,
        apply_s=time.monotonic() - started, pause_ms=0.0, label=manifest.label, replicas_catching_up=catching_up,
        warnings=warnings,
    )
    return push.last_push


async def _abort(push: Push, push_id: str) -> None:
    """Every replica forgets the prepared version."""
    with contextlib.suppress(Exception):
        await broadcast_all(push.replicas, "abort", push_id)
