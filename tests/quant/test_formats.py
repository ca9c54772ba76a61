"""INT8 / FP8 quantizers: bitwise equal to compressed-tensors' reference math, within error bounds,
with the documented scale shapes. FP8 is checked here with torch's float8 dtypes, since vLLM on
CPU cannot run FP8."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils import calculate_qparams

from rollout_service.quant.formats import dequantize_weight, quantize_weight

FORMATS = {
    "int8": (QuantizationType.INT, QuantizationStrategy.CHANNEL, torch.int8),
    "fp8": (QuantizationType.FLOAT, QuantizationStrategy.TENSOR, torch.float8_e4m3fn),
    "fp8_channel": (QuantizationType.FLOAT, QuantizationStrategy.CHANNEL, torch.float8_e4m3fn),
}


def _weight(seed: int, rows: int = 96, cols: int = 160) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.1).to(torch.bfloat16)
    w[3] = 0  # an all-zero row: its scale must not be 0
    w[5, 7] = 4.0  # an outlier
    return w


def _reference(w: torch.Tensor, fmt: str):
    kind, strategy, dtype = FORMATS[fmt]
    args = QuantizationArgs(num_bits=8, type=kind, strategy=strategy, symmetric=True)
    x = w.to(torch.float32)
    if strategy == QuantizationStrategy.CHANNEL:
        lo, hi = x.amin(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)
    else:
        lo, hi = x.amin().reshape(1), x.amax().reshape(1)
    scale, zero = calculate_qparams(lo, hi, args)
    return ct_quantize(x, scale, zero, args, dtype=dtype), scale


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bitwise_equal_to_compressed_tensors(fmt, seed):
    w = _weight(seed)
    q, scale = quantize_weight(w, fmt)
    ref_q, ref_scale = _reference(w, fmt)
    assert q.dtype == FORMATS[fmt][2]
    assert torch.equal(scale, ref_scale.to(torch.float32).reshape(scale.shape))
    assert torch.equal(q.view(torch.uint8), ref_q.to(q.dtype).view(torch.uint8))


@pytest.mark.parametrize("fmt, shape", [("int8", (96, 1)), ("fp8", (1,)), ("fp8_channel", (96, 1))])
def test_scale_shape_dtype_and_full_range(fmt, shape):
    w = _weight(0)
    q, scale = quantize_weight(w, fmt)
    assert scale.shape == shape and scale.dtype == torch.float32 and (scale > 0).all()
    # The largest |w| uses the whole range. INT8's half range is 127.5 (compressed-tensors'
    # (127 - -128) / 2), so an extreme maps to +127 (clamped) or -128 (round half to even).
    extreme = q.to(torch.float32).flatten()[w.float().abs().argmax()]
    assert extreme in ((127, -128) if fmt == "int8" else (448, -448))


def test_int8_round_trip_error_is_at_most_half_a_step():
    w = _weight(1)
    q, scale = quantize_weight(w, "int8")
    err = (dequantize_weight(q, scale) - w.float()).abs()
    assert (err <= scale / 2 + 1e-7).all()


@pytest.mark.parametrize("fmt", ["fp8", "fp8_channel"])
def test_fp8_round_trip_relative_error_bound(fmt):
    w = _weight(2)
    q, scale = quantize_weight(w, fmt)
    err = (dequantize_weight(q, scale) - w.float()).abs()
    # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 for normals; subnormals (below 2^-6 in
    # scaled units) have an absolute step of 2^-9, i.e. error <= 2^-10 * scale.
    bound = torch.maximum(w.float().abs() * 2**-4, scale * 2**-10)
    assert (err <= bound + 1e-9).all()
    assert err.max() > 0


def test_rejects_non_matrix_and_unknown_format():
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.ones(4), "int8")
    with pytest.raises(ValueError, match="int4"):
        quantize_weight(torch.ones(2, 2), "int4")
