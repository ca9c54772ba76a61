"""INT8 and FP8 weight quantization with compressed-tensors' arithmetic.

All formats are symmetric: scale = max|w| / (range / 2) over the scale's group (a row for
per-channel, the whole tensor for per-tensor), computed in float32; q = clamp(w / scale) then
round (INT8) or cast (FP8). This is compressed-tensors' `calculate_qparams` + `quantize` (the
library behind llm-compressor checkpoints, which vLLM loads natively), evaluated in float32; a
test checks bitwise equality with that library.

The formats are those of quant/registry.py: int weights are int8, float weights float8_e4m3fn;
a per-channel scale is float32 [N, 1] for weights [N, K], a per-tensor one float32 [1].
Activations are quantized dynamically per token by the engine.
"""

from __future__ import annotations

import torch

from rollout_service.quant.registry import FORMATS, QuantFormat

_INT8_HALF_RANGE = (127 - (-128)) / 2  # 127.5, as compressed-tensors: (bit_max - bit_min) / 2
_FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(_FP8).max  # 448
_FP8_HALF_RANGE = _FP8_MAX  # (448 - (-448)) / 2
# compressed-tensors replaces a zero scale (an all-zero group) by the scale dtype's eps.
_EPS = torch.finfo(torch.float32).eps


def _scale(w: torch.Tensor, per_channel: bool, half_range: float) -> torch.Tensor:
    # max|w| as max(-min, max): the same value as abs().amax() without a full-size temporary.
    if per_channel:
        lo, hi = torch.aminmax(w, dim=1, keepdim=True)
    else:
        lo, hi = (x.reshape(1) for x in torch.aminmax(w))
    amax = torch.maximum(-lo, hi)
    scale = amax / half_range
    return torch.where(scale == 0, torch.full_like(scale, _EPS), scale)


def quantize_weight(weight: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """(quantized weight, float32 scale) for a 2-D [out, in] weight of any float dtype."""
    if weight.ndim != 2:
        raise ValueError(f"weight of shape {tuple(weight.shape)} is not 2-D [out_features, in_features]")
    # In place after the one float32 copy: each full-size temporary costs a pass over memory.
    spec = FORMATS.get(fmt)
    if spec is None:
        raise ValueError(f"quantization format {fmt!r} is not one of {', '.join(FORMATS)}")
    w = weight.to(torch.float32, copy=True)
    per_channel = spec.strategy == "channel"
    if spec.number == "int":
        scale = _scale(w, per_channel, half_range=_INT8_HALF_RANGE)
        q = w.div_(scale).clamp_(-128, 127).round_().to(torch.int8)
    else:
        scale = _scale(w, per_channel, half_range=_FP8_HALF_RANGE)
        q = w.div_(scale).clamp_(-_FP8_MAX, _FP8_MAX).to(_FP8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weights back from (q, scale): for error bounds and tests."""
    return q.to(torch.float32) * scale
