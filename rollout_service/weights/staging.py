"""Converted tensors wait on disk for the commit, in safetensors parts of a bounded size.

Staging to files keeps memory bounded whatever the model size (the engine reads the parts with
mmap, module by module), makes an aborted push free to drop (delete the directory), and gives the
engine's worker a path instead of tensors to unpickle.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file


class Spool:
    """One push's staging directory: `add` converted tensors, `flush` writes a part file."""

    def __init__(self, root: Path, part_bytes: int):
        self.dir = root / f"push-{uuid.uuid4().hex[:12]}"
        self.dir.mkdir(parents=True)
        self._part_bytes = part_bytes
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
        save_file(self._pending, path)
        for name in self._pending:
            self.files[name] = path
        self._pending, self._pending_bytes = {}, 0

    def discard(self) -> None:
        self._pending = {}
        shutil.rmtree(self.dir, ignore_errors=True)
