"""The push protocol (serve/push.py) over the single-process server's replica set, one real
EngineReplica in this process (serve/replicas.py `InProcess`), without an engine: receive into the
weight store, prepare, commit, then load; a full or read-only store refuses the push and keeps the
version; a committed push the engine fails to load stands, and the replica loads it whole from the
store (at once when it can, else when it restarts).

The engine's side of the replica is a test double (it records what it is given to load, and fails
on cue); the store, the push session, the protocol, the coordinator and the replica are the real
ones. The same faults against a real server on a real full or read-only disk:
tests/weights/test_store_disk.py; with two replicas and two ingresses: test_cluster_push.py."""

from __future__ import annotations

import asyncio
import collections
import errno
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rollout_service.errors import Conflict, FailedPrecondition, StorageFull, StorageUnavailable
from rollout_service.quant import Recipe
from rollout_service.serve.coordinator import EmbeddedCoordinator
from rollout_service.serve.push import Push
from rollout_service.serve.replica import EngineReplica
from rollout_service.serve.replicas import InProcess
from rollout_service.types import ApplyStats
from rollout_service.weights import durable, staging
from rollout_service.weights.manifest import ParamTable, PushHeader, TensorSpec
from rollout_service.weights.service import WeightService
from rollout_service.weights.versions import VersionStore

TABLE = ParamTable({"a.weight": (8, 4), "b.weight": (4, 4)})
INT8 = Recipe("int8", quantized=("a.weight",))


def config(recipe: Recipe | None = None) -> SimpleNamespace:
    return SimpleNamespace(dtype="bfloat16", inflight="drain", push_buffer_mib=1, recipe=lambda: recipe)


class WeightServiceDoubleForPushTest:
    """The engine's side of a replica: it takes the parts of a push into its staging as they are
    written (WeightService's own `spool`), or stages a stored version's shards themselves. apply
    records (names, version, the store's version at that moment) and the files, and fails the
    next `fail_apply` times."""

    def __init__(self, store: VersionStore, recipe: Recipe | None = None):
        self.engine = SimpleNamespace(weight_version=0)
        self.store = store
        self.recipe_fingerprint = recipe.fingerprint() if recipe is not None else None
        self._root = store.root.parent / "replica-staging"
        self._root.mkdir(parents=True, exist_ok=True)
        self.loaded: list[tuple[list[str], int, int]] = []
        self.files: dict = {}
        self.fail_apply = 0

    spool = WeightService.spool  # the real one, into this double's staging

    async def stage(self, files):
        return dict(files), None

    async def apply(self, files, policy, version):
        if self.fail_apply:
            self.fail_apply -= 1
            raise RuntimeError("the engine refused the tensors")
        self.files = dict(files)
        self.loaded.append((sorted(files), version, self.store.current_version()))
        self.engine.weight_version = version
        return ApplyStats(apply_s=0.5)

    load_version = WeightService.load_version  # the real one, over this double's stage and apply


def replica_over(weights: WeightServiceDoubleForPushTest, store: VersionStore, cfg=None) -> EngineReplica:
    """A real EngineReplica (as EngineReplica.start makes one, without its engine and follower)."""
    replica = EngineReplica.__new__(EngineReplica)
    replica.replica_id, replica.config, replica.store = "local", cfg or config(), store
    replica.engine, replica.weights = weights.engine, weights
    replica._prepared, replica._apply_lock, replica._loaded = {}, asyncio.Lock(), {"push": 0, "store": 0}
    replica._aborted = collections.deque(maxlen=16)
    return replica


def one_replica_push(weights: WeightServiceDoubleForPushTest, store: VersionStore, recipe: Recipe | None = None) -> Push:
    """The single-process server's push: one in-process replica, the embedded coordinator."""
    cfg = config(recipe)
    return Push(cfg, InProcess(replica_over(weights, store, cfg)), EmbeddedCoordinator(), store, TABLE, store.root.parent / "ingress-staging")


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.full((8, 4), value, dtype=torch.bfloat16), "b.weight": torch.full((4, 4), -value, dtype=torch.bfloat16)}


def given(header: PushHeader):
    """A header reader (what the front ends hand begin) of an already parsed header."""

    async def read() -> PushHeader:
        return header

    return read


