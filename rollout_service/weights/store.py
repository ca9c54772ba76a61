"""Where every tensor of the served weights lives now, and the load plan for a push.

The engine's tensors start in the checkpoint it loaded (the quantized copy for int8/fp8); each
committed push moves its tensors to its staging directory. A push may carry any subset, but vLLM
loads fused modules (q/k/v -> qkv_proj, gate/up -> gate_up_proj, a MoE layer's experts) whole, so the plan adds the
members of every touched module that the push did not carry, read from where they live now.
Directories no current tensor lives in are deleted.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections import defaultdict
from pathlib import Path

_PARAM_SUFFIX = re.compile(r"\.(weight|bias|weight_scale)$")
# A MoE layer's experts are one vLLM module (FusedMoE: w13_weight [E, 2I, H], w2_weight [E, H, I]).
_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.\d+\.")

Plan = list[tuple[str, list[str]]]  # (safetensors file, tensor names in it)


def module_of(name: str, packed: dict[str, list[str]]) -> str:
    """The vLLM module checkpoint tensor `name` loads into: 'model.layers.0.self_attn.k_proj.weight'
    -> 'model.layers.0.self_attn.qkv_proj' when the model packs q/k/v into qkv_proj, and
    'model.layers.0.mlp.experts.3.up_proj.weight' -> 'model.layers.0.mlp.experts' (all experts)."""
    if m := _EXPERT.match(name):
        return m["experts"]
    path = _PARAM_SUFFIX.sub("", name)
    parent, _, leaf = path.rpartition(".")
    for fused, members in packed.items():
        if leaf in members:
            return f"{parent}.{fused}" if parent else fused
    return path


def safetensors_header(path: Path) -> dict[str, dict]:
    """name -> {dtype, shape, data_offsets} of a safetensors file, reading only its header."""
    with open(path, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    header.pop("__metadata__", None)
    return header


def safetensors_names(path: Path) -> list[str]:
    return list(safetensors_header(path))


class WeightSet:
    def __init__(self, checkpoint: Path, staging_root: Path, packed: dict[str, list[str]]):
        self.files: dict[str, Path] = {
            name: f for f in sorted(checkpoint.glob("*.safetensors")) for name in safetensors_names(f)
        }
        self._staging_root = staging_root
        self._packed = packed

    def plan(self, pushed: dict[str, Path]) -> Plan:
        """What the engine loads for a push whose converted tensors are in `pushed` (name -> file)."""
        touched = {module_of(n, self._packed) for n in pushed}
        entries = dict(pushed)
        for name, path in self.files.items():
            if name not in entries and module_of(name, self._packed) in touched:
                entries[name] = path
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name, path in entries.items():
            by_file[path].append(name)
        return [(str(path), names) for path, names in by_file.items()]

    def commit(self, pushed: dict[str, Path]) -> None:
        """The pushed tensors are now the served ones; drop staging directories nothing lives in."""
        self.files.update(pushed)
        live = {p.parent for p in self.files.values()}
        for d in self._staging_root.glob("push-*"):
            if d not in live:
                shutil.rmtree(d, ignore_errors=True)
