"""The single-process server's push protocol (weights/local.py) without an engine: receive into the
weight store, commit, then load; a full or read-only store refuses the push and keeps the version;
a committed push the engine fails to load is loaded whole from the store, or stands for the restart.

The engine side is a test double (it records what it is given to load, and fails on cue); the
store, the push session and the protocol are the real ones. The same faults against a real server
on a real full or read-only disk: tests/weights/test_store_disk.py."""

from __future__ import annotations

import errno
import zlib
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from rollout_service.errors import Conflict, EngineUnavailable, FailedPrecondition, StorageFull, StorageUnavailable
from rollout_service.types import ApplyStats
from rollout_service.weights import durable, staging
from rollout_service.weights.staging import Spool
from rollout_service.weights.local import LocalPush
from rollout_service.weights.manifest import ParamTable, PushHeader, TensorSpec
from rollout_service.weights.service import WeightService
from rollout_service.weights.versions import VersionStore

TABLE = ParamTable({"a.weight": (8, 4), "b.weight": (4, 4)})
CONFIG = SimpleNamespace(dtype="bfloat16", inflight="drain", push_buffer_mib=1)


class WeightServiceDoubleForLocalPushTest:
    """The engine's side. Unquantized, it loads the stored shards; `quantized`, it prepares each
    tensor as it arrives into a spool of its own (its "format": float32). apply records (names,
    version, the store's version at that moment) and the files, and fails the next `fail_apply` times."""

    def __init__(self, store: VersionStore, quantized: bool = False):
        self.engine = SimpleNamespace(weight_version=0)
        self.table = TABLE
        self.store = store
        self.quantized = quantized
        self.spools: list[Spool] = []
        self.loaded: list[tuple[list[str], int, int]] = []
        self.files: dict = {}
        self.fail_apply = 0

    def preparer(self):
        if not self.quantized:
            return None, None
        spool = Spool(self.store.root.parent / "staging", 1 << 20)
        self.spools.append(spool)
        return (lambda name, tensor: spool.add({name: tensor.to(torch.float32)})), spool

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


def tensors(value: float) -> dict[str, torch.Tensor]:
    return {"a.weight": torch.full((8, 4), value, dtype=torch.bfloat16), "b.weight": torch.full((4, 4), -value, dtype=torch.bfloat16)}


def given(header: PushHeader):
    """A header reader (what the front ends hand begin) of an already parsed header."""

    async def read() -> PushHeader:
        return header

    return read


async def push(local: LocalPush, weights: dict[str, torch.Tensor], **header):
    raw = {n: t.contiguous().view(torch.uint8).numpy().tobytes() for n, t in weights.items()}
    specs = tuple(TensorSpec(n, "bfloat16", tuple(t.shape), len(raw[n]), zlib.crc32(raw[n])) for n, t in weights.items())
    async with local.begin(given(PushHeader(specs, **header))) as session:
        for i, name in enumerate(weights):
            await session.add_chunk(i, 0, raw[name])
        return await local.commit(session)


@pytest.fixture
def store(tmp_path) -> VersionStore:
    return VersionStore(tmp_path / "store", keep=3)


@pytest.fixture
def engine(store) -> WeightServiceDoubleForLocalPushTest:
    return WeightServiceDoubleForLocalPushTest(store)


def leftovers(store: VersionStore) -> list[str]:
    return sorted(p.name for p in store.incoming.iterdir())


async def test_a_push_is_committed_to_the_store_and_then_loaded(store, engine):
    result = await push(LocalPush(engine, store, CONFIG), tensors(1.0), label="step 1")
    assert result.version == 1 and store.current_version() == 1 and store.current().label == "step 1"
    assert (result.label, result.tensors_applied, result.bytes_received, result.apply_s) == ("step 1", 2, 96, 0.5)
    assert engine.loaded == [(["a.weight", "b.weight"], 1, 1)]  # loaded after the commit point
    store.verify(store.current())
    assert leftovers(store) == []


async def test_a_second_push_is_refused_before_its_header_is_read(store, engine):
    """While a push holds the store, another is ABORTED without its header being read: an HTTP
    push's header is JSON of up to megabytes, parsed only by the push that holds the lock."""
    local = LocalPush(engine, store, CONFIG)
    raw = tensors(1.0)["a.weight"].view(torch.uint8).numpy().tobytes()
    first = PushHeader((TensorSpec("a.weight", "bfloat16", (8, 4), len(raw), zlib.crc32(raw)),))
    read = []

    async def second_header() -> PushHeader:
        read.append(True)
        return first

    async with local.begin(given(first)) as session:
        with pytest.raises(Conflict, match="another push is in progress"):
            async with local.begin(second_header):
                pass
        await session.add_chunk(0, 0, raw)
        assert (await local.commit(session)).version == 1
    assert read == []


