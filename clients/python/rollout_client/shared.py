"""Same-host pushes: each bucket of tensors is written into one file in the server's shared-memory
directory (GetStatusResponse.shared_memory), and the push stream carries only the file's name and
the tensors' offsets (TensorSpec.shared). One copy into memory the server maps, instead of
serializing, framing and copying the bytes through gRPC and two sockets.

The client uses it when it reads the server's token in that directory (same host, same /dev/shm,
a user allowed in); the server deletes each file once it has taken it, and the client writes at
most MAX_FILES files ahead of it, so shared memory holds a few buckets, never the model.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import numpy as np

from rollout_client.proto.rollout.v1 import rollout_pb2 as pb

MAX_FILES = 2  # buckets written and not yet taken by the server
_ALIGN = 64  # tensor offsets in a file: any element size, and cache lines
_POLL_S = 0.001
_MAX_WRITE = 1 << 30  # one write at a time (Linux writes at most ~2 GiB per call)


def can_share_memory_with(info: pb.SharedMemory) -> bool:
    """Whether this process can hand tensors to the server through its shared-memory directory:
    it reads the server's token there (same host, same /dev/shm), it runs as the directory's owner
    (root reads it too, but the server could not read root's files), and the server is alive (it
    holds the token's lock)."""
    if not info.dir:
        return False
    try:
        if os.stat(info.dir).st_uid != os.geteuid():
            return False
        fd = os.open(Path(info.dir) / "token", os.O_RDONLY)
    except OSError:
        return False
    try:
        if os.read(fd, 256) != info.token.encode():
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # its server holds the lock
        return False  # a dead server's directory, not yet removed
    finally:
        os.close(fd)


class Stopped(Exception):
    """The push stopped while its stream waited for the server to take a file."""


class Full(Exception):
    """Shared memory has no room for a bucket (a container's 64 MiB /dev/shm): stream it."""


class SharedWriter:
    """A push's files in the server's directory `dir`. `write` runs on gRPC's thread (it draws the
    request stream), `stop` and `close` on the caller's, without waiting for that thread: it may
    be inside the caller's own generator, which may wait for the push to end."""

    def __init__(self, dir: Path):
        self.dir = dir
        self._files: deque[str] = deque()  # written, maybe not yet taken (deleted) by the server
        self._lock = threading.Lock()  # guards _files and _closed
        self._closed = False
        self._stopped = threading.Event()

    def for_next_push(self) -> SharedWriter:
        """A writer for another push (a refused delta push sent again whole) to the same server."""
        return SharedWriter(self.dir)

    def write(self, payloads: list[np.ndarray]) -> tuple[str, list[int]]:
        """Write the tensors' bytes into a new file; returns its name and each one's offset. Waits
        while MAX_FILES earlier files are still there (raises Stopped if the push stops meanwhile)."""
        self._wait_for_room()
        offsets, size = [], 0
        for p in payloads:
            size += -size % _ALIGN
            offsets.append(size)
            size += p.nbytes
        free = os.statvfs(self.dir)
        if free.f_bavail * free.f_frsize < size:
            raise Full(f"{self.dir} has {free.f_bavail * free.f_frsize / 2**20:.0f} MiB free, a bucket needs {size / 2**20:.0f} MiB")
        name = f"push-{os.getpid()}-{uuid.uuid4().hex[:16]}.bin"
        with self._lock:
            if self._closed:
                raise Stopped
            fd = os.open(self.dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._files.append(name)  # before writing: close() deletes it whatever happens next
        try:
            os.ftruncate(fd, size)
            for p, offset in zip(payloads, offsets):
                view = memoryview(p).cast("B")
                for start in range(0, len(view), _MAX_WRITE):
                    part = view[start : start + _MAX_WRITE]
                    written = 0
                    while written < len(part):
                        written += os.pwrite(fd, part[written:], offset + start + written)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self._forget(name)
            raise Full(f"{self.dir} ran out of room for a {size / 2**20:.0f} MiB bucket") from None
        finally:
            os.close(fd)
        if self._closed:  # closed while writing: close() may have missed it
            _unlink(self.dir / name)
            raise Stopped
        return name, offsets

    def stop(self) -> None:
        """End a wait for the server (the push failed); writing goes on only to end the stream."""
        self._stopped.set()

    def close(self) -> None:
        """After the push: no more files, and those the server did not take (a failed push) deleted."""
        self._stopped.set()
        with self._lock:
            self._closed = True
            while self._files:
                _unlink(self.dir / self._files.popleft())

    def _forget(self, name: str) -> None:
        with self._lock:
            if name in self._files:
                self._files.remove(name)
        _unlink(self.dir / name)

    def _wait_for_room(self) -> None:
        while True:
            with self._lock:
                while self._files and not (self.dir / self._files[0]).exists():
                    self._files.popleft()
                if len(self._files) < MAX_FILES:
                    return
            if self._stopped.is_set():
                raise Stopped
            time.sleep(_POLL_S)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:  # the server took it
        pass
