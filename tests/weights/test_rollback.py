"""A rollback's version in the weight store (weights/rollback.py), without an engine: it names the
kept version's shards (no byte copied, on a directory and on S3), holds the checkpoint's value of
each tensor pushed since that the kept version lacks, and its shards outlive --keep-versions for as
long as a kept version names them. The protocol around it: tests/serve/test_rollback.py."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from rollout_service.errors import Conflict, NotFound
from rollout_service.weights.delta import DeltaBase
from rollout_service.weights.rollback import (
    checkpoint_values,
    committed_as,
    kept_version,
)
from rollout_service.weights.versions import VersionStore, crc32_of
from tests.weights.test_versions import push, t

CHECKPOINT = {"a.weight": torch.full((4, 3), 0.5, dtype=torch.float32), "b.weight": torch.full((4, 3), -0.25, dtype=torch.float32)}


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint in float32: the store holds its values cast to the engine's bfloat16."""
    root = tmp_path / "checkpoint"
    root.mkdir()
    save_file(CHECKPOINT, root / "model.safetensors")
    return root


def roll_back(store: VersionStore, to_version: int, checkpoint, fence: int | None = None):
    """What serve/rollback.py does to the store, without the replicas: the new version's shards
    received and adopted, then committed over the kept version's tensors."""
    version = store.current_version() + 1
    target = kept_version(store, to_version)
    spool, crc = checkpoint_values(store, target, store.current(), checkpoint, torch.bfloat16)
    files = store.adopt(spool.dir, spool.files, version) if spool.files else {}
    return store.commit(version, files, crc, f"rollback to v{to_version}", fence, base=to_version)


def values(store: VersionStore, manifest) -> dict[str, torch.Tensor]:
    return {name: load_file(path)[name] for name, path in store.local_files(manifest, store.incoming / "scratch").items()}


def test_a_rollback_names_the_kept_versions_shards_and_stores_nothing_of_its_own(tmp_path, checkpoint):
    store = VersionStore(tmp_path / "store", keep=4)
    first = push(store, {"a.weight": t(1), "b.weight": t(1)}, "step-1")
    push(store, {"a.weight": t(2)}, "step-2")
    push(store, {"b.weight": t(3)}, "step-3")
    m = roll_back(store, 1, checkpoint, fence=5)
    assert (m.version, m.label, m.fence) == (4, "rollback to v1", 5) and store.current_version() == 4
    assert m.tensors == first.tensors  # the very same shards, CRC-32s and all
    assert not list(store.root.glob("v000004-*"))  # no directory of its own: nothing was written
    assert [k.version for k in store.kept()] == [4, 3, 2, 1]  # history is not rewritten
    store.verify(m)
    assert committed_as(store, 4, 5) and not committed_as(store, 4, 6) and not committed_as(store, 5, 5)


def test_a_tensor_pushed_after_the_kept_version_gets_the_checkpoints_value_back(tmp_path, checkpoint):
    """v1 pushed only a; v2 pushed b too. Back to v1, b must be the checkpoint's again: the new
    manifest lists b with that value, so a replica loading it onto v2 (or any version) serves v1."""
    store = VersionStore(tmp_path / "store", keep=3)
    push(store, {"a.weight": t(1)})
    push(store, {"a.weight": t(2), "b.weight": t(2)})
    m = roll_back(store, 1, checkpoint)
    assert sorted(m.tensors) == ["a.weight", "b.weight"]
    assert m.tensors["a.weight"] == store.manifest(1).tensors["a.weight"]
    assert m.tensors["b.weight"].file.startswith("v000003-push-")
    expected_b = CHECKPOINT["b.weight"].to(torch.bfloat16)
    assert m.tensors["b.weight"].crc32 == crc32_of(expected_b)
    loaded = values(store, m)
    assert torch.equal(loaded["a.weight"], t(1)) and torch.equal(loaded["b.weight"], expected_b)
    # A complete delta base: what a delta push against version 3 rebuilds from is v1's weights.
    base = DeltaBase(store, 3, 3, checkpoint, "bfloat16")
    assert base._file("b.weight") == str(store.root / m.tensors["b.weight"].file)


