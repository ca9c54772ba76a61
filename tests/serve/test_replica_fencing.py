"""A replica applies push N+1 only onto version N, expires prepared pushes, and leaves no staged copy
behind a failed load: a unit test of serve/replica.py over test doubles of its engine, weight
service and weight store (the real ones run in tests/serve/test_cluster.py)."""

from __future__ import annotations

import asyncio
import collections
import pickle
import tempfile
from pathlib import Path

import pytest

from rollout_service.serve import replica as replica_module
from rollout_service.serve.replicas import ApplyFailed
from rollout_service.serve.replica import EngineReplica, Prepared
from rollout_service.types import ApplyStats
from rollout_service.weights.service import WeightService


class EngineDouble:
    def __init__(self, version: int):
        self.weight_version = version


class SpoolDouble:
    def __init__(self):
        self.discarded = False
        self.files: dict[str, Path] = {}

    def take(self, part, source, names):
        self.files.update({name: Path(part) for name in names})

    def discard(self):
        self.discarded = True


class WeightServiceDouble:
    """Records what is loaded: ("push", version) for a prepared push, ("store", version) for a catch-up."""

    recipe_fingerprint = "int8-recipe"

    def __init__(self, engine: EngineDouble):
        self.engine = engine
        self._root = Path(tempfile.mkdtemp(prefix="replica-staging-"))  # load_version's scratch goes here
        self.loaded: list[tuple[str, int]] = []
        self.fail = False
        self.spools: list[SpoolDouble] = []

    async def stage(self, files):
        spool = SpoolDouble()
        self.spools.append(spool)
        return {"store": Path("x")}, spool

    def spool(self):
        spool = SpoolDouble()
        self.spools.append(spool)
        return spool

    async def apply(self, files, policy, version):
        if self.fail:
            raise RuntimeError("engine refused the tensors")
        self.loaded.append(("store" if "store" in files else "push", version))
        self.engine.weight_version = version
        return ApplyStats(apply_s=1.0)

    load_version = WeightService.load_version  # the real one, over this double's stage and apply


class StoreDouble:
    root = Path("/store")

    def __init__(self, version: int):
        self.version = version

    def current_version(self):
        return self.version

    def manifest(self, version):
        class Manifest:
            label, created = f"v{version}", 0.0

            def files(self, root):
                return {"store": root / f"v{version}"}

        return Manifest()

    def verify(self, manifest):
        pass

    def local_files(self, manifest, scratch):
        return manifest.files(self.root)


def replica_at(version: int, store_version: int) -> EngineReplica:
    r = object.__new__(EngineReplica)
    r.replica_id = "r1"
    r.engine = EngineDouble(version)
    r.weights = WeightServiceDouble(r.engine)
    r.store = StoreDouble(store_version)
    r.config = type("ConfigDouble", (), {"inflight": "drain"})()
    r._prepared = {}
    r._apply_lock = asyncio.Lock()
    r._loaded = {"push": 0, "store": 0}
    r._aborted = collections.deque(maxlen=16)
    return r


def prepare(r: EngineReplica, push_id: str, version: int, at: float | None = None) -> SpoolDouble:
    spool = SpoolDouble()
    r._prepared[push_id] = Prepared(version, spool, asyncio.get_running_loop().time() if at is None else at, {"push": Path("p")})
    return spool


async def test_push_n_plus_1_is_applied_onto_version_n():
    r = replica_at(4, store_version=5)
    prepare(r, "p5", 5)
    stats = await r.apply("p5", "drain")
    assert r.weights.loaded == [("push", 5)] and stats.apply_s == 1.0


async def test_a_replica_that_missed_a_version_loads_the_whole_version_from_the_store_not_the_push():
    r = replica_at(3, store_version=5)  # missed version 4; push 5 holds only what 5 changed
    spool = prepare(r, "p5", 5)
    await r.apply("p5", "drain")
    assert r.weights.loaded == [("store", 5)] and spool.discarded
    assert r.engine.weight_version == 5


async def test_a_push_the_replica_already_serves_is_dropped():
    r = replica_at(5, store_version=5)
    spool = prepare(r, "p5", 5)
    await r.apply("p5", "drain")
    assert r.weights.loaded == [] and spool.discarded


async def test_an_apply_whose_push_is_gone_catches_up_from_the_store():
    r = replica_at(4, store_version=5)
    await r.apply("never-prepared", "drain")
    assert r.weights.loaded == [("store", 5)]


