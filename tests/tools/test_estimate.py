"""`estimate`: memory, replicas and cost against hand-computed cases."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from rollout_service.tools.estimate import GIB, MIB, estimate, parse_params, shape_from_model, shape_from_params


def test_7b_int8_on_h100_by_hand():
    # Qwen2.5-7B shapes: 28 layers, 4 KV heads of 128; embeddings 152064 x 3584 untied.
    params = 7e9
    embed = 152064 * 3584 * 2
    quantizable = params * (1 - embed / 7.62e9)
    weights = quantizable * 1 + (params - quantizable) * 2 + quantizable / 3584 * 4
    kv = 2 * 28 * 4 * 128 * 2 * 4096 * 64
    per_gpu = weights + kv + 256 * MIB + 2 * GIB
    usable = 81559 * MIB * 0.85
    e = estimate(shape_from_params(parse_params("7B")), "int8", "h100", 4096, 64)
    assert e.weights_gib == pytest.approx(weights / GIB) and e.kv_cache_gib == pytest.approx(kv / GIB)
    assert e.total_gib == pytest.approx(per_gpu / GIB)
    assert e.gpus_per_replica == 1 and e.replicas_per_gpu == int(usable // per_gpu) == 2
    assert e.usd_per_replica_hour == pytest.approx(3.00 / 2)


def test_a_replica_too_big_for_one_gpu_gets_tensor_parallel_gpus():
    # 72B bf16 = 145 GB of weights: does not fit one H200 (120 GiB usable), fits two.
    e = estimate(shape_from_params(72e9), "none", "h200", 8192, 16)
    assert e.weights_gib == pytest.approx(72e9 * 2 / GIB)
    assert e.gpus_per_replica == 2 and e.replicas_per_gpu == 1
    assert e.usd_per_replica_hour == pytest.approx(2 * 3.80)
    assert estimate(shape_from_params(72e9), "fp8", "h200", 8192, 16, price=2.0).usd_per_replica_hour == pytest.approx(2.0)


def test_a_checkpoint_is_measured_tensor_by_tensor(tiny_model):
    weights = load_file(tiny_model / "model.safetensors")
    layer = {n: t for n, t in weights.items() if n.startswith("model.layers.") and t.ndim == 2}
    total = sum(t.numel() for t in weights.values())
    quantizable = sum(t.numel() for t in layer.values())
    rows = sum(t.shape[0] for t in layer.values())
    shape = shape_from_model(tiny_model)
    assert (shape.params, shape.quantizable_params, shape.quantized_rows) == (total, quantizable, rows)
    e = estimate(shape, "int8", "a100", 256, 2, push_buffer_mib=64)
    assert e.weights_gib * GIB == pytest.approx(quantizable + (total - quantizable) * 2 + rows * 4)
    assert e.kv_cache_gib * GIB == 2 * 4 * 2 * 64 * 2 * 256 * 2  # 4 layers, 2 KV heads of 64


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: parse_params("32 billion"), "expected a count like 32B"),
        (lambda: estimate(shape_from_params(7e9), "int4", "h100", 4096, 1), "--quantization 'int4'"),
        (lambda: estimate(shape_from_params(7e9), "int8", "v100", 4096, 1), "--gpu 'v100' is not one of a100, h100, h200"),
        (lambda: estimate(shape_from_params(7e9), "int8", "h100", 0, 1), "must be positive"),
    ],
)
def test_bad_inputs_name_the_option(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_the_command_prints_json_and_refuses_ambiguous_input(tiny_model):
    cli = [sys.executable, "-m", "rollout_service.cli", "estimate"]
    out = subprocess.run([*cli, "--params", "32B", "--gpu", "h200", "--json"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["quantization"] == "int8" and data["bf16"]["weights_gib"] > data["weights_gib"]
    bad = subprocess.run([*cli, "--params", "7B", "--model", str(tiny_model)], capture_output=True, text=True)
    assert bad.returncode == 2 and "exactly one of --params and --model" in bad.stderr
