"""The server's shared-memory directory (weights/shared.py), no engine: it takes the bytes a client
wrote and deletes the file at once, refuses every name and offset that is not a client's file in
it, and removes the directories of servers that died without removing theirs."""

from __future__ import annotations

import fcntl
import os
import stat

import pytest

from rollout_service.errors import InvalidArgument
from rollout_service.weights.manifest import SharedBytes
from rollout_service.weights.shared import TOKEN_FILE, SharedMemoryDir


@pytest.fixture
def shared(tmp_path):
    made = SharedMemoryDir(tmp_path)
    yield made
    made.close()


def test_the_directory_is_private_and_holds_the_token(shared):
    assert stat.S_IMODE(shared.dir.stat().st_mode) == 0o700
    assert (shared.dir / TOKEN_FILE).read_text() == shared.token and len(shared.token) == 32


def test_a_file_is_mapped_and_deleted_and_its_tensors_read_at_their_offsets(shared):
    (shared.dir / "push-1.bin").write_bytes(b"abcdefgh" + b"0123456789")
    mapped: dict[str, memoryview] = {}
    first = shared.take(SharedBytes("push-1.bin", 0), 8, "tensors[0].shared", mapped)
    assert not (shared.dir / "push-1.bin").exists()  # the client may write its next file
    second = shared.take(SharedBytes("push-1.bin", 8), 10, "tensors[1].shared", mapped)  # from the same map
    assert bytes(first) == b"abcdefgh" and bytes(second) == b"0123456789"
    with pytest.raises(TypeError):
        first[0] = 0  # read-only: the server never writes into the client's bytes


@pytest.mark.parametrize(
    "name, field, problem",
    [
        ("missing.bin", "file", "is not in the server's shared-memory directory"),
        ("../escape.bin", "file", "is not a file name the client may have written"),
        ("/etc/passwd", "file", "is not a file name"),
        (TOKEN_FILE, "file", "is not a file name"),
        (".hidden", "file", "is not a file name"),
        ("link.bin", "file", "cannot be opened"),
        ("subdir", "file", "is not a regular file"),
        ("empty.bin", "file", "is not a regular file with bytes in it"),
        ("short.bin", "offset", "holds 4 bytes; the tensor's 8 at offset 0 run past its end"),
    ],
)
def test_every_name_that_is_not_a_clients_file_and_every_offset_past_its_end_is_refused(shared, tmp_path, name, field, problem):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x" * 8)
    (shared.dir / "link.bin").symlink_to(outside)
    (shared.dir / "subdir").mkdir()
    (shared.dir / "empty.bin").touch()
    (shared.dir / "short.bin").write_bytes(b"1234")
    with pytest.raises(InvalidArgument) as refused:
        shared.take(SharedBytes(name, 0), 8, "tensors[3].shared", {})
    assert refused.value.field == f"tensors[3].shared.{field}" and problem in str(refused.value)
    assert outside.read_bytes() == b"x" * 8


def test_a_dead_servers_directory_is_removed_and_a_live_ones_kept(tmp_path):
    live = SharedMemoryDir(tmp_path)
    dead = tmp_path / "rollout-service-dead"
    dead.mkdir()
    (dead / TOKEN_FILE).write_text("t")  # nobody holds its lock: its server is gone
    (dead / "push-1.bin").write_bytes(b"left behind")
    other = tmp_path / "unrelated"
    other.mkdir()
    second = SharedMemoryDir(tmp_path)
    try:
        assert not dead.exists() and live.dir.exists() and other.exists()
        fd = os.open(live.dir / TOKEN_FILE, os.O_RDONLY)
        with pytest.raises(BlockingIOError):  # held by the live server
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(fd)
    finally:
        second.close()
        live.close()
    assert not live.dir.exists() and not second.dir.exists()


def test_without_a_usable_root_the_server_takes_no_shared_memory(tmp_path):
    assert SharedMemoryDir.create(None) is None
    assert SharedMemoryDir.create(tmp_path / "no-such-dir") is None


def test_files_of_pushes_whose_clients_died_are_swept_and_nothing_else(shared):
    """Ages an hour apart on each side of the limit: only a test stalled for an hour between
    writing and sweeping could see the live file as old (no timing is measured)."""
    old, new = shared.dir / "push-dead.bin", shared.dir / "push-live.bin"
    old.write_bytes(b"x")
    new.write_bytes(b"y")
    limit_s = 3600
    written = new.stat().st_mtime
    os.utime(old, (written - 2 * limit_s, written - 2 * limit_s))
    shared.sweep(older_than_s=limit_s)
    assert sorted(p.name for p in shared.dir.iterdir()) == ["push-live.bin", TOKEN_FILE]
