"""The weight store: every committed version on disk, the source late replicas load from.

    <weights-dir>/CURRENT                 the current version number (replaced atomically)
    <weights-dir>/v000003/manifest.json   version, label, time, and every tensor pushed since the
                                          base checkpoint: name -> file, dtype, shape, CRC-32
    <weights-dir>/v000003/part-*.safetensors   the tensors pushed in version 3
    <weights-dir>/incoming/push-*/        a push being received (deleted if it fails)

A version's manifest lists the tensors of every push so far (a push may carry any subset), each
pointing at the version directory that holds its newest bytes; tensors never pushed come from the
checkpoint the service started from. The last `keep` versions are kept, with every directory their
manifests point into; older ones are deleted. A version directory without a manifest is a push
that never committed. Writing the manifest, then CURRENT, is the commit point.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import safetensors
import torch

from rollout_service.errors import DataLoss
from rollout_service.weights.store import safetensors_header


@dataclass(frozen=True)
class StoredTensor:
    file: str  # relative to the store root
    dtype: str
    shape: list[int]
    crc32: int


@dataclass(frozen=True)
class Manifest:
    version: int
    label: str
    created: float
    tensors: dict[str, StoredTensor]

    def files(self, root: Path) -> dict[str, Path]:
        return {name: root / t.file for name, t in self.tensors.items()}


def crc32_of(tensor: torch.Tensor) -> int:
    return zlib.crc32(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


class VersionStore:
    def __init__(self, root: Path, keep: int):
        self.root = root
        self.keep = keep
        self.incoming = root / "incoming"
        self.incoming.mkdir(parents=True, exist_ok=True)

    def _dir(self, version: int) -> Path:
        return self.root / f"v{version:06d}"

    def current_version(self) -> int:
        try:
            return int((self.root / "CURRENT").read_text())
        except FileNotFoundError:
            return 0

    def manifest(self, version: int) -> Manifest | None:
        """Version `version`'s manifest (None for 0, the base checkpoint)."""
        if version == 0:
            return None
        raw = json.loads((self._dir(version) / "manifest.json").read_text())
        raw["tensors"] = {n: StoredTensor(**t) for n, t in raw["tensors"].items()}
        return Manifest(**raw)

    def current(self) -> Manifest | None:
        return self.manifest(self.current_version())

    def manifest_path(self, version: int) -> str:
        return str(self._dir(version) / "manifest.json") if version else ""

    def adopt(self, staged: Path, files: dict[str, Path], version: int) -> dict[str, Path]:
        """Move a received push's directory to version `version`'s place (not yet committed)."""
        target = self._dir(version)
        if target.exists():  # a leftover of a push that failed before its manifest was written
            shutil.rmtree(target)
        os.replace(staged, target)
        return {name: target / path.name for name, path in files.items()}

    def commit(self, version: int, files: dict[str, Path], crc32: dict[str, int], label: str) -> Manifest:
        """Make `version` (tensors `files`, already in its directory) the current one."""
        previous = self.current()
        tensors = dict(previous.tensors) if previous else {}
        headers = {path: safetensors_header(path) for path in set(files.values())}
        for name, path in files.items():
            info = headers[path][name]
            tensors[name] = StoredTensor(str(path.relative_to(self.root)), info["dtype"], info["shape"], crc32[name])
        manifest = Manifest(version, label, time.time(), tensors)
        body = {**asdict(manifest), "tensors": {n: asdict(t) for n, t in tensors.items()}}
        _write_atomic(self._dir(version) / "manifest.json", json.dumps(body, indent=1))
        _write_atomic(self.root / "CURRENT", str(version))
        self._collect()
        return manifest

    def discard(self, version: int) -> None:
        shutil.rmtree(self._dir(version), ignore_errors=True)

    def verify(self, manifest: Manifest) -> None:
        """Raise DataLoss naming the first stored tensor whose bytes do not match its CRC-32."""
        for name, t in manifest.tensors.items():
            with safetensors.safe_open(str(self.root / t.file), "pt") as f:
                crc = crc32_of(f.get_tensor(name))
            if crc != t.crc32:
                raise DataLoss(f"weight store: {name} in {t.file} has CRC-32 {crc:#010x}, the manifest says {t.crc32:#010x}")

    def clean(self) -> None:
        """Drop what no committed version refers to: interrupted pushes and uncommitted versions."""
        for d in self.incoming.iterdir():
            shutil.rmtree(d, ignore_errors=True)
        self._collect()

    def _collect(self) -> None:
        current = self.current_version()
        kept = [v for v in range(max(1, current - self.keep + 1), current + 1)]
        live = {self._dir(v) for v in kept}
        for v in kept:
            m = self.manifest(v)
            live |= {(self.root / t.file).parent for t in m.tensors.values()} if m else set()
        for d in self.root.glob("v*"):
            if d.is_dir() and d not in live:
                shutil.rmtree(d, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
