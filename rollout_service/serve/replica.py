"""EngineReplica: one vLLM engine as a replica of the deployment: a Ray Serve replica
(serve/app.py), or the single-process server's only one (server.py).

Data plane: `generate_stream` (routed to one replica by serve/routing.py). Control plane, broadcast
to every replica by serve/push.py: `take` (stage a part of a push in this replica's staging, as
the ingress writes it: serve/fanout.py), `prepare` (check every part was taken), `apply` (load it
and label further tokens with its number), `abort`. A replica that starts
after pushes (autoscaling, a restart) loads the weight store's current version before it starts
serving; a follower task also catches up a replica that missed a broadcast (it started during a push).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from rollout_service import faults
from rollout_service.config import ServerConfig
from rollout_service.engine import RolloutEngine
from rollout_service.errors import EngineUnavailable, StorageFull, StorageUnavailable
from rollout_service.observe import engine_metrics, tracing
from rollout_service.serve.replicas import ApplyFailed
from rollout_service.types import ApplyStats, Completion, GenerateRequest, ServerStatus
from rollout_service.weights.service import WeightService
from rollout_service.weights.staging import ShardWriter
from rollout_service.weights.versions import VersionStore, storage_errors

log = logging.getLogger("rollout_service.replica")

FOLLOW_S = 2.0
FOLLOW_MAX_S = 120.0
# A prepared push never applied (its ingress died between prepare and commit, or the commit failed
# before the abort broadcast) is dropped after this long, so it cannot hold catching up back for
# good. Safe at any age: an apply that finds its push gone loads the committed version from the store.
PREPARED_TTL_S = 120.0
# A prepared push the store has committed whose apply has not come this long after the follower saw
# the commit: its ingress died after the commit point, and the one Serve starts in its place knows
# nothing of it. The follower applies it (the apply broadcast follows a commit within a second).
ORPHANED_S = 10.0
ABORTED_KEPT = 16


@dataclass
class Prepared:
    version: int
    spool: ShardWriter | None  # the parts taken so far; None: they are not taken here
    at: float  # the event loop's time of the last part taken (or of the prepare): expiry counts from it
    files: dict[str, Path] | None = None  # once prepared; None: the version loads from the store at apply
    committed_seen_at: float | None = None  # when the follower first saw the store commit it


class EngineReplica:
    """Start one with `await EngineReplica.start(...)` (Serve's deployment class starts itself in
    its async constructor, serve/app.py)."""

    @classmethod
    async def start(cls, config: ServerConfig, replica_id: str, store: VersionStore) -> EngineReplica:
        replica = cls.__new__(cls)
        await replica._start(config, replica_id, store)
        return replica

    async def _start(self, config: ServerConfig, replica_id: str, store: VersionStore) -> None:
        """`store`: the deployment's weight store, opened by the caller (shared by Serve's
        processes; held alone by the single-process server, whose ingress uses the same object)."""
        self.replica_id = replica_id
        self.config = config
        self.store = store
        self.engine = await RolloutEngine.start(config)
        try:
            self.weights = WeightService(self.engine, config)
            self._prepared: dict[str, Prepared] = {}
            self._apply_lock = asyncio.Lock()
            self._loaded = {"push": 0, "store": 0}
            # The last pushes aborted: a take of one that arrives after its abort is dropped, not
            # staged afresh to wait for the TTL (and hold catching up back meanwhile).
            self._aborted: collections.deque[str] = collections.deque(maxlen=ABORTED_KEPT)
            await self.catch_up()
        except BaseException:  # e.g. the store's version does not load: no engine left running
            self.close()
            raise
        self._follower = asyncio.create_task(self._follow())
        log.info("replica %s ready at weight version %d", self.replica_id, self.engine.weight_version)

    # ---- data plane ---------------------------------------------------------------------------

    async def generate_stream(
        self, req: GenerateRequest, replica_id: str = "", carried: dict[str, str] | None = None,
    ) -> AsyncIterator[Completion]:
        """`replica_id`: set for a part of a batch the ingress split (serve/split.py): the replica
        the router sends it to, and the ingress has already decided the deployment has room.
        `carried`: the call's request id and trace context (observe/tracing.py `carrier`)."""
        with tracing.continued(carried, "generate_stream") as parent, tracing.span(
            "replica.generate", parent, replica_id=self.replica_id, prompts=len(req.prompts),
        ) as span:
            generating = self.engine.generate(req, refuse_when_full=not replica_id, trace=tracing.within(span))
            async with contextlib.aclosing(generating) as stream:
                async for c in stream:
                    yield c

    async def served(self) -> tuple[dict, ServerStatus]:
        """(registry entry, status) of this replica, read together."""
        return await self.info(), self.engine.status()

    async def info(self) -> dict:
        """This replica's registry entry."""
        return {
            "replica_id": self.replica_id,
            "version": self.engine.weight_version,
            "node": os.uname().nodename,
            "pid": os.getpid(),
            "running": self.engine.status().counters.engine_requests_running,
            # Versions loaded from their push's parts vs whole from the store (a late start, a missed push).
            "loaded": dict(self._loaded),
        }

    async def engine_metrics(self) -> tuple[str, str]:
        """(this replica's id, its engine's own metrics in Prometheus' text format): the ingress
        merges every replica's into its scrape (observe/engine_metrics.py)."""
        return self.replica_id, engine_metrics.exposition()

    async def check_health(self) -> None:
        """Serve's health check: a dead engine gets this replica replaced."""
        await self.engine.check_health()

    async def snapshot(self) -> bytes:
        return await self.engine.snapshot()

    async def pause(self, mode: str, stepped: bool = False) -> None:
        await self.engine.pause(mode, stepped)

    async def resume(self) -> None:
        await self.engine.resume()

    # ---- control plane: a push in two phases --------------------------------------------------

    async def take(
        self, push_id: str, version: int, fingerprint: str | None, part: str, source: Path | memoryview | None,
        names: list[str],
    ) -> None:
        """Stage one part of push `push_id` (serve/fanout.py: its file on this machine, or its
        bytes), which holds tensors `names` in the engine format of recipe `fingerprint` (None: not
        quantized). A replica whose engine holds its parameters another way (a redeploy under way),
        or that cannot reach the part (`source` None), takes no more of the push and loads the
        version from the store once committed."""
        if push_id in self._aborted:  # a take delivered after its push's abort
            return
        prepared = self._prepared.get(push_id)
        if prepared is None:
            spool = self.weights.spool() if fingerprint == self.weights.recipe_fingerprint else None
            prepared = self._prepared[push_id] = Prepared(version, spool, asyncio.get_running_loop().time())
        if prepared.spool is not None and source is None:
            self._discard(prepared)
            prepared.spool = None
        if prepared.spool is None:
            return
        prepared.at = asyncio.get_running_loop().time()  # a long push is not taken for an abandoned one
        try:
            faults.fault_point("replica.take")
            with storage_errors():  # a full or read-only disk is said as such, not as a replica failing
                await asyncio.to_thread(prepared.spool.take, part, source, names)
        except (StorageFull, StorageUnavailable):
            raise
        except Exception as exc:
            raise EngineUnavailable(f"replica {self.replica_id} failed to stage {part} of version {version}: {exc}") from exc

    async def prepare(self, push_id: str, version: int, parts: dict[str, str], carried: dict[str, str] | None = None) -> float:
        """Every part of `version` was handed out (`take`): check this replica staged them all
        (`parts`: tensor name -> part); returns seconds. A replica that started while the parts
        were handed out, or that ignored them, loads the version from the store at apply.
        `carried`: the push's request id and trace context (observe/tracing.py `carrier`)."""
        with tracing.continued(carried, "prepare") as parent, tracing.span(
            "replica.prepare", parent, replica_id=self.replica_id, version=version, tensors=len(parts),
        ):
            return await self._prepare(push_id, version, parts)

    async def _prepare(self, push_id: str, version: int, parts: dict[str, str]) -> float:
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            faults.fault_point("replica.prepare")
        except Exception as exc:
            raise EngineUnavailable(f"replica {self.replica_id} failed to prepare version {version}: {exc}") from exc
        prepared = self._prepared.setdefault(push_id, Prepared(version, None, start))
        prepared.at = start
        if prepared.spool is not None and parts.keys() <= prepared.spool.files.keys():
            prepared.files = {name: prepared.spool.files[name] for name in parts}
        else:
            self._discard(prepared)
            prepared.spool = None
        return loop.time() - start

    async def apply(self, push_id: str, policy: str, carried: dict[str, str] | None = None) -> ApplyStats:
        """Load a prepared push: version N+1 only onto N. A push carries only the tensors it
        changed, so loaded onto any other version the engine would serve a mix labelled N+1; then
        (and when the push is not here: this replica started after its prepare, or it expired) the
        committed version is loaded from the store, which holds every tensor. `carried`: as in
        `prepare`."""
        with tracing.continued(carried, "apply") as parent, tracing.span(
            "replica.apply", parent, replica_id=self.replica_id, push_id=push_id, policy=policy,
        ) as span:
            stats = await self._apply(push_id, policy)
            tracing.note(span, version=self.engine.weight_version, apply_s=stats.apply_s, pause_ms=stats.pause_ms)
            log.info("replica %s serves version %d (push %s: loaded in %.2f s, generation paused %.0f ms)",
                     self.replica_id, self.engine.weight_version, push_id, stats.apply_s, stats.pause_ms)
            return stats

    async def _apply(self, push_id: str, policy: str) -> ApplyStats:
        prepared = self._prepared.pop(push_id, None)
        if prepared is not None and prepared.files is None:  # not prepared here: from the store
            self._discard(prepared)
        elif prepared is not None:
            async with self._apply_lock:
                served = self.engine.weight_version
                if served == prepared.version - 1:
                    try:
                        faults.fault_point("replica.apply")
                        stats = await self.weights.apply(prepared.files, policy, prepared.version)
                        self._loaded["push"] += 1
                        return stats
                    except Exception as exc:
                        self._discard(prepared)
                        log.exception("replica %s failed to load version %d; it catches up from the store", self.replica_id, prepared.version)
                        raise ApplyFailed(
                            self.replica_id, f"replica {self.replica_id} failed to load version {prepared.version}: {exc}"
                        ) from None
                    except BaseException:
                        self._discard(prepared)
                        raise
                self._discard(prepared)
                if served >= prepared.version:  # the follower got there first
                    return ApplyStats()
                log.warning(
                    "replica %s serves version %d, not %d: loading version %d from the store instead of the push",
                    self.replica_id, served, prepared.version - 1, prepared.version,
                )
        await self.catch_up()
        return ApplyStats()

    async def abort(self, push_id: str) -> None:
        self._aborted.append(push_id)
        prepared = self._prepared.pop(push_id, None)
        if prepared is not None:
            self._discard(prepared)

    # ---- catching up --------------------------------------------------------------------------

    async def catch_up(self) -> int:
        """Load the store's current version if this engine is behind it; returns the version."""
        async with self._apply_lock:
            version = self.store.current_version()
            if version <= self.engine.weight_version:
                return self.engine.weight_version
            start = asyncio.get_running_loop().time()
            manifest = await self.weights.load_version(self.store, version, self.config.inflight)
            self._loaded["store"] += 1
            log.warning(
                "replica %s serves weight version %d (%r, committed %s) from %s, loaded in %.1f s", self.replica_id,
                version, manifest.label, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(manifest.created)),
                self.store.root, asyncio.get_running_loop().time() - start,
            )
            return version

    def expire_prepared(self) -> None:
        now = asyncio.get_running_loop().time()
        for push_id, prepared in list(self._prepared.items()):
            if now - prepared.at > PREPARED_TTL_S:
                del self._prepared[push_id]
                self._discard(prepared)
                log.warning("replica %s: push %s (version %d) was prepared %.0f s ago and never applied; dropped",
                            self.replica_id, push_id, prepared.version, now - prepared.at)

    async def apply_orphaned(self) -> None:
        """Apply the prepared pushes the store has committed whose apply has not come ORPHANED_S
        after the commit was seen (their ingress died after the commit point): without this the
        replica would wait for PREPARED_TTL_S before catching up."""
        loop = asyncio.get_running_loop()
        current = self.store.current_version()
        for push_id, prepared in list(self._prepared.items()):
            if prepared.version > current:
                continue
            if prepared.committed_seen_at is None:
                prepared.committed_seen_at = loop.time()
            elif loop.time() - prepared.committed_seen_at >= ORPHANED_S:
                log.warning("replica %s: version %d is committed but its apply never came; applying the prepared push",
                            self.replica_id, prepared.version)
                await self.apply(push_id, self.config.inflight)

    async def _follow(self) -> None:
        failures = 0  # catching up in a row; each waits twice as long, up to FOLLOW_MAX_S
        while True:
            await asyncio.sleep(min(FOLLOW_S * 2**failures, FOLLOW_MAX_S))
            self.expire_prepared()
            try:
                await self.apply_orphaned()
            except Exception:
                log.exception("replica %s: applying a committed push whose apply never came failed", self.replica_id)
            if self._prepared:  # a push is between its phases: apply will come
                continue
            try:
                await self.catch_up()
                failures = 0
            except Exception as exc:
                # A version that does not load: each try verifies (and for int8 requantizes) it
                # whole, so it is retried ever more slowly, and its traceback logged once.
                failures += 1
                log.error("replica %s: catching up with the weight store failed (try %d; the next in %.1f s): %s",
                          self.replica_id, failures, min(FOLLOW_S * 2**failures, FOLLOW_MAX_S), exc,
                          exc_info=failures == 1)

    def _discard(self, prepared: Prepared) -> None:
        if prepared.spool is not None:
            prepared.spool.discard()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._follower.cancel()
        with contextlib.suppress(Exception):
            self.engine.shutdown()
        with contextlib.suppress(Exception):
            self.weights.close()

    def __del__(self):
        # Serve calls it when the replica is stopped (scale-down, shutdown).
        self.close()
