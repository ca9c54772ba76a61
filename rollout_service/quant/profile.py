"""`rollout-service profile`: the requantization recipe of a model, as FlashRL's `profile`.

With a quantized counterpart (a compressed-tensors checkpoint from llm-compressor, or one this
project wrote), the recipe is read from it: its format (quant/registry.py, from the weights'
quantization args), which parameters are quantized (those with a `weight_scale`), its
ignore list. The two checkpoints are checked against each other (same parameter names and
shapes, unsmoothed norms), and each quantized weight is requantized from the bf16 one to
measure how exactly on-arrival requantization reproduces the checkpoint (identical for
round-to-nearest checkpoints; GPTQ/AWQ ones differ, and pushes would be requantized by RTN).
Without a counterpart the recipe follows the default rule (quant/recipe.py) with `--fn`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rollout_service.quant.formats import dequantize_weight, quantize_weight
from rollout_service.quant.recipe import Recipe, is_quantized_param
from rollout_service.quant.registry import FORMATS, by_scheme

# Norm weights of a smoothed (SmoothQuant) checkpoint differ from the bf16 ones by the smoothing
# factors; above this relative difference the checkpoint is not a plain quantization.
SMOOTHING_TOLERANCE = 1e-2


class ProfileError(ValueError):
    """The checkpoints cannot be profiled; the message says which file, tensor or setting."""


@dataclass(frozen=True)
class RequantStats:
    """How exactly requantizing the bf16 weights reproduces the quantized checkpoint's."""

    params: int
    identical: int  # parameters whose requantized tensors equal the checkpoint's bit for bit
    worst_param: str
    worst_rel_diff: float  # max |dequant(requant(bf16)) - dequant(checkpoint)| / max |w|

    def to_dict(self) -> dict:
        return {"params": self.params, "identical": self.identical, "worst_param": self.worst_param,
                "worst_rel_diff": self.worst_rel_diff}


def _config(model: Path) -> dict:
    path = model / "config.json"
    if not path.is_file():
        raise ProfileError(f"{str(model)!r} is not a checkpoint directory (no config.json)")
    return json.loads(path.read_text())


def _tensors(model: Path) -> Iterator[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]:
    """(name, loader, shape) for every tensor of the checkpoint's safetensors shards."""
    from safetensors import safe_open

    shards = sorted(model.glob("*.safetensors"))
    if not shards:
        raise ProfileError(f"{str(model)!r} has no *.safetensors weights")
    for shard in shards:
        with safe_open(shard, framework="pt") as reader:
            for name in reader.keys():
                shape = tuple(reader.get_slice(name).get_shape())
                yield name, (lambda s=shard, n=name: _load(s, n)), shape


def _load(shard: Path, name: str) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(shard, framework="pt") as reader:
        return reader.get_tensor(name)


def checkpoint_format(config: dict, where: str) -> tuple[str, tuple[str, ...]]:
    """(fn, ignore) of a compressed-tensors checkpoint's quantization_config."""
    qc = config.get("quantization_config")
    if not qc:
        raise ProfileError(f"{where}: config.json has no quantization_config (not a quantized checkpoint)")
    groups = list((qc.get("config_groups") or {}).values())
    if len(groups) != 1 or "weights" not in groups[0]:
        raise ProfileError(f"{where}: expected one compressed-tensors config group with weights, got {len(groups)}")
    w, act = groups[0]["weights"], groups[0].get("input_activations") or {}
    scheme = (w.get("num_bits"), w.get("type"), w.get("strategy"))
    spec = by_scheme(*scheme)
    if spec is None:
        known = ", ".join(f"8-bit {s.number} per-{s.strategy}" for s in FORMATS.values())
        raise ProfileError(
            f"{where}: weight scheme num_bits={scheme[0]} type={scheme[1]} strategy={scheme[2]} is not one this "
            f"service requantizes ({known})"
        )
    if act and not act.get("dynamic", False):
        raise ProfileError(f"{where}: static activation scales are not supported (the service quantizes activations dynamically)")
    return spec.name, tuple(qc.get("ignore") or ())