async def test_a_quantized_engine_loads_what_it_prepared_as_the_tensors_arrived(store):
    engine = WeightServiceDoubleForLocalPushTest(store, quantized=True)
    await push(LocalPush(engine, store, CONFIG), tensors(1.0))
    prepared = engine.spools[0]
    assert engine.files == prepared.files and all(p.parent == prepared.dir for p in engine.files.values())
    assert torch.equal(load_file(engine.files["a.weight"])["a.weight"], torch.full((8, 4), 1.0))
    assert store.current().tensors["a.weight"].dtype == "BF16"  # the store keeps the engine dtype


async def test_a_refused_push_drops_what_it_prepared(store, monkeypatch):
    engine = WeightServiceDoubleForLocalPushTest(store, quantized=True)
    with pytest.raises(FailedPrecondition):
        await push(LocalPush(engine, store, CONFIG), tensors(1.0), expected_version=4)
    assert not engine.spools[0].dir.exists() and leftovers(store) == []


@pytest.mark.reliability("fault")
async def test_a_disk_full_at_the_commit_refuses_the_push_and_the_version_stays(store, engine, monkeypatch):
    """The weight store's disk fills up as the commit writes the manifest (ENOSPC), after the
    push's shards were moved into the store: refused RESOURCE_EXHAUSTED naming the file, the old
    version stays, neither the shards nor the manifest's directory are left, and the next push
    commits. (tests/weights/test_store_disk.py fills a real disk while a push is received.)"""
    local = LocalPush(engine, store, CONFIG)
    await push(local, tensors(1.0))
    real_write = durable.write_durably

    def disk_full(path, text, sync=True):  # test double: the disk fills up at the manifest
        if path.name == "manifest.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, text, sync)

    with monkeypatch.context() as m:
        m.setattr(durable, "write_durably", disk_full)
        with pytest.raises(StorageFull, match=r"no space left on the disk of the weight store \(.*v000002/manifest.json"):
            await push(local, tensors(2.0))
    assert store.current_version() == 1 and engine.engine.weight_version == 1 and len(engine.loaded) == 1
    assert not list(store.root.glob("v000002*")) and leftovers(store) == []
    assert (await push(local, tensors(2.0))).version == 2  # the next push, once there is room


@pytest.mark.reliability("fault")
async def test_a_read_only_store_refuses_the_push_while_receiving(store, engine, monkeypatch):
    """The weight store turns read-only (EROFS) while a push is received: refused UNAVAILABLE,
    naming the error; nothing is committed or loaded."""
    def read_only(tensors, path):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(staging, "write_safetensors", read_only)
    with pytest.raises(StorageUnavailable, match="the weight store cannot be written .*Read-only file system"):
        await push(LocalPush(engine, store, CONFIG), tensors(1.0))
    assert store.current_version() == 0 and engine.loaded == [] and leftovers(store) == []


async def test_a_committed_push_the_engine_fails_to_load_is_loaded_whole_from_the_store(store, engine):
    local = LocalPush(engine, store, CONFIG)
    await push(local, tensors(1.0))
    engine.fail_apply = 1
    result = await push(local, {"a.weight": tensors(2.0)["a.weight"]})  # a partial push
    assert result.version == 2 and engine.engine.weight_version == 2
    assert engine.loaded[-1] == (["a.weight", "b.weight"], 2, 2)  # the whole version, not the push


async def test_a_committed_version_the_engine_cannot_load_stands_and_loads_at_restart(store, engine):
    engine.fail_apply = 2  # the push, and the reload from the store
    with pytest.raises(EngineUnavailable, match="weight version 1 is committed, but the engine failed to load it"):
        await push(LocalPush(engine, store, CONFIG), tensors(1.0))
    assert store.current_version() == 1 and engine.engine.weight_version == 0
    restarted = WeightServiceDoubleForLocalPushTest(store)
    assert await LocalPush(restarted, store, CONFIG).resume() == 1
    assert restarted.loaded == [(["a.weight", "b.weight"], 1, 1)]


async def test_a_push_onto_an_engine_behind_the_store_first_loads_the_stores_version(store, engine):
    await push(LocalPush(engine, store, CONFIG), tensors(1.0))
    behind = WeightServiceDoubleForLocalPushTest(store)  # e.g. its reload failed after a commit
    local = LocalPush(behind, store, CONFIG)
    with pytest.raises(FailedPrecondition, match="expected_version: 0 is stale, the last committed version is 1"):
        await push(local, tensors(2.0), expected_version=0)
    assert (await push(local, tensors(2.0), expected_version=1)).version == 2
    assert [(v, at) for _, v, at in behind.loaded] == [(1, 1), (2, 2)]
