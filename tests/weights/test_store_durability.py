"""The weight store keeps what it committed: a larger --keep-versions between two runs, an error
after the commit point, the order in which a commit syncs what it wrote (so that a power loss
leaves the old version or the new one, whole), and a store a crash left torn refused at start.

The real store, push session and push protocol; the engine is a test double
(tests/serve/test_push.py), and the syncs are recorded by wrapping weights/durable.py's."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import pytest
import torch

from rollout_service.errors import ConfigError
from rollout_service.weights import durable, staging
from rollout_service.weights.versions import VersionStore, open_store
from tests.serve.test_push import WeightServiceDoubleForPushTest, one_replica_push, push, tensors
from tests.weights.test_versions import _checkpoint
from tests.weights.test_versions import push as commit_one
from tests.weights.test_versions import t


def versions_on_disk(root: Path) -> list[str]:
    return sorted({d.name.split("-")[0] for d in root.glob("v*")})


def test_a_larger_keep_between_two_runs_keeps_every_version_and_the_next_commit(tmp_path):
    """keep 2, four commits; reopened with keep 4 the store cleans, commits version 5 and keeps
    it (today: clean() and the collect after commit(5) read v1's deleted manifest and raise)."""
    first = VersionStore(tmp_path, keep=2)
    for v in range(1, 5):
        commit_one(first, {"a.weight": t(v)})
    assert versions_on_disk(tmp_path) == ["v000003", "v000004"]
    second = VersionStore(tmp_path, keep=4)
    second.clean()
    assert second.current_version() == 4
    manifest = commit_one(second, {"a.weight": t(5)})
    assert second.current_version() == 5 and versions_on_disk(tmp_path) == ["v000003", "v000004", "v000005"]
    second.verify(manifest)
    third = VersionStore(tmp_path, keep=4)
    third.clean()
    assert third.current() == manifest
    third.verify(third.current())


def test_an_error_after_the_commit_point_is_logged_and_the_version_stands(tmp_path, monkeypatch, caplog):
    store = VersionStore(tmp_path, keep=2)
    commit_one(store, {"a.weight": t(1)})

    def collect_fails(running: bool = True):  # test double: deleting old versions fails (EIO, a bug)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "_collect", collect_fails)
    with caplog.at_level(logging.ERROR):
        manifest = commit_one(store, {"a.weight": t(2)})
    assert store.current_version() == 2 and store.current() == manifest
    store.verify(manifest)
    assert "version 2 is committed (CURRENT names it), but what follows the commit failed" in caplog.text


async def test_a_push_whose_commit_raised_after_the_commit_point_stands(tmp_path, monkeypatch, caplog):
    """The push discards a push only if the store does not hold it: a commit
    that raised after CURRENT named the version (a store's bug, an I/O error) leaves it standing."""
    store = VersionStore(tmp_path / "store", keep=3)
    engine = WeightServiceDoubleForPushTest(store)
    local = one_replica_push(engine, store)
    real_commit = store.commit

    def raises_after_committing(*args):  # test double of a store whose commit fails late
        real_commit(*args)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(store, "commit", raises_after_committing)
    with caplog.at_level(logging.ERROR):
        result = await push(local, tensors(1.0))
    assert result.version == 1 and engine.engine.weight_version == 1
    store.verify(store.current())  # its shards were not deleted
    assert "version 1 is committed, though its commit raised afterwards" in caplog.text
    assert result.warnings == ["version 1 is committed, though its commit raised afterwards ([Errno 5] Input/output error)"]


async def test_a_directory_sync_failing_after_the_commit_point_is_reported_to_the_pusher(tmp_path, monkeypatch):
    """The store's directory cannot be synced after CURRENT was renamed (EIO): the version stands
    and serves, and the push's reply says it may not survive a power loss, rather than the trainer
    learning it only from the server's log."""
    store = VersionStore(tmp_path / "store", keep=3)
    engine = WeightServiceDoubleForPushTest(store)
    local = one_replica_push(engine, store)
    real_fsync_dir = durable.fsync_dir

    def fails_after_current(path, sync=True):  # test double: the disk errs once CURRENT names the push
        if (store.root / "CURRENT").exists() and store.current_version() == 1 and Path(path) == store.root:
            raise OSError(5, "Input/output error", str(path))
        real_fsync_dir(path, sync)

    monkeypatch.setattr(durable, "fsync_dir", fails_after_current)
    result = await push(local, tensors(1.0))
    assert result.version == 1 and engine.engine.weight_version == 1 and store.current_version() == 1
    assert len(result.warnings) == 1 and "may not survive a power loss" in result.warnings[0]
    assert "store verify" in result.warnings[0] and local.last_push.warnings == result.warnings


async def test_a_push_syncs_its_shards_as_written_then_the_manifest_then_current_then_deletes(tmp_path, monkeypatch):
    """Each shard is synced on the conversion thread as it is written (not on the event loop, not
    at the commit); the commit syncs the shards' directory, the manifest, the store directory,
    then renames CURRENT and syncs the directory again; an old version is deleted after that."""
    store = VersionStore(tmp_path / "store", keep=2)
    local = one_replica_push(WeightServiceDoubleForPushTest(store), store)
    await push(local, tensors(1.0))
    await push(local, tensors(2.0))
    calls: list[tuple[str, Path, str, str, bool]] = []  # (helper, path, thread, CURRENT then, v000001 there)

    def recorded(helper):
        def call(path, sync=True):
            current = (store.root / "CURRENT").read_text()
            calls.append((helper.__name__, Path(path), threading.current_thread().name, current, (store.root / "v000001").exists()))
            return helper(path, sync)

        return call

    monkeypatch.setattr(durable, "fsync_file", recorded(durable.fsync_file))
    monkeypatch.setattr(durable, "fsync_dir", recorded(durable.fsync_dir))
    monkeypatch.setattr(staging, "PART_BYTES", 1)  # a part per tensor: two parts
    result = await push(local, tensors(3.0))
    assert result.version == 3
    parts = [i for i, (_, path, *_) in enumerate(calls) if path.name.startswith("part-")]
    assert len(parts) == 2 and all(calls[i][2].startswith("push-convert") for i in parts)  # off the receive path
    (push_dir,) = store.root.glob("v000003-push-*")
    kinds = {
        push_dir: "the push's directory", store.root / "v000003": "the version's directory", store.root: "the store",
        store.root / "v000001": "the old version's directory",
    }

    def kind(path: Path) -> str:
        if path in kinds:
            return kinds[path]
        return path.name.split(".")[1] if path.name.startswith(".") else path.name  # .CURRENT.<pid>.<thread>.tmp

    assert [kind(path) for _, path, *_ in calls[parts[-1] + 1 :]] == [
        "the push's directory",  # the parts' entries
        "manifest",  # the manifest, before its rename
        "the version's directory",  # its rename
        "the store",  # the adopted directory and the version's directory
        "CURRENT",  # CURRENT, before its rename
        "the store",  # its rename: the commit is durable
        "the old version's directory",  # its manifest deleted, before its files
    ]
    current_then = [c[3] for c in calls]
    assert current_then[: parts[-1] + 6] == ["2"] * (parts[-1] + 6) and current_then[-2] == "3"
    assert calls[-2][4] and not (store.root / "v000001").exists()  # deleted only after the durable commit
    assert versions_on_disk(store.root) == ["v000002", "v000003"]


def config_on(tmp_path: Path, store: Path):
    from rollout_service.config import ServerConfig

    model = tmp_path / "model" if (tmp_path / "model").exists() else _checkpoint(tmp_path / "model", 1.0)
    return ServerConfig(model=model, weights_dir=store, cache_dir=tmp_path / "cache", keep_versions=3)


def torn_store(tmp_path: Path) -> tuple[object, VersionStore]:
    """A store of two committed versions (as a server leaves it), closed."""
    config = config_on(tmp_path, tmp_path / "store")
    store = open_store(config, shared=False)
    commit_one(store, {"a.weight": t(1), "b.weight": t(1)})
    commit_one(store, {"a.weight": t(2)})
    store.close()
    return config, store


def shard_of(store: VersionStore, version: int, name: str = "a.weight") -> Path:
    return store.root / store.manifest(version).tensors[name].file


async def test_a_temporary_store_syncs_nothing(tmp_path, monkeypatch):
    """A single-process server without --weights-dir keeps its versions in a store deleted at stop:
    nothing in it must survive a power loss, so a push to it calls no fsync at all."""
    import os

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    store = VersionStore(tmp_path / "temporary", keep=3, temporary=True)
    await push(one_replica_push(WeightServiceDoubleForPushTest(store), store), tensors(1.0))
    assert store.current_version() == 1 and synced == []
    kept = VersionStore(tmp_path / "kept", keep=3)
    await push(one_replica_push(WeightServiceDoubleForPushTest(kept), kept), tensors(1.0))
    assert synced  # the same push to a kept store syncs


@pytest.mark.parametrize(
    "tear, file, problem",
    [
        (lambda s: (s.root / "CURRENT").write_text(""), "CURRENT", "empty is not a version number"),
        (lambda s: (s.root / "v000002" / "manifest.json").write_text('{"version": 2, "lab'), "v000002/manifest.json", "not a complete manifest"),
        (lambda s: (s.root / "v000002" / "manifest.json").unlink(), "v000002/manifest.json", "missing, and CURRENT names version 2"),
        (lambda s: shard_of(s, 2).write_bytes(b""), "v000002-push-", "truncated (0 bytes, not even a header)"),
        (lambda s: shard_of(s, 2).write_bytes(shard_of(s, 2).read_bytes()[:-5]), "v000002-push-", "a.weight ends at byte"),
        (lambda s: shard_of(s, 2, "b.weight").write_bytes(shard_of(s, 2, "b.weight").read_bytes()[:20]), "v000001-push-", "truncated"),
        (lambda s: (s.root / "FENCE").write_text(""), "FENCE", "empty is not a fencing token"),
        (lambda s: (s.root / "BASE.json").write_text('{"identity": "ab'), "BASE.json", "is not the record of a checkpoint"),
    ],
    ids=["empty CURRENT", "truncated manifest", "missing manifest", "empty shard", "truncated shard", "truncated older shard", "empty FENCE", "torn BASE.json"],
)
def test_a_torn_store_is_refused_at_start_naming_the_file_and_what_to_do(tmp_path, tear, file, problem):
    config, store = torn_store(tmp_path)
    tear(store)
    with pytest.raises(ConfigError) as refused:
        open_store(config, shared=False)
    message = str(refused.value)
    assert f"{store.root}/{file}" in message and problem in message, message
    assert f"rollout-service store repair {store.root}" in message and f"rollout-service store verify {store.root}" in message
    VersionStore(store.root, 3).lock()  # refused, it did not keep the store locked


def test_an_intact_store_opens_with_leftovers_of_a_cut_off_commit(tmp_path):
    """A commit cut off after its manifest (CURRENT not renamed) is not damage: the store opens on
    the version before it, and the next start's clean deletes the left-over."""
    config, store = torn_store(tmp_path)
    manifest = json.loads((store.root / "v000002" / "manifest.json").read_text())
    (store.root / "v000003").mkdir()
    (store.root / "v000003" / "manifest.json").write_text(json.dumps({**manifest, "version": 3}))
    reopened = open_store(config, shared=False)
    assert reopened.current_version() == 2
    reopened.clean()
    assert versions_on_disk(store.root) == ["v000001", "v000002"]
    reopened.close()


def test_a_shard_torn_behind_a_whole_header_is_found_by_its_crc_at_load(tmp_path):
    """Bytes changed in place (same size): the start-up check passes (it reads headers and sizes),
    the load's CRC-32 check refuses it, naming the file and the tensor."""
    from rollout_service.errors import DataLoss

    config, store = torn_store(tmp_path)
    path = shard_of(store, 2)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    reopened = open_store(config, shared=False)
    with pytest.raises(DataLoss, match=rf"{path}: a.weight has CRC-32 .* the manifest says .*version 2"):
        reopened.verify(reopened.current())
    reopened.close()


def test_sizes_of_a_stored_tensor_follow_its_dtype(tmp_path):
    store = VersionStore(tmp_path, keep=2)
    manifest = commit_one(store, {"a.weight": t(1), "f": torch.ones(3, 5)})
    assert manifest.tensors["a.weight"].nbytes == 24 and manifest.tensors["f"].nbytes == 60


class SimulatedCrash(BaseException):
    """The process died here (no code of the store catches it)."""


@pytest.mark.parametrize("dies_after", [1, 2, 3])
def test_a_crash_between_deletions_leaves_no_manifest_naming_deleted_shards(tmp_path, monkeypatch, dies_after):
    """A smaller keep drops versions 1 and 2 at once; v2 names v1's shard of b, which no kept
    version does (v3 pushed b again), and v1's directories sort before v2's. The process dies
    after the `dies_after`-th directory deleted. Restarted with a larger keep, every version in
    its window either verifies or is gone (manifests are deleted before any shard)."""
    store = VersionStore(tmp_path, keep=4)
    commit_one(store, {"a.weight": t(1), "b.weight": t(1)})
    commit_one(store, {"a.weight": t(2)})
    commit_one(store, {"b.weight": t(3)})
    commit_one(store, {"a.weight": t(4)})
    deleted = []

    def dies(name):  # test double of the fault point: counts deletions, dies after `dies_after`
        deleted.append(name)
        if len(deleted) == dies_after:
            raise SimulatedCrash()

    monkeypatch.setattr("rollout_service.faults.fault_point", dies)
    with pytest.raises(SimulatedCrash):
        VersionStore(tmp_path, keep=2).clean()
    monkeypatch.undo()
    restarted = VersionStore(tmp_path, keep=4)
    restarted.clean()
    assert restarted.current_version() == 4
    for version in range(1, 5):
        try:
            restarted.verify(restarted.manifest(version))
        except FileNotFoundError:
            assert version < 3  # dropped under keep 2
