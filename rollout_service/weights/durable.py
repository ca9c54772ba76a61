"""Writes that survive a power loss: the only place that calls os.fsync.

A rename is atomic but not durable: until the directory holding the new name is synced, a power
loss can bring back the old entry, or (ext4, xfs) keep the new name on a file whose data never
reached the disk, which reads back empty or truncated. So the weight store syncs a file's data
before it gives the file a name others rely on, and the directory after the rename
(versions.py says in which order for a commit).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_file(path: Path, sync: bool = True) -> None:
    """Put `path`'s data and size on the disk (`sync` False: a store deleted at stop, nothing to keep)."""
    if not sync:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path, sync: bool = True) -> None:
    """Put the entries of directory `path` (files created, renamed or removed in it) on the disk."""
    if not sync:
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(source: Path, target: Path, sync: bool = True) -> None:
    """Rename `source` (already synced, in the same directory) over `target`, and sync the
    directory."""
    os.replace(source, target)
    fsync_dir(target.parent, sync)


def temp_name(path: Path) -> Path:
    """A temporary name beside `path`, this writer's own (the ingress and the replicas of a
    deployment bind a new store at once)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def write_synced(path: Path, text: str, sync: bool = True) -> None:
    """Write `text` into a new file `path` and sync it (it is renamed into place afterwards)."""
    path.write_text(text)
    fsync_file(path, sync)


def write_durably(path: Path, text: str, sync: bool = True) -> None:
    """Replace `path` with `text`: readers see the old or the new content, whole, also after a
    power loss."""
    tmp = temp_name(path)
    try:
        write_synced(tmp, text, sync)
        replace_durably(tmp, path, sync)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