def test_a_version_not_kept_is_refused_naming_the_kept_ones_and_nothing_is_written(tmp_path, checkpoint):
    store = VersionStore(tmp_path / "store", keep=2)
    with pytest.raises(NotFound, match=r"to_version: version 1 is not kept by the weight store; it keeps none \(no push"):
        kept_version(store, 1)
    for v in range(1, 4):
        push(store, {"a.weight": t(v)})
    before = sorted(p.name for p in store.root.iterdir())
    for missing in (1, 0, 9):
        with pytest.raises(NotFound, match=f"to_version: version {missing} is not kept by the weight store; it keeps 3, 2$"):
            roll_back(store, missing, checkpoint)
    assert store.current_version() == 3 and sorted(p.name for p in store.root.iterdir()) == before


def test_the_kept_versions_shards_live_as_long_as_a_kept_version_names_them(tmp_path, checkpoint):
    """keep=2: v1 leaves the window at v3, but the rollback to it (v4, then kept) names v1's
    shards, so they stay; once the rollback leaves the window too, they go."""
    store = VersionStore(tmp_path / "store", keep=2)
    push(store, {"a.weight": t(1)})
    push(store, {"a.weight": t(2)})
    roll_back(store, 1, checkpoint)  # v3, window 3, 2: v1's manifest goes, its shards stay
    shards = store.manifest(3).tensors["a.weight"].file
    assert shards.startswith("v000001-push-") and (store.root / shards).is_file()
    assert [k.version for k in store.kept()] == [3, 2]
    push(store, {"b.weight": t(4)})  # v4 still names v1's a (as v3 did)
    assert store.manifest(4).tensors["a.weight"].file == shards and (store.root / shards).is_file()
    store.verify(store.manifest(4))
    push(store, {"a.weight": t(5)})
    push(store, {"a.weight": t(6)})  # window 6, 5: nothing names v1's shards any more
    assert not (store.root / shards).exists() and not list(store.root.glob("v000001*"))


def test_a_rollback_commits_only_onto_the_version_it_was_numbered_after(tmp_path, checkpoint):
    store = VersionStore(tmp_path / "store", keep=3)
    push(store, {"a.weight": t(1)}, fence=3)
    push(store, {"a.weight": t(2)}, fence=3)
    store.raise_fence(4)  # a newer push (or rollback) has begun
    with pytest.raises(Conflict, match="fencing token 3"):
        roll_back(store, 1, checkpoint, fence=3)
    assert store.current_version() == 2


def test_on_s3_a_rollback_names_the_kept_versions_objects_without_copying_them(s3_server, tmp_path, checkpoint):
    import boto3

    from rollout_service.weights.object_store import ObjectVersionStore

    bucket = s3_server.new_bucket()
    store = ObjectVersionStore(f"s3://{bucket}/weights", 2, tmp_path / "local")
    first = push(store, {"a.weight": t(1)})
    push(store, {"a.weight": t(2), "b.weight": t(2)})
    m = roll_back(store, 1, checkpoint)
    assert m.tensors["a.weight"] == first.tensors["a.weight"] and m.tensors["b.weight"].file.startswith("v000003-push-")
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="weights/")["Contents"]]
    own = sorted(k for k in keys if k.startswith("weights/v000003"))  # its manifest and b's checkpoint value only
    assert len(own) == 2 and own[0].startswith("weights/v000003-push-") and own[1] == "weights/v000003/manifest.json"
    assert "weights/v000001/manifest.json" not in keys and first.tensors["a.weight"].file in {k[len("weights/"):] for k in keys}
    reopened = ObjectVersionStore(f"s3://{bucket}/weights", 2, tmp_path / "other")  # another machine reads it back
    loaded = values(reopened, reopened.current())
    assert torch.equal(loaded["a.weight"], t(1)) and torch.equal(loaded["b.weight"], CHECKPOINT["b.weight"].to(torch.bfloat16))
    reopened.close()
    store.close()