def derive(model: Path, fn: str) -> Recipe:
    """The default rule applied to `model`'s parameters, written out name by name."""
    _config(model)
    names = [name for name, _, shape in _tensors(model) if is_quantized_param(name, len(shape))]
    return Recipe(fn=fn, quantized=tuple(sorted(names)), ignore=("lm_head",),
                  source=f"derived from {model} with --fn {fn} (default rule: decoder-layer linear weights)")


def profile(
    model: Path, quantized: Path | None, fn: str | None, progress: Callable[[int, int, str], None] | None = None
) -> tuple[Recipe, RequantStats | None]:
    """The recipe for serving `quantized` (or `model` quantized with `fn`) and requantizing pushes."""
    if fn is not None and fn not in FORMATS:
        raise ProfileError(f"--fn {fn!r} is not one of {', '.join(FORMATS)}")
    if quantized is None:
        if fn is None:
            raise ProfileError("without a quantized model (-qm), --fn says which format to derive")
        return derive(model, fn), None
    ckpt_fn, ignore = checkpoint_format(_config(quantized), str(quantized))
    if fn is not None and fn != ckpt_fn:
        raise ProfileError(f"--fn {fn} does not match {str(quantized)!r}, which is quantized as {ckpt_fn}")
    _config(model)
    base = {name: (load, shape) for name, load, shape in _tensors(model)}
    quant = {name: (load, shape) for name, load, shape in _tensors(quantized)}
    scaled = sorted(n[: -len("_scale")] for n in quant if n.endswith("_scale") and n[: -len("_scale")] in quant)
    plain = set(quant) - set(scaled) - {n + "_scale" for n in scaled}
    only_base = sorted(set(base) - plain - set(scaled))
    only_quant = sorted((plain | set(scaled)) - set(base))
    if only_base or only_quant:
        raise ProfileError(
            f"{str(model)!r} and {str(quantized)!r} are not the same model: parameters only in the bf16 one "
            f"{only_base[:5]}{' ...' if len(only_base) > 5 else ''}, only in the quantized one "
            f"{only_quant[:5]}{' ...' if len(only_quant) > 5 else ''}"
        )
    for name in sorted(base):
        if base[name][1] != quant[name][1]:
            raise ProfileError(f"{name}: shape {base[name][1]} in the bf16 model, {quant[name][1]} in the quantized one")
    for name in sorted(plain):
        if len(base[name][1]) == 1 and "norm" in name:
            b, q = base[name][0]().float(), quant[name][0]().float()
            rel = float((b - q).abs().max() / b.abs().max().clamp(min=1e-12))
            if rel > SMOOTHING_TOLERANCE:
                raise ProfileError(
                    f"{name}: differs from the bf16 model by {rel:.1%}: the quantized checkpoint is smoothed "
                    "(SmoothQuant), and requantizing pushed weights would need its smoothing factors; quantize "
                    "without smoothing (llm-compressor's QuantizationModifier alone) or profile with --fn only"
                )
    identical, worst, worst_name = 0, 0.0, ""
    for i, name in enumerate(scaled):
        if progress:
            progress(i, len(scaled), name)
        w = base[name][0]()
        q, scale = quant[name][0](), quant[name + "_scale"][0]()
        rq, rscale = quantize_weight(w, ckpt_fn)
        if q.dtype == rq.dtype and torch.equal(rq.view(torch.uint8), q.view(torch.uint8)) and torch.equal(rscale, scale.float().reshape(rscale.shape)):
            identical += 1
        else:
            rel = float((dequantize_weight(rq, rscale) - dequantize_weight(q, scale.float().reshape(rscale.shape))).abs().max()
                        / w.float().abs().max().clamp(min=1e-12))
            if rel > worst:
                worst, worst_name = rel, name
    if progress:
        progress(len(scaled), len(scaled), "")
    recipe = Recipe(fn=ckpt_fn, quantized=tuple(scaled), ignore=ignore, source=f"profiled {quantized} against {model}")
    return recipe, RequantStats(len(scaled), identical, worst_name, worst)
