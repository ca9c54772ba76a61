"""The weight store: versions as shards + manifest, overlaid pushes, the last K kept, checksums, the
checkpoint a store belongs to, and the lock a single-process server holds on it."""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
import sys
import time

import pytest
import torch

from rollout_service.errors import ConfigError, Conflict, DataLoss
from rollout_service.weights.staging import ShardWriter
from rollout_service.weights.versions import VersionStore, base_identity, crc32_of, store_root


def received(store: VersionStore, tensors: dict[str, torch.Tensor], version: int):
    """A push received and adopted as a candidate for `version`, not committed."""
    spool = ShardWriter(store.incoming, 1 << 20)
    spool.add(tensors)
    spool.flush()
    return store.adopt(spool.dir, spool.files, version), {n: crc32_of(t) for n, t in tensors.items()}


def push(store: VersionStore, tensors: dict[str, torch.Tensor], label: str = "", fence: int | None = None):
    version = store.current_version() + 1
    files, crc = received(store, tensors, version)
    return store.commit(version, files, crc, label, fence)


def t(value: float, shape=(4, 3)) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.bfloat16)


def test_manifest_overlays_partial_pushes_and_names_dtype_shape_crc(tmp_path):
    store = VersionStore(tmp_path, keep=3)
    assert store.current_version() == 0 and store.current() is None
    push(store, {"a.weight": t(1), "b.weight": t(2)}, "step-1")
    m = push(store, {"b.weight": t(3)}, "step-2")
    assert store.current_version() == 2 and m.label == "step-2"
    assert m.tensors["a.weight"].file.startswith("v000001-push-")
    assert m.tensors["b.weight"].file.startswith("v000002-push-")
    assert m.tensors["b.weight"].dtype == "BF16" and m.tensors["b.weight"].shape == [4, 3]
    assert m.tensors["b.weight"].crc32 == crc32_of(t(3))
    assert store.current() == m  # read back from disk
    store.verify(m)


def test_only_the_last_k_versions_and_what_they_reference_are_kept(tmp_path):
    store = VersionStore(tmp_path, keep=2)
    push(store, {"a.weight": t(1), "b.weight": t(1)})  # v1: a stays referenced by every later manifest
    for v in range(2, 6):
        push(store, {"b.weight": t(v)})
    kept = sorted(d.name.split("-")[0] for d in tmp_path.glob("v*"))  # manifest and tensor directories
    assert kept == ["v000001", "v000004", "v000004", "v000005", "v000005"]  # v1: its tensors only


def test_verify_names_a_tensor_whose_bytes_changed(tmp_path):
    store = VersionStore(tmp_path, keep=2)
    m = push(store, {"a.weight": t(1)})
    path = tmp_path / m.tensors["a.weight"].file
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(DataLoss, match="a.weight"):
        store.verify(m)


def test_clean_drops_interrupted_and_uncommitted_pushes(tmp_path):
    store = VersionStore(tmp_path, keep=2)
    push(store, {"a.weight": t(1)})
    ShardWriter(store.incoming, 1 << 20)  # a push that was receiving when the process died
    spool = ShardWriter(store.incoming, 1 << 20)
    spool.add({"a.weight": t(2)})
    spool.flush()
    store.adopt(spool.dir, spool.files, 2)  # prepared, never committed
    store.clean()
    assert list(store.incoming.iterdir()) == []
    assert sorted(d.name.split("-")[0] for d in tmp_path.glob("v*")) == ["v000001", "v000001"]
    assert store.current_version() == 1


