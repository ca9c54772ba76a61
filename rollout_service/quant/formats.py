"""INT8 and FP8 weight quantization with compressed-tensors' arithmetic.

All formats are symmetric: scale = max|w| / (range / 2) over the scale's group (a row for
per-channel, the whole tensor for per-tensor), computed in float32; q = clamp(w / scale) then
round (INT8) or cast (FP8). This is compressed-tensors' `calculate_qparams` + `quantize` (the
library behind llm-compressor checkpoints, which vLLM loads natively), evaluated in float32; a
test checks bitwise equality with that library.

- int8:        W8A8, int8 weights [N, K] + float32 scale [N, 1]; activations are quantized
               dynamically per token by the engine.
- fp8:         float8_e4m3fn weights + one float32 scale [1]; dynamic activation scales.
- fp8_channel: float8_e4m3fn weights + float32 scale [N, 1].
"""

from __future__ import annotations

from typing import Literal

import torch

QuantFormat = Literal["int8", "fp8", "fp8_channel"]

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
    w = weight.to(torch.float32, copy=True)
    if fmt == "int8":
        scale = _scale(w, per_channel=True, half_range=_INT8_HALF_RANGE)
        q = w.div_(scale).clamp_(-128, 127).round_().to(torch.int8)
    elif fmt in ("fp8", "fp8_channel"):
        scale = _scale(w, per_channel=fmt == "fp8_channel", half_range=_FP8_HALF_RANGE)
        q = w.div_(scale).clamp_(-_FP8_MAX, _FP8_MAX).to(_FP8)
    else:
        raise ValueError(f"quantization format {fmt!r} is not one of int8, fp8, fp8_channel")
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 weights back from (q, scale): for error bounds and tests."""
    return q.to(torch.float32) * scale
