"""Rollback (serve/rollback.py) over the single-process server's replica set, one real EngineReplica
in this process, without an engine: the kept version becomes committed + 1 under the push lock and
fence, the replica loads it whole from the store, the coordinator records it; a stale
expected_version, a version not kept, a push running or a replica failing to prepare commit nothing.

The engine's side of the replica is tests/serve/test_push.py's test double; the store, the push
protocol, the coordinator and the replica are the real ones. Against a real engine:
test_rollback_server.py; on Ray Serve: test_cluster.py."""

from __future__ import annotations

import zlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from rollout_service.errors import (
    Conflict,
    EngineUnavailable,
    FailedPrecondition,
    NotFound,
)
from rollout_service.serve.rollback import rollback
from rollout_service.weights.manifest import PushHeader, TensorSpec
from rollout_service.weights.versions import VersionStore
from tests.serve.test_push import (
    WeightServiceDoubleForPushTest,
    given,
    one_replica_push,
    push,
    tensors,
)

CHECKPOINT = {"a.weight": torch.full((8, 4), 0.5, dtype=torch.bfloat16), "b.weight": torch.full((4, 4), -0.5, dtype=torch.bfloat16)}


@pytest.fixture
def store(tmp_path) -> VersionStore:
    return VersionStore(tmp_path / "store", keep=4)


@pytest.fixture
def engine(store) -> WeightServiceDoubleForPushTest:
    return WeightServiceDoubleForPushTest(store)


@pytest.fixture
def protocol(engine, store, tmp_path):
    """The single-process server's push protocol, its config naming a checkpoint of a and b."""
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    save_file(CHECKPOINT, checkpoint / "model.safetensors")
    protocol = one_replica_push(engine, store)
    protocol.config.model = checkpoint
    return protocol


def served(engine: WeightServiceDoubleForPushTest) -> dict[str, torch.Tensor]:
    """The values the engine double was last given to load."""
    return {name: load_file(path)[name] for name, path in engine.files.items()}


def leftovers(store: VersionStore) -> list[str]:
    return sorted(p.name for p in store.root.iterdir() if p.name not in ("CURRENT", "FENCE", "COMMIT.lock", "incoming"))


async def test_a_rollback_serves_the_kept_weights_as_the_next_version_and_a_trainer_fenced_on_the_old_one_is_stale(protocol, engine, store):
    await push(protocol, {"a.weight": tensors(1.0)["a.weight"]}, label="step 1")  # b: the checkpoint's
    await push(protocol, tensors(2.0), label="step 2")
    await push(protocol, tensors(3.0), label="step 3")
    result = await rollback(protocol, 1, expected_version=3)
    assert (result.version, result.label, result.tensors_applied, result.bytes_received) == (4, "rollback to v1", 2, 0)
    assert result.replicas_catching_up == [] and protocol.last_push == result
    assert engine.loaded[-1] == (["a.weight", "b.weight"], 4, 4)  # loaded whole from the store, once committed
    loaded = served(engine)
    assert torch.equal(loaded["a.weight"], tensors(1.0)["a.weight"]) and torch.equal(loaded["b.weight"], CHECKPOINT["b.weight"])
    assert [(m.version, m.label) for m in store.kept()] == [(4, "rollback to v1"), (3, "step 3"), (2, "step 2"), (1, "step 1")]
    assert (await protocol.coordinator.version())[0] == 4
    events = await protocol.coordinator.events("0", 10)
    assert [(e["version"], e["label"]) for _, e in events][-1] == (4, "rollback to v1")

    with pytest.raises(FailedPrecondition, match="header.expected_version: 3 is stale, the last committed version is 4"):
        await push(protocol, tensors(5.0), expected_version=3)  # the trainer that pushed v3
    assert (await push(protocol, tensors(5.0), expected_version=4)).version == 5  # once it has read v4


async def test_a_stale_expected_version_or_a_version_not_kept_commits_nothing(protocol, engine, store):
    for value in (1.0, 2.0):
        await push(protocol, tensors(value))
    before, loaded = leftovers(store), list(engine.loaded)
    with pytest.raises(FailedPrecondition, match="expected_version: 1 is stale, the last committed version is 2"):
        await rollback(protocol, 1, expected_version=1)
    with pytest.raises(NotFound, match="to_version: version 7 is not kept by the weight store; it keeps 2, 1$"):
        await rollback(protocol, 7, expected_version=None)
    assert store.current_version() == 2 and leftovers(store) == before and engine.loaded == loaded
    assert protocol.replicas.replica._prepared == {}
    assert (await rollback(protocol, 1, expected_version=2)).version == 3  # the lock was given back each time


async def test_a_rollback_while_a_push_runs_is_refused_and_the_push_commits(protocol, store):
    await push(protocol, tensors(1.0))
    raw = tensors(2.0)["b.weight"].view(torch.uint8).numpy().tobytes()
    spec = TensorSpec("b.weight", "bfloat16", (4, 4), len(raw), zlib.crc32(raw))
    async with protocol.begin(given(PushHeader((spec,)))) as session:
        await session.add_chunk(0, 0, raw)
        with pytest.raises(Conflict, match="another push is in progress"):
            await rollback(protocol, 1, expected_version=None)
        assert (await protocol.commit(session)).version == 2
    assert store.current_version() == 2


async def test_a_replica_failing_to_prepare_fails_the_rollback_and_its_new_shards_are_deleted(protocol, engine, store):
    await push(protocol, {"a.weight": tensors(1.0)["a.weight"]})
    await push(protocol, tensors(2.0))  # b pushed after v1: the rollback writes its checkpoint value
    replica = protocol.replicas.replica

    async def prepare_fails(push_id, version, parts):  # test double: the replica's staging is broken
        raise EngineUnavailable(f"replica local failed to prepare version {version}")

    replica.prepare = prepare_fails
    with pytest.raises(EngineUnavailable, match="failed to prepare version 3"):
        await rollback(protocol, 1, expected_version=2)
    assert store.current_version() == 2 and not list(store.root.glob("v000003*"))
    assert not any(store.incoming.iterdir()) and engine.loaded[-1][1] == 2
    del replica.prepare
    assert (await rollback(protocol, 1, expected_version=2)).version == 3
    assert torch.equal(served(engine)["b.weight"], CHECKPOINT["b.weight"])