def _checkpoint(path, value: float):
    from safetensors.torch import save_file

    path.mkdir()
    (path / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": torch.full((64, 64), value)}, str(path / "model.safetensors"))
    return path


def test_a_store_is_refused_to_a_server_loading_another_checkpoint(tmp_path):
    base, other = _checkpoint(tmp_path / "base", 1.0), _checkpoint(tmp_path / "other", 2.0)
    copied = tmp_path / "copied"
    shutil.copytree(base, copied)
    store = VersionStore(tmp_path / "store", keep=2)
    store.bind(base_identity(base), base)
    store.bind(base_identity(copied), copied)  # a copy is the same checkpoint
    with pytest.raises(ConfigError, match=r"weights_dir .*store: its versions were pushed onto .*base .*not onto .*other"):
        VersionStore(tmp_path / "store", keep=2).bind(base_identity(other), other)


def test_the_default_store_is_one_per_checkpoint(tmp_path):
    from rollout_service.config import ServerConfig

    a, b = _checkpoint(tmp_path / "a", 1.0), _checkpoint(tmp_path / "b", 2.0)
    roots = {store_root(ServerConfig(model=m, cache_dir=tmp_path / "cache")) for m in (a, a, b)}
    assert len(roots) == 2 and all(r.parent == tmp_path / "cache" / "weights" for r in roots)
    assert store_root(ServerConfig(model=a, weights_dir=tmp_path / "mine")) == tmp_path / "mine"


LOCKER = (
    "import sys; from pathlib import Path; from rollout_service.weights.versions import VersionStore; "
    "VersionStore(Path(sys.argv[1]), 2).lock(shared=sys.argv[2] == 'shared')"
)


def lock_elsewhere(root, shared: bool = False) -> subprocess.CompletedProcess:
    """Lock `root` from another process (as another server would)."""
    return subprocess.run([sys.executable, "-c", LOCKER, str(root), "shared" if shared else "alone"], capture_output=True, text=True)


def test_a_single_process_server_holds_its_store_alone(tmp_path):
    store = VersionStore(tmp_path, keep=2)
    store.lock()
    for shared in (False, True):
        other = lock_elsewhere(tmp_path, shared)
        assert other.returncode != 0 and f"weights_dir {tmp_path} is in use by" in other.stderr
    store.close()
    assert lock_elsewhere(tmp_path).returncode == 0


def test_a_deployments_processes_share_a_store_and_keep_a_single_process_server_out(tmp_path):
    VersionStore(tmp_path, keep=2).lock(shared=True)  # kept: the store object lives on in the lock's fd
    assert lock_elsewhere(tmp_path, shared=True).returncode == 0
    assert "is in use by another running server" in lock_elsewhere(tmp_path).stderr


def test_the_lock_is_not_inherited_by_a_forked_process(tmp_path):
    """vLLM forks its engine process from the server: killed, the server must not leave its store
    locked by an engine that outlives it."""
    store = VersionStore(tmp_path, keep=2)
    store.lock()
    child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
    child.start()
    try:
        store.close()
        assert lock_elsewhere(tmp_path).returncode == 0
    finally:
        child.kill()
        child.join()


def test_a_push_numbered_before_another_committed_commits_nothing(tmp_path):
    """Two pushes both numbered version 2 (the first's lock lapsed while it ran): the later commit
    is refused, and neither its tensors nor its discard touch the version that did commit."""
    store = VersionStore(tmp_path, keep=3)
    push(store, {"a.weight": t(1)})
    stale, stale_crc = received(store, {"a.weight": t(2)}, 2)
    fresh, fresh_crc = received(store, {"a.weight": t(3)}, 2)
    committed = store.commit(2, fresh, fresh_crc, "fresh")
    with pytest.raises(Conflict, match="version 2 was committed while this push ran"):
        store.commit(2, stale, stale_crc, "stale")
    store.discard(stale)
    assert store.current_version() == 2 and store.current() == committed
    store.verify(committed)


def test_a_push_under_a_lock_older_than_a_begun_push_commits_nothing(tmp_path):
    """Push A (token 1) stalls past its lock; push B takes the lock (token 2) and has not committed
    yet: A's commit is refused all the same, and B commits."""
    store = VersionStore(tmp_path, keep=3)
    store.raise_fence(1)
    a, a_crc = received(store, {"a.weight": t(1)}, 1)
    store.raise_fence(2)
    b, b_crc = received(store, {"a.weight": t(2)}, 1)
    with pytest.raises(Conflict, match=r"fencing token 1\) lapsed while it ran and a newer push \(token 2\) has begun"):
        store.commit(1, a, a_crc, "a", fence=1)
    store.discard(a)
    assert store.commit(1, b, b_crc, "b", fence=2).fence == 2
    store.raise_fence(1)  # never lowered
    assert store.fence_mark() == 2
    assert push(store, {"a.weight": t(3)}).fence == 2  # a single-process server carries the last token on


def test_a_commit_keeps_the_files_of_a_later_push_in_flight_and_clean_drops_them(tmp_path):
    store = VersionStore(tmp_path, keep=2)
    push(store, {"a.weight": t(1)})
    in_flight, _ = received(store, {"a.weight": t(9)}, 3)  # being prepared while version 2 commits
    push(store, {"a.weight": t(2)})
    assert all(path.exists() for path in in_flight.values())
    store.clean()  # no push running: what none committed goes
    assert not any(path.exists() for path in in_flight.values())
    assert store.current_version() == 2
