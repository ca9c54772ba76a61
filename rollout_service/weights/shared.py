"""Same-host pushes through shared memory: a client on this host writes a bucket of tensors into a
file in the server's directory under /dev/shm, and the push stream carries only the file's name and
each tensor's offset (TensorSpec.shared) instead of the bytes. The server maps the file read-only,
deletes it at once (its pages live as long as the mapping) and takes the tensors as if their bytes
had arrived in one chunk each: the same size, CRC-32, delta and conversion checks.

How a client knows it is on the same host: GetStatus gives the directory and a random token that
the server wrote into <dir>/token. A client that reads the same token there sees the same files
(same host, same /dev/shm, a user allowed into the 0700 directory); anyone else streams.
"""

from __future__ import annotations

import fcntl
import logging
import mmap
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from pathlib import Path

from rollout_service.errors import InvalidArgument
from rollout_service.weights.manifest import SharedBytes

log = logging.getLogger(__name__)

_PREFIX = "rollout-service-"
_FILE_NAME = re.compile(r"[A-Za-z0-9._-]{1,128}")
TOKEN_FILE = "token"


class SharedMemoryDir:
    """The server's directory of handed-over files, made at start and removed at stop."""

    def __init__(self, root: Path):
        _remove_orphans(root)
        self.dir = Path(tempfile.mkdtemp(prefix=_PREFIX, dir=root))  # mode 0700
        self.token = secrets.token_hex(16)
        try:
            # The token's lock is held while this server lives (the kernel drops it when the
            # process dies, however): how a later server, and a client, tell a dead server's
            # directory from a live one's, in any PID namespace. Written and locked under another
            # name first, so nobody ever sees the token unlocked.
            self._lock = os.open(self.dir / ".token", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(self._lock, self.token.encode())
            os.rename(self.dir / ".token", self.dir / TOKEN_FILE)
            self._fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    @classmethod
    def create(cls, root: Path | None) -> SharedMemoryDir | None:
        """The directory under `root`, or None (every client streams) where there is none."""
        if root is None:
            return None
        try:
            made = cls(root)
        except OSError as exc:
            log.warning("no same-host pushes through shared memory (%s: %s): clients stream their tensors", root, exc)
            return None
        log.info("same-host clients may hand pushed tensors over in %s", made.dir)
        return made

    def take(self, shared: SharedBytes, nbytes: int, field: str, mapped: dict[str, memoryview]) -> memoryview:
        """The `nbytes` bytes at `shared.offset` of `shared.file`, read-only. A file is mapped and
        deleted the first time one of its tensors is taken; `mapped` holds the maps of one
        declaration (a client's bucket). The memory is freed once the last view of a map is gone
        (its tensors converted and staged), so the server holds a few buckets, never the model.

        The bytes are read where they lie, not copied: a process of the server's own user that
        writes into the file after it was handed over changes what is staged (past the CRC-32
        check), and one that truncates it kills the server (SIGBUS). Only the server's user can
        write in its directory, and that user can do anything to the server anyway."""
        view = mapped.get(shared.file)
        if view is None:
            view = mapped[shared.file] = self._map_and_delete(shared.file, f"{field}.file")
        if shared.offset + nbytes > len(view):
            raise InvalidArgument(
                f"{field}.offset", f"{shared.file!r} holds {len(view)} bytes; the tensor's {nbytes} at offset "
                f"{shared.offset} run past its end"
            )
        return view[shared.offset : shared.offset + nbytes]

    def sweep(self, older_than_s: float) -> None:
        """Delete the files of pushes whose clients died before the server took them (a client
        SIGKILLed mid-push): any older than `older_than_s`, by which time a live push has been
        taken or aborted (push_idle_timeout_s)."""
        deadline = time.time() - older_than_s
        for entry in os.scandir(self.dir):
            if entry.name != TOKEN_FILE and not entry.name.startswith("."):
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < deadline:
                        os.unlink(entry.path)
                except OSError:  # taken meanwhile
                    pass

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
        os.close(self._fd)
        os.close(self._lock)

    def _map_and_delete(self, name: str, field: str) -> memoryview:
        if not _FILE_NAME.fullmatch(name) or name == TOKEN_FILE or name.startswith("."):
            raise InvalidArgument(field, f"{name!r} is not a file name the client may have written (letters, digits, '.', '_', '-')")
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self._fd)
        except FileNotFoundError:
            raise InvalidArgument(field, f"{name!r} is not in the server's shared-memory directory {self.dir}") from None
        except OSError as exc:
            raise InvalidArgument(field, f"{name!r} cannot be opened: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size == 0:
                raise InvalidArgument(field, f"{name!r} is not a regular file with bytes in it")
            try:
                view = memoryview(mmap.mmap(fd, info.st_size, access=mmap.ACCESS_READ))
            except OSError as exc:
                raise InvalidArgument(field, f"{name!r} cannot be mapped: {exc.strerror}") from None
        finally:
            os.close(fd)
        os.unlink(name, dir_fd=self._fd)  # the client waits for this before writing more
        return view


def _remove_orphans(root: Path) -> None:
    """Directories left by servers that died without removing theirs (SIGKILL): their token's
    lock is free."""
    for path in root.glob(f"{_PREFIX}*"):
        try:
            fd = os.open(path / TOKEN_FILE, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # another user's, or being made right now
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its server runs
        else:
            shutil.rmtree(path, ignore_errors=True)
        finally:
            os.close(fd)