async def push(protocol: Push, weights: dict[str, torch.Tensor], **header):
    raw = {n: t.contiguous().view(torch.uint8).numpy().tobytes() for n, t in weights.items()}
    specs = tuple(TensorSpec(n, "bfloat16", tuple(t.shape), len(raw[n]), zlib.crc32(raw[n])) for n, t in weights.items())
    async with protocol.begin(given(PushHeader(specs, **header))) as session:
        for i, name in enumerate(weights):
            await session.add_chunk(i, 0, raw[name])
        return await protocol.commit(session)


@pytest.fixture
def store(tmp_path) -> VersionStore:
    return VersionStore(tmp_path / "store", keep=3)


@pytest.fixture
def engine(store) -> WeightServiceDoubleForPushTest:
    return WeightServiceDoubleForPushTest(store)


def leftovers(store: VersionStore) -> list[str]:
    return sorted(p.name for p in store.incoming.iterdir())


async def test_a_push_is_committed_to_the_store_and_then_loaded(store, engine):
    result = await push(one_replica_push(engine, store), tensors(1.0), label="step 1")
    assert result.version == 1 and store.current_version() == 1 and store.current().label == "step 1"
    assert (result.label, result.tensors_applied, result.bytes_received, result.apply_s) == ("step 1", 2, 96, 0.5)
    assert result.replicas_catching_up == []
    assert engine.loaded == [(["a.weight", "b.weight"], 1, 1)]  # loaded after the commit point
    store.verify(store.current())
    assert leftovers(store) == []


async def test_a_second_push_is_refused_before_its_header_is_read(store, engine):
    """While a push holds the lock, another is ABORTED without its header being read: an HTTP
    push's header is JSON of up to megabytes, parsed only by the push that holds the lock."""
    protocol = one_replica_push(engine, store)
    raw = tensors(1.0)["a.weight"].view(torch.uint8).numpy().tobytes()
    first = PushHeader((TensorSpec("a.weight", "bfloat16", (8, 4), len(raw), zlib.crc32(raw)),))
    read = []

    async def second_header() -> PushHeader:
        read.append(True)
        return first

    async with protocol.begin(given(first)) as session:
        with pytest.raises(Conflict, match="another push is in progress"):
            async with protocol.begin(second_header):
                pass
        await session.add_chunk(0, 0, raw)
        assert (await protocol.commit(session)).version == 1
    assert read == []


async def test_a_quantized_engine_loads_the_parts_requantized_as_the_tensors_arrived(store):
    """The push requantizes each tensor as it arrives; the replica links those parts into its own
    staging (nothing requantized twice) and loads them; the store keeps the engine dtype."""
    engine = WeightServiceDoubleForPushTest(store, INT8)
    await push(one_replica_push(engine, store, INT8), tensors(1.0))
    assert sorted(engine.files) == ["a.weight", "a.weight_scale", "b.weight"]
    assert all(p.parent.parent == engine._root for p in engine.files.values())
    assert load_file(engine.files["a.weight"])["a.weight"].dtype == torch.int8
    assert store.current().tensors["a.weight"].dtype == "BF16"
    assert leftovers(store) == []  # the push's own parts are gone once the replica linked them


async def test_a_refused_push_drops_what_it_requantized(store):
    engine = WeightServiceDoubleForPushTest(store, INT8)
    with pytest.raises(FailedPrecondition):
        await push(one_replica_push(engine, store, INT8), tensors(1.0), expected_version=4)
    assert leftovers(store) == [] and list(engine._root.iterdir()) == []


@pytest.mark.reliability("fault")
async def test_a_disk_full_at_the_commit_refuses_the_push_and_the_version_stays(store, engine, monkeypatch):
    """The weight store's disk fills up as the commit writes the manifest (ENOSPC), after the
    push's shards were moved into the store: refused RESOURCE_EXHAUSTED naming the file, the old
    version stays, neither the shards nor the manifest's directory are left, and the next push
    commits. (tests/weights/test_store_disk.py fills a real disk while a push is received.)"""
    protocol = one_replica_push(engine, store)
    await push(protocol, tensors(1.0))
    real_write = durable.write_durably

    def disk_full(path, text, sync=True):  # test double: the disk fills up at the manifest
        if path.name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, text, sync)

    with monkeypatch.context() as m:
        m.setattr(durable, "write_durably", disk_full)
        with pytest.raises(StorageFull, match=r"no space left on the disk of the weight store \(.*v000002/manifest.json"):
            await push(protocol, tensors(2.0))
    assert store.current_version() == 1 and engine.engine.weight_version == 1 and len(engine.loaded) == 1
    assert not list(store.root.glob("v000002*")) and leftovers(store) == []
    assert (await push(protocol, tensors(2.0))).version == 2  # the next push, once there is room