async def test_a_failed_load_discards_its_staged_copy():
    r = replica_at(4, store_version=5)
    spool = prepare(r, "p5", 5)
    r.weights.fail = True
    with pytest.raises(ApplyFailed, match="replica r1 failed to load version 5: engine refused") as info:
        await r.apply("p5", "drain")
    assert spool.discarded and info.value.replica_id == "r1"
    assert pickle.loads(pickle.dumps(info.value)).replica_id == "r1"  # as it travels back through Ray
    with pytest.raises(RuntimeError):
        await r.catch_up()
    assert r.weights.spools[-1].discarded  # the catch-up's own staging, not left behind every retry


async def test_prepared_pushes_expire_and_the_follower_may_then_catch_up(monkeypatch):
    r = replica_at(4, store_version=5)
    now = asyncio.get_running_loop().time()
    old = prepare(r, "stale", 5, at=now - replica_module.PREPARED_TTL_S - 1)
    fresh = prepare(r, "fresh", 5, at=now)
    r.expire_prepared()
    assert list(r._prepared) == ["fresh"] and old.discarded and not fresh.discarded
    await r.apply("stale", "drain")  # a late apply of the expired push: loads the committed version
    assert r.weights.loaded == [("store", 5)]


async def test_a_replica_takes_the_ingress_parts_only_when_made_for_its_own_recipe():
    """During a redeploy an ingress of one config may push to replicas of another: those load the
    version from the store once committed instead of parts of another format."""
    r = replica_at(0, store_version=1)
    await r.take("a", 1, "int8-recipe", "part-00000.safetensors", b"bytes", ["w"])
    await r.prepare("a", 1, {"w": "part-00000.safetensors"})
    assert r._prepared["a"].files == {"w": Path("part-00000.safetensors")}
    await r.take("b", 1, "fp8-recipe", "part-00000.safetensors", b"bytes", ["w"])
    await r.prepare("b", 1, {"w": "part-00000.safetensors"})
    assert len(r.weights.spools) == 1 and r._prepared["b"].files is None
    await r.apply("b", "drain")
    assert r.weights.loaded == [("store", 1)]


async def test_a_replica_that_missed_parts_of_a_push_loads_it_from_the_store():
    """A replica that started while a push's parts were handed out has only the later ones: it is
    prepared to load the committed version from the store, not a push with tensors missing."""
    r = replica_at(0, store_version=1)
    await r.take("a", 1, "int8-recipe", "part-00001.safetensors", b"bytes", ["w2"])
    await r.prepare("a", 1, {"w1": "part-00000.safetensors", "w2": "part-00001.safetensors"})
    assert r._prepared["a"].files is None and r.weights.spools[0].discarded
    await r.apply("a", "drain")
    assert r.weights.loaded == [("store", 1)]


async def test_a_committed_push_whose_apply_never_comes_is_applied_by_the_follower(monkeypatch):
    """The ingress died after the commit point: the store says 5, the prepared push 5 waits for an
    apply no one will send. The follower applies it once the commit has been seen for ORPHANED_S,
    not after PREPARED_TTL_S; a push the store has not committed is left to its ingress."""
    monkeypatch.setattr(replica_module, "ORPHANED_S", 0.0)
    r = replica_at(4, store_version=4)
    prepare(r, "p5", 5)
    await r.apply_orphaned()  # not committed: nothing happens
    await r.apply_orphaned()
    assert r.weights.loaded == [] and list(r._prepared) == ["p5"]
    r.store.version = 5
    await r.apply_orphaned()  # the commit is seen
    assert r.weights.loaded == [] and r._prepared["p5"].committed_seen_at is not None
    await r.apply_orphaned()  # ORPHANED_S after: applied as its apply would have
    assert r.weights.loaded == [("push", 5)] and r._prepared == {}


async def test_a_replica_that_cannot_reach_a_part_loads_the_push_from_the_store():
    """A part handed out as the file alone (every replica was on the ingress's node when the push
    began) reaches no replica started elsewhere since: it drops what it took and loads the
    committed version from the store, rather than a push with tensors missing."""
    r = replica_at(0, store_version=1)
    await r.take("a", 1, "int8-recipe", "part-00000.safetensors", b"bytes", ["w1"])
    await r.take("a", 1, "int8-recipe", "part-00001.safetensors", None, ["w2"])
    await r.prepare("a", 1, {"w1": "part-00000.safetensors", "w2": "part-00001.safetensors"})
    assert r._prepared["a"].files is None and r.weights.spools[0].discarded
    await r.apply("a", "drain")
    assert r.weights.loaded == [("store", 1)]


async def test_a_take_delivered_after_its_push_was_aborted_is_dropped():
    r = replica_at(0, store_version=0)
    await r.take("a", 1, "int8-recipe", "part-00000.safetensors", b"bytes", ["w1"])
    await r.abort("a")
    await r.take("a", 1, "int8-recipe", "part-00001.safetensors", b"bytes", ["w2"])
    assert "a" not in r._prepared and len(r.weights.spools) == 1 and r.weights.spools[0].discarded
