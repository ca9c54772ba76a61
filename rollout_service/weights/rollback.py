"""A rollback's new version in the weight store: a kept version's tensors again, as version N+1.

History is never rewritten: the new version's manifest names the very shards the kept version's
names (no byte is copied, on a directory or on an object store), and `VersionStore._collect`
keeps every directory a kept manifest points into, so the old version's shards live as long as
the rollback's version is kept, whatever --keep-versions deletes around it.

Manifests grow: each lists every tensor pushed since the checkpoint, so a replica on any older
version that loads version N whole (a late replica, one catching up) serves exactly N. A rollback
keeps that true: a tensor that the kept version took from the checkpoint but a later push
changed gets its checkpoint value written into a shard of the new version (in the engine dtype,
as a push stores it), so the new manifest lists every tensor the current one does. It is then a
complete delta base as any version is (weights/delta.py reads the tensors it does not list from
the checkpoint, which gives the same values).
"""

from __future__ import annotations

from pathlib import Path

import safetensors
import torch

from rollout_service.errors import NotFound
from rollout_service.weights.staging import ShardWriter
from rollout_service.weights.store import safetensors_names
from rollout_service.weights.versions import Manifest, VersionStore, crc32_of


def kept_version(store: VersionStore, to_version: int) -> Manifest:
    """The manifest of `to_version` if the store keeps it; NotFound naming the kept ones."""
    kept = store.kept()
    for manifest in kept:
        if manifest.version == to_version:
            return manifest
    listed = ", ".join(str(m.version) for m in kept) or "none (no push has committed yet)"
    raise NotFound(f"to_version: version {to_version} is not kept by the weight store; it keeps {listed}")


def checkpoint_values(
    store: VersionStore, target: Manifest, current: Manifest | None, checkpoint: Path, dtype: torch.dtype,
) -> tuple[ShardWriter, dict[str, int]]:
    """A spool of the store holding the checkpoint's value (cast to `dtype`, the engine's) of every
    tensor the current version lists and `target` does not, and their CRC-32s. On a thread: it
    reads and writes those tensors. The caller adopts the spool or discards it."""
    missing = sorted(set(current.tensors if current else ()) - set(target.tensors))
    spool = store.spool()
    crc32: dict[str, int] = {}
    try:
        by_file: dict[Path, list[str]] = {}
        if missing:
            where = {name: f for f in sorted(checkpoint.glob("*.safetensors")) for name in safetensors_names(f)}
            for name in missing:
                by_file.setdefault(where[name], []).append(name)
        for path, names in by_file.items():
            with safetensors.safe_open(str(path), "pt") as f:
                for name in names:
                    tensor = f.get_tensor(name).to(dtype)
                    crc32[name] = crc32_of(tensor)
                    spool.add({name: tensor})
        spool.flush()
    except BaseException:
        spool.discard()
        raise
    return spool, crc32


def committed_as(store: VersionStore, version: int, fence: int) -> bool:
    """Whether `version` is committed under fencing token `fence` (a rollback's own lock): for a
    rollback whose commit raised, to tell "nothing committed" from a version that stands (it may
    have no shard of its own to look for, as `VersionStore.holds` does for a push)."""
    if store.current_version() < version:
        return False
    try:
        return store.manifest(version).fence == fence
    except FileNotFoundError:
        return False
