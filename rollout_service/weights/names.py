"""A trainer's parameter names -> the served checkpoint's, in one place.

A trainer pushes `model.state_dict()` as it holds it, which is not always what the checkpoint on
disk (and so the served model) calls its parameters:

- **Wrapper prefixes.** DDP adds `module.`, FSDP1 `_fsdp_wrapped_module.`, activation checkpointing
  `_checkpoint_wrapped_module.`, torch.compile `_orig_mod.`, PEFT `base_model.model.` (a merged
  adapter keeps the base names under it). They are stripped.
- **Tied embeddings.** Qwen2.5 0.5B-3B, Qwen3 up to 4B, Llama 3.2, Gemma: the LM head *is* the
  input embedding, so the checkpoint has no `lm_head.weight` while the state_dict has both.
  `lm_head.weight` updates the embedding; sent together, the two must be equal.
- **Fused experts.** transformers 5 keeps a MoE layer's experts as two 3-D tensors,
  `experts.gate_up_proj` [E, 2I, H] (gate rows, then up rows) and `experts.down_proj` [E, H, I],
  while checkpoints (and vLLM's loader) name them per expert, `experts.N.gate_proj.weight` ...
  (the layout of transformers' `conversion_mapping.py` "qwen2_moe" pattern: Qwen2/3-MoE, OLMoE,
  DeepSeek-style models). A fused tensor is split into the per-expert tensors. (Mixtral's
  checkpoints also rename `mlp` to `block_sparse_moe` and the experts to w1/w3/w2: not mapped.)

Anything still unknown is refused with its name and the closest served names.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

# Path components wrappers insert anywhere in a name, and prefixes they put in front of it.
_WRAPPER_COMPONENTS = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")
_WRAPPER_PREFIXES = ("module.", "base_model.model.")
# The input embedding a tied LM head is, by family naming.
_EMBEDDINGS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "transformer.wte.weight")
_TIED_HEAD = "lm_head.weight"
_FUSED = re.compile(r"^(?P<experts>.+\.experts)\.(?P<kind>gate_up_proj|down_proj)$")

Split = Callable[[torch.Tensor], dict[str, torch.Tensor]]
Join = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def _only(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    (tensor,) = parts.values()
    return tensor


@dataclass(frozen=True)
class Mapping:
    """Where one pushed tensor goes: the shape it must have, `targets` (checkpoint names),
    `split` making the target tensors from it and `join`, its inverse (a delta push's base)."""

    shape: tuple[int, ...]
    targets: tuple[str, ...]
    split: Split
    alias_of: str | None = None  # a tied LM head: the embedding it is
    join: Join = _only


class UnknownName(LookupError):
    """A pushed name the served model has no parameter for; `closest`: served names like it."""

    def __init__(self, name: str, stripped: str, closest: list[str]):
        self.name, self.stripped, self.closest = name, stripped, closest
        after = f" (as {stripped!r} after stripping wrapper prefixes)" if stripped != name else ""
        hint = f"; closest served names: {', '.join(closest)}" if closest else ""
        super().__init__(f"{name!r}{after} is not a parameter of the served model{hint}")


class NameMap:
    """The served checkpoint's parameters (name -> shape) and how trainer names map onto them."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], tied: bool):
        self.shapes = shapes
        self.embedding = next((e for e in _EMBEDDINGS if e in shapes), None) if tied else None

    def resolve(self, name: str) -> Mapping:
        """The mapping of pushed tensor `name`; raises UnknownName."""
        if name in self.shapes and name != _TIED_HEAD:
            return _identity(name, self.shapes[name])
        stripped = strip_wrappers(name)
        if stripped == _TIED_HEAD and self.embedding is not None:
            e = self.embedding
            return Mapping(self.shapes[e], (e,), lambda t: {e: t}, alias_of=e)
        if stripped in self.shapes:
            return _identity(stripped, self.shapes[stripped])
        if (m := _FUSED.match(stripped)) and (fused := self._fused_experts(m)):
            return fused
        raise UnknownName(name, stripped, difflib.get_close_matches(stripped, list(self.shapes), n=3, cutoff=0.5))

    def _fused_experts(self, m: re.Match) -> Mapping | None:
        prefix = m["experts"]
        count = 0
        while f"{prefix}.{count}.gate_proj.weight" in self.shapes:
            count += 1
        if not count:
            return None
        inter, hidden = self.shapes[f"{prefix}.0.gate_proj.weight"]
        if m["kind"] == "gate_up_proj":
            gate = [f"{prefix}.{e}.gate_proj.weight" for e in range(count)]
            up = [f"{prefix}.{e}.up_proj.weight" for e in range(count)]

            def split(t: torch.Tensor) -> dict[str, torch.Tensor]:
                return {**{n: t[e, :inter] for e, n in enumerate(gate)}, **{n: t[e, inter:] for e, n in enumerate(up)}}

            def join(parts: dict[str, torch.Tensor]) -> torch.Tensor:
                return torch.stack([torch.cat([parts[g], parts[u]]) for g, u in zip(gate, up)])

            return Mapping((count, 2 * inter, hidden), (*gate, *up), split, join=join)
        down = [f"{prefix}.{e}.down_proj.weight" for e in range(count)]
        return Mapping(
            (count, hidden, inter), tuple(down), lambda t: {n: t[e] for e, n in enumerate(down)},
            join=lambda parts: torch.stack([parts[n] for n in down]),
        )


def strip_wrappers(name: str) -> str:
    parts = [p for p in name.split(".") if p not in _WRAPPER_COMPONENTS]
    name = ".".join(parts)
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix):], True
    return name


def _identity(target: str, shape: tuple[int, ...]) -> Mapping:
    return Mapping(shape, (target,), lambda t: {target: t})
