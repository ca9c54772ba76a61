"""Converted tensors wait on disk for the commit, in safetensors parts of a bounded size.

Staging to files keeps memory bounded whatever the model size (the engine reads the parts with
mmap, module by module), makes an aborted push free to drop (delete the directory), and gives the
engine's worker a path instead of tensors to unpickle. A spool of the weight store (`durable`)
syncs each part to the disk as it writes it: on the thread converting the push, so that the
commit waits for the last part's sync only; an engine's own staging is rebuilt after a crash and
is not synced.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

from rollout_service.weights import durable as _durable

_SAFETENSORS_DTYPE = {
    torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.int8: "I8",
    torch.float8_e4m3fn: "F8_E4M3",
}


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' file format, written straight from the tensors' memory. (safetensors'
    save_file first copies every tensor into a bytes object: a third of a push's conversion time.)"""
    header, offset = {}, 0
    for name, t in tensors.items():
        header[name] = {"dtype": _SAFETENSORS_DTYPE[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the format asks
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy())


_NO_LINK = (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP)
# Size of the staged part files the engine reads back.
PART_BYTES = 64 * 1024 * 1024


# Called with each part file as it is written and the names of the tensors in it.
PartWritten = Callable[[Path, list[str]], None]


class ShardWriter:
    """One push's staging directory: `add` converted tensors, `flush` writes a part file (synced
    to the disk when `durable`) and hands it to `on_part` (a push fans it out to the replicas as
    it is written: serve/fanout.py); `take` adopts a part written elsewhere."""

    def __init__(self, root: Path, part_bytes: int = PART_BYTES, durable: bool = False, on_part: PartWritten | None = None):
        self.dir = root / f"push-{uuid.uuid4().hex[:12]}"
        self.dir.mkdir(parents=True)
        self._part_bytes = part_bytes
        self._durable = durable
        self.on_part = on_part
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self.files: dict[str, Path] = {}  # tensor name -> part holding it

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            self._pending[name] = t.contiguous()
            self._pending_bytes += t.numel() * t.element_size()
        if self._pending_bytes >= self._part_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.dir / f"part-{len(set(self.files.values())):05d}.safetensors"
        try:
            write_safetensors(self._pending, path)
            if self._durable:
                _durable.fsync_file(path)
        except OSError as exc:
            if exc.filename is None:  # write() names no file; the client is told which one failed
                raise OSError(exc.errno, exc.strerror, str(path)) from exc
            raise
        names = list(self._pending)
        for name in names:
            self.files[name] = path
        self._pending, self._pending_bytes = {}, 0
        if self.on_part is not None:
            self.on_part(path, names)

    def take(self, part: str, source: Path | memoryview, names: list[str]) -> None:
        """Adopt part file `part`, converted elsewhere, holding tensors `names`: a file on this
        machine hard-linked in (no copy; copied where it is on another filesystem), or its bytes
        (a buffer, e.g. a Ray object read zero-copy) written."""
        target = self.dir / Path(part).name  # a name, never a path out of this directory
        if isinstance(source, Path):
            try:
                os.link(source, target)
            except OSError as exc:  # another filesystem, or one without hard links: copy
                if exc.errno not in _NO_LINK:
                    raise
                shutil.copyfile(source, target)
        else:
            with open(target, "wb") as f:
                f.write(source)
        for name in names:
            self.files[name] = target

    def discard(self) -> None:
        self._pending = {}
        shutil.rmtree(self.dir, ignore_errors=True)
