"""The client's side of same-host pushes (rollout_client.shared), no server: who can_share_memory_with the server's
directory, how a bucket is written, how far the writer runs ahead of the server, and that a stopped
push neither hangs nor leaves files behind."""

from __future__ import annotations

import errno
import fcntl
import os
import threading

import numpy as np
import pytest
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb

from rollout_client import push
from rollout_client.shared import MAX_FILES, SharedWriter, Stopped, can_share_memory_with


def _serving(directory) -> int:
    """A live server's token in `directory`: written and locked (as weights/shared.py does)."""
    (directory / "token").write_text("abc")
    fd = os.open(directory / "token", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_only_a_process_that_reads_a_live_servers_token_there_as_its_user_sees_its_directory(tmp_path):
    lock = _serving(tmp_path)
    info = pb.SharedMemory(dir=str(tmp_path), token="abc")
    assert can_share_memory_with(info)
    assert not can_share_memory_with(pb.SharedMemory(dir=str(tmp_path), token="another server's"))
    assert not can_share_memory_with(pb.SharedMemory(dir=str(tmp_path / "elsewhere"), token="abc"))  # another host's /dev/shm
    assert not can_share_memory_with(pb.SharedMemory())  # the server takes none
    os.close(lock)  # its server died: the directory is still there, the lock is not
    assert not can_share_memory_with(info)


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a directory's owner needs root")
def test_root_does_not_see_another_users_directory_whose_server_could_not_read_its_files(tmp_path):
    lock = _serving(tmp_path)
    os.chown(tmp_path, 12345, -1)  # the server's user; this process (root) still reads the token
    try:
        assert not can_share_memory_with(pb.SharedMemory(dir=str(tmp_path), token="abc"))
    finally:
        os.chown(tmp_path, 0, -1)
        os.close(lock)


def test_a_bucket_is_one_file_with_each_tensor_at_an_aligned_offset(tmp_path):
    a, b = np.arange(5, dtype=np.uint8), np.arange(100, dtype=np.uint8)
    name, offsets = SharedWriter(tmp_path).write([a, b])
    data = (tmp_path / name).read_bytes()
    assert offsets == [0, 64] and len(data) == 164
    assert data[:5] == a.tobytes() and data[64:] == b.tobytes()


def test_the_writer_waits_while_the_server_has_not_taken_earlier_files(tmp_path):
    """Shared memory holds MAX_FILES buckets, never the model. No timing: a write without room
    can end only by waiting until the server takes a file, or by the push stopping meanwhile
    (Stopped), never by writing; the timeouts only bound a hang."""
    stopped, taken = tmp_path / "stopped", tmp_path / "taken"
    for d in (stopped, taken):
        d.mkdir()
    writer = SharedWriter(stopped)
    names = [writer.write([np.ones(8, np.uint8)])[0] for _ in range(MAX_FILES)]
    ended = []
    thread = threading.Thread(target=lambda: ended.append(_outcome(writer.write, [np.ones(8, np.uint8)])), daemon=True)
    thread.start()
    writer.stop()  # before or after it began to wait: either way it must not write
    thread.join(60)
    assert ended == ["Stopped"] and sorted(p.name for p in stopped.iterdir()) == sorted(names)

    writer = SharedWriter(taken)
    names = [writer.write([np.ones(8, np.uint8)])[0] for _ in range(MAX_FILES)]
    done = threading.Event()
    threading.Thread(target=lambda: (writer.write([np.ones(8, np.uint8)]), done.set()), daemon=True).start()
    (taken / names[0]).unlink()  # the server took the oldest
    assert done.wait(60)
    left = sorted(p.name for p in taken.iterdir())
    assert len(left) == MAX_FILES and names[0] not in left and set(names[1:]) <= set(left)


def _outcome(call, *args) -> str:
    try:
        call(*args)
    except Stopped:
        return "Stopped"
    return "returned"


def test_a_stopped_push_stops_waiting_and_closing_deletes_what_the_server_did_not_take(tmp_path):
    writer = SharedWriter(tmp_path)
    pulled = threading.Event()

    def tensors():
        for i in range(4):
            if i == MAX_FILES:
                pulled.set()  # its bucket is next: no room for it until the server takes a file
            yield f"t{i}", np.full(16, i, np.float32)

    source = push.SourceErrors(push.requests(tensors(), bucket_bytes=1, shared=writer), writer)
    taken = [next(source) for _ in range(1 + MAX_FILES)]  # the header, then a declare per bucket
    assert [m.WhichOneof("kind") for m in taken[1:]] == ["declare"] * MAX_FILES  # no chunks: the bytes are in files
    assert all(m.declare.tensors[0].HasField("shared") for m in taken[1:])
    drawn: list = []
    blocked = threading.Thread(target=lambda: drawn.extend(source), daemon=True)
    blocked.start()
    assert pulled.wait(60)  # the thread is at the next bucket, which must wait for the server
    _bounded(source.close)
    blocked.join(60)
    assert not blocked.is_alive() and source.error is None
    assert drawn == []  # the stream ended without writing another bucket (nor committing)
    assert list(tmp_path.iterdir()) == []


def _bounded(call, timeout_s: float = 120) -> None:
    """Run `call` on a thread and fail (instead of hanging the suite) if it does not return."""
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{call} did not return within {timeout_s} s"


def test_a_tensor_with_no_bytes_is_declared_without_a_file(tmp_path):
    writer = SharedWriter(tmp_path)
    messages = list(push.requests({"empty": np.zeros(0, np.float32), "x": np.ones(4, np.float32)}, shared=writer))
    empty, x = messages[1].declare.tensors
    assert not empty.HasField("shared") and x.shared.offset == 0 and x.shared.file
    assert [m.WhichOneof("kind") for m in messages] == ["header", "declare", "commit"]  # no chunks at all


def test_closing_never_waits_for_a_caller_generator_that_waits_for_the_push_to_end(tmp_path):
    """gRPC's thread may be inside the caller's generator when the call fails, and the generator
    may wait for that very call to return (two pushes racing, the loser's gather waiting for a
    flag the caller sets once push_weights returns): closing must not wait for it."""
    inside, released = threading.Event(), threading.Event()
    released_by_caller = []

    def held():
        yield "a", np.ones(4, np.float32)
        inside.set()
        # Set by the caller only after close() has returned: a close that waited for this thread
        # would leave it here until the bound, which the test then reports (no timing measured).
        released_by_caller.append(released.wait(60))
        yield "b", np.ones(4, np.float32)

    writer = SharedWriter(tmp_path)
    source = push.SourceErrors(push.requests(held(), bucket_bytes=1, shared=writer), writer)
    next(source)  # the header
    drawing = threading.Thread(target=lambda: list(source), daemon=True)
    drawing.start()
    assert inside.wait(60)  # gRPC's thread now waits inside the generator
    _bounded(source.close)
    released.set()
    drawing.join(60)
    assert released_by_caller == [True]
    assert not drawing.is_alive() and list(tmp_path.iterdir()) == []  # nothing written after the close


def test_a_full_shared_memory_streams_the_rest_of_the_push_and_leaves_no_file(tmp_path, monkeypatch):
    """A container's /dev/shm is 64 MiB by default: a bucket that does not fit is streamed."""
    writer = SharedWriter(tmp_path)

    def full(fd, data, offset):  # test double of a tmpfs out of room
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    tensors = {"a": np.ones(4, np.float32), "b": np.ones(4, np.float32)}
    with pytest.warns(UserWarning, match="shared memory is full .* streaming the rest of this push"):
        messages = list(push.requests(tensors, bucket_bytes=1, shared=writer))
    kinds = [m.WhichOneof("kind") for m in messages]
    assert kinds == ["header", "declare", "chunk", "declare", "chunk", "commit"]
    assert not any(t.HasField("shared") for m in messages if m.HasField("declare") for t in m.declare.tensors)
    assert list(tmp_path.iterdir()) == []
