"""WeightService: new weights into one engine -- convert (stage), load (apply), or load a whole
version from the weight store -- and `receiving`, the checked push session the push protocol
(serve/push.py) receives a stream into.

A push session that ends any way but committed -- an error, a cancelled call, a stream that ends
without its commit -- leaves through `receiving`'s exit, which deletes what was staged: the engine
never saw any of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import typing
from collections.abc import AsyncIterator
from pathlib import Path

import safetensors
import torch

from rollout_service.config import InflightPolicy, ServerConfig
from rollout_service.errors import FailedPrecondition
from rollout_service.tools.machine import usable_cores
from rollout_service.types import ApplyStats
from rollout_service.weights.engine_format import to_engine_format
from rollout_service.weights.delta import DeltaBase
from rollout_service.weights.manifest import ParamTable, PushHeader
from rollout_service.weights.session import PushSession
from rollout_service.weights.staging import ShardWriter
from rollout_service.weights.store import WeightSet
from rollout_service.weights.versions import Manifest, VersionStore, storage_errors

if typing.TYPE_CHECKING:
    from rollout_service.engine import RolloutEngine

log = logging.getLogger(__name__)

POLICIES: tuple[str, ...] = typing.get_args(InflightPolicy)

class WeightService:
    def __init__(self, engine: RolloutEngine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.table = ParamTable.from_checkpoint(config.model)
        config.staging_root.mkdir(parents=True, exist_ok=True)
        self._root = Path(tempfile.mkdtemp(prefix="server-", dir=config.staging_root))
        self.weights = WeightSet(engine.checkpoint, self._root, engine.packed_modules)
        self._dtype = getattr(torch, config.dtype)
        # Conversions use torch in this process; the engine and the front end need the other cores.
        # On 2 cores one thread cut a push's conversion CPU time by about a third (OpenMP threads
        # spin against the gRPC threads), see BENCHMARKS.md.
        # Counted on the cores this process may use (a Serve ingress or replica keeps off the
        # engines' model cores: serve/app.py), not the machine's.
        torch.set_num_threads(max(1, len(usable_cores()) // 2))
        self._recipe = config.recipe()

    @property
    def recipe_fingerprint(self) -> str | None:
        """Which quantization recipe this engine's parameters follow (None: not quantized)."""
        return self._recipe.fingerprint() if self._recipe is not None else None

    def _convert(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        return to_engine_format(name, tensor, self._dtype, self._recipe)

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

    def spool(self) -> ShardWriter:
        """A staging directory for a push's parts in this engine's format, as they are handed to
        it (serve/replica.py `take`)."""
        return ShardWriter(self._root)

    async def stage(self, stored: dict[str, Path]) -> tuple[dict[str, Path], ShardWriter | None]:
        """Tensors of a weight-store version (name -> shard, in the engine's dtype) in the engine's
        format: the shards themselves when the engine is not quantized, else requantized into a
        staging directory (returned, to discard when the push is dropped)."""
        if self._recipe is None:
            return dict(stored), None
        spool = ShardWriter(self._root)

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

    async def load_version(self, store: VersionStore, version: int, policy: str) -> Manifest:
        """Load committed version `version` whole from the weight store, after checking its bytes
        against the manifest's CRC-32s (a replica catching up, a restarted server resuming);
        returns its manifest. A store elsewhere (an object store) copies the version's shards into
        a staging directory of this engine's: deleted once loaded when they were requantized, else
        (the engine's tensors then live in them, as in a directory store's shards) by `self.weights`
        once no served tensor lives there, and at once if the load fails."""
        manifest = store.manifest(version)
        scratch = Path(tempfile.mkdtemp(prefix=f"push-v{version}-", dir=self._root))  # push-*: WeightSet's to drop
        try:
            local = await asyncio.to_thread(store.local_files, manifest, scratch)
            files, spool = await self.stage(local)
            try:
                await self.apply(files, policy, version)
            except BaseException:  # the next try stages afresh: keep no copy behind
                if spool is not None:
                    spool.discard()
                raise
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        if spool is not None:  # the engine serves the requantized copies
            shutil.rmtree(scratch, ignore_errors=True)
        return manifest

    def close(self) -> None:
        shutil.rmtree(self._root, ignore_errors=True)


@contextlib.asynccontextmanager
async def receiving(
    header: PushHeader, table: ParamTable, convert, spool: ShardWriter, config: ServerConfig, store: VersionStore,
    committed_version: int,
) -> AsyncIterator[PushSession]:
    """A checked push session staging into `spool`; whatever it staged is deleted unless the
    session ends committed. `committed_version`: the store's, which expected_version must name;
    `store` holds the base of a delta push."""
    try:
        table.check_header(header, POLICIES)
        if header.expected_version is not None and header.expected_version != committed_version:
            raise FailedPrecondition(
                f"header.expected_version: {header.expected_version} is stale, the last committed version is {committed_version}"
            )
        base = None
        if header.delta_base_version is not None:
            base = DeltaBase(store, header.delta_base_version, committed_version, config.model, config.dtype)
        session = PushSession(header, table, convert, spool, config.push_buffer_mib << 20, base)
    except BaseException:
        spool.discard()
        raise
    try:
        with storage_errors():
            yield session
    finally:
        await close_session(session, spool)


async def close_session(session: PushSession, spool: ShardWriter) -> None:
    """Close `session` (waiting for the conversion running now) and drop its staging unless it
    committed. On a thread, so a failed or cancelled push does not stall the event loop, which
    Generate shares in the single-process server; uncancellable, so a second cancel cannot skip it."""

    def close_and_discard() -> None:
        session.close()
        if not session.committed:
            spool.discard()

    await uncancellable(asyncio.to_thread(close_and_discard))


async def uncancellable(coro):
    """Run `coro` to its end even if the caller is cancelled meanwhile (then re-raise the cancel)."""
    task = asyncio.ensure_future(coro)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await task
        raise
