"""Same-host pushes: each bucket of tensors is written into one file in the server's shared-memory
directory (GetStatusResponse.shared_memory), and the push stream carries only the file's name and
the tensors' offsets (TensorSpec.shared). One copy into memory the server maps, instead of
serializing, framing and copying the bytes through gRPC and two sockets.

The client uses it when it reads the server's token in that directory (same host, same /dev/shm,
a user allowed in); the server deletes each file once it has taken it, and the client writes at
most MAX_FILES files ahead of it, so shared memory holds a few buckets, never the model.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import deque
from pathlib import Path

import numpy as np

from rollout_client._proto.rollout.v1 import rollout_pb2 as pb

MAX_FILES = 2  # buckets written and not yet taken by the server
_ALIGN = 64  # tensor offsets in a file: any element size, and cache lines
_POLL_S = 0.001
_MAX_WRITE = 1 << 30  # one write at a time (Linux writes at most ~2 GiB per call)


def sees(info: pb.SharedMemory) -> bool:
    """Whether this process sees the server's shared-memory directory (reads its token there)."""
    if not info.dir:
        return False
    try:
        return (Path(info.dir) / "token").read_text() == info.token
    except (OSError, UnicodeDecodeError):
        return False


class Stopped(Exception):
    """The push stopped while its stream waited for the server to take a file."""


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

    def again(self) -> SharedWriter:
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