@pytest.mark.reliability("fault")
async def test_a_read_only_store_refuses_the_push_while_receiving(store, engine, monkeypatch):
    """The weight store turns read-only (EROFS) while a push is received: refused UNAVAILABLE,
    naming the error; nothing is committed or loaded."""
    def read_only(tensors, path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(staging, "write_safetensors", read_only)
    with pytest.raises(StorageUnavailable, match="the weight store cannot be written .*Read-only file system"):
        await push(one_replica_push(engine, store), tensors(1.0))
    assert store.current_version() == 0 and engine.loaded == [] and leftovers(store) == []


async def test_a_committed_push_the_engine_fails_to_load_stands_and_is_loaded_whole_from_the_store(store, engine):
    """The push stands and names the replica catching up; its follower then loads the whole
    version from the store (a partial push is not a whole version)."""
    protocol = one_replica_push(engine, store)
    await push(protocol, tensors(1.0))
    engine.fail_apply = 1
    result = await push(protocol, {"a.weight": tensors(2.0)["a.weight"]})  # a partial push
    assert result.version == 2 and result.replicas_catching_up == ["local"] and engine.engine.weight_version == 1
    assert await protocol.replicas.replica.catch_up() == 2  # what the replica's follower does
    assert engine.loaded[-1] == (["a.weight", "b.weight"], 2, 2)  # the whole version, not the push


async def test_a_committed_version_the_engine_cannot_load_stands_and_loads_at_restart(store, engine):
    engine.fail_apply = 2  # the push, and the follower's load from the store
    protocol = one_replica_push(engine, store)
    result = await push(protocol, tensors(1.0))
    assert result.version == 1 and result.replicas_catching_up == ["local"]
    with pytest.raises(RuntimeError, match="the engine refused the tensors"):
        await protocol.replicas.replica.catch_up()
    assert store.current_version() == 1 and engine.engine.weight_version == 0
    restarted = WeightServiceDoubleForPushTest(store)
    assert await replica_over(restarted, store).catch_up() == 1  # as EngineReplica.start does
    assert restarted.loaded == [(["a.weight", "b.weight"], 1, 1)]


async def test_a_push_onto_a_replica_behind_the_store_loads_the_new_version_whole(store, engine):
    """A push carries only what changed, so a replica that is not on the version the push was
    numbered after loads the committed version whole from the store instead."""
    await push(one_replica_push(engine, store), tensors(1.0))
    behind = WeightServiceDoubleForPushTest(store)  # e.g. its load failed after a commit
    protocol = one_replica_push(behind, store)
    with pytest.raises(FailedPrecondition, match="expected_version: 0 is stale, the last committed version is 1"):
        await push(protocol, {"a.weight": tensors(2.0)["a.weight"]}, expected_version=0)
    assert (await push(protocol, {"a.weight": tensors(2.0)["a.weight"]}, expected_version=1)).version == 2
    assert behind.loaded == [(["a.weight", "b.weight"], 2, 2)]


async def test_the_follower_loads_a_committed_version_by_itself_retrying_ever_more_slowly(store, engine, monkeypatch, caplog):
    """A version the engine fails to load is retried by the replica's follower, each wait twice
    the last, its traceback logged once; once it loads, the replica serves it."""
    from rollout_service.serve import replica as replica_module

    monkeypatch.setattr(replica_module, "FOLLOW_S", 0.05)
    protocol = one_replica_push(engine, store)
    engine.fail_apply = 3  # the push's own load, then the follower's first two
    assert (await push(protocol, tensors(1.0))).replicas_catching_up == ["local"]
    follower = asyncio.create_task(protocol.replicas.replica._follow())
    try:
        async with asyncio.timeout(60):
            while engine.engine.weight_version != 1:
                await asyncio.sleep(0.01)
    finally:
        follower.cancel()
    failed = [r for r in caplog.records if "catching up with the weight store failed" in r.getMessage()]
    assert ["try 1; the next in 0.1 s", "try 2; the next in 0.2 s"] == [r.getMessage().split("(")[1].split(")")[0] for r in failed]
    assert [bool(r.exc_info) for r in failed] == [True, False]
    assert engine.loaded == [(["a.weight", "b.weight"], 1, 1)]
