"""Delta pushes, server side: a delta tensor rebuilt whole from its base before anything else.

A push may send a tensor as a delta (TensorSpec.delta) against its value in a committed version
(PushHeader.delta_base_version). The weight store holds that value: each version's manifest names
the shard of every tensor pushed so far (in the engine dtype, bfloat16 here), and the checkpoint
the others. `PushSession` rebuilds the tensor from it on its conversion thread, checks it against
the whole tensor's CRC-32, and from there on it is a tensor like any dense one: cast, requantized,
stored and fanned out to replicas by the same code, so a delta push gives bitwise the weights a
dense push of the same tensors gives.
"""

from __future__ import annotations

import shutil
import uuid
import weakref
import zlib
from pathlib import Path

import numpy as np
import safetensors
import torch

from rollout_client import delta as codec
from rollout_service.errors import DataLoss, DeltaBaseUnavailable, InvalidArgument
from rollout_service.weights.manifest import TensorSpec
from rollout_service.weights.names import Mapping
from rollout_service.weights.store import safetensors_names
from rollout_service.weights.versions import VersionStore


def codecs_for(dtype: str) -> list[str]:
    """The delta codecs a server whose engine runs `dtype` takes: the weight store holds bf16
    bits to apply a delta to only when the engine runs bfloat16."""
    return list(codec.CODECS) if dtype == "bfloat16" else []


class DeltaBase:
    """The tensors of committed version `version` of `store` (over `checkpoint`'s), as a delta
    push's base. Refused (DeltaBaseUnavailable) when the store no longer keeps that version or
    the engine does not run bfloat16 (the store then holds no bf16 bits to apply a delta to)."""

    def __init__(self, store: VersionStore, version: int, committed: int, checkpoint: Path, dtype: str):
        if not codecs_for(dtype):
            raise InvalidArgument("header.delta_base_version", f"this server runs {dtype}; delta pushes need a bfloat16 engine")
        if version > committed:
            raise DeltaBaseUnavailable(
                f"header.delta_base_version: {version} is not a committed version (the last is {committed}): push whole tensors"
            )
        try:
            manifest = store.manifest(version)
        except FileNotFoundError:
            raise DeltaBaseUnavailable(
                f"header.delta_base_version: version {version} is no longer kept (the server keeps the last "
                f"{store.keep}, up to {committed}): push whole tensors"
            ) from None
        self.version = version
        self._store = store
        # name -> the checkpoint's file holding it, for the tensors not pushed by then
        self._files = {name: str(f) for f in sorted(checkpoint.glob("*.safetensors")) for name in safetensors_names(f)}
        # name -> the stored shard (relative to the store) holding its bytes in that version
        self._stored: dict[str, str] = {}
        # name -> the CRC-32 of its stored bytes, for the tensors pushed by then (bf16, as stored)
        self._crc32: dict[str, int] = {}
        if manifest is not None:
            self._stored = {name: t.file for name, t in manifest.tensors.items()}
            self._crc32 = {name: t.crc32 for name, t in manifest.tensors.items() if t.dtype == "BF16"}  # safetensors dtype names
        # Where a store elsewhere (an object store) copies the shards the push reads (made by its
        # first copy, none for a directory store); deleted with this base, at the end of the push.
        self._scratch = store.incoming / f"delta-base-{uuid.uuid4().hex[:12]}"
        weakref.finalize(self, shutil.rmtree, self._scratch, True)

    def _file(self, name: str) -> str:
        """A path on this machine holding `name`'s bytes in the base version."""
        if name not in self._stored:
            return self._files[name]
        return str(self._store.shard(self._stored[name], self._scratch))

    def read(self, mapping: Mapping) -> tuple[torch.Tensor, int | None]:
        """The base of a pushed tensor, in the trainer's layout (a fused-experts tensor joined),
        and its CRC-32 where the store recorded it (one stored tensor; else None)."""
        by_file: dict[str, list[str]] = {}
        parts = {}
        try:
            for target in mapping.targets:
                by_file.setdefault(self._file(target), []).append(target)
            for path, names in by_file.items():  # a fused-experts tensor: one open per file, not per expert
                with safetensors.safe_open(path, "pt") as f:
                    parts.update({n: f.get_tensor(n).to(torch.bfloat16) for n in names})
        except (OSError, safetensors.SafetensorError) as exc:
            raise DeltaBaseUnavailable(f"version {self.version}'s copy of {mapping.targets[0]} cannot be read ({exc}): push whole tensors") from None
        crc = self._crc32.get(mapping.targets[0]) if len(mapping.targets) == 1 else None
        return mapping.join(parts), crc


def rebuild(spec: TensorSpec, payload: bytes | memoryview, base: torch.Tensor, base_crc: int | None = None) -> torch.Tensor:
    """The whole tensor `spec` from its delta `payload` and `base`: checked against the base's
    CRC-32 the client encoded against (DeltaBaseUnavailable) and the whole tensor's (DataLoss).
    `base_crc`: the base's CRC-32 as the store recorded it (computed here when None)."""
    bits = base.contiguous().reshape(-1).view(torch.uint16).numpy()
    if base_crc is None:
        base_crc = zlib.crc32(bits.view(np.uint8))
    if base_crc != spec.delta.base_crc32:
        raise DeltaBaseUnavailable(
            f"{spec.name}: its value in the base version has CRC-32 {base_crc:#010x}, the client encoded against "
            f"{spec.delta.base_crc32:#010x}: push whole tensors"
        )
    try:
        new = codec.decode(bits, payload, spec.delta.changed, spec.delta.codec)
    except codec.DeltaFormatError as exc:
        raise DataLoss(f"{spec.name}: not a valid delta: {exc}") from None
    crc = zlib.crc32(new.view(np.uint8))
    if crc != spec.crc32:
        raise DataLoss(f"{spec.name}: rebuilt from its delta, its CRC-32 is {crc:#010x}, the header declared {spec.crc32:#010x}")
    return torch.from_numpy(new).view(torch.bfloat16).reshape(spec.shape)
