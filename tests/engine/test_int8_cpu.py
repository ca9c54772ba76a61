"""The int8 CPU workaround (rollout_service/engine/int8_cpu.py): loading int8 weights into a
running int8 engine through our route is exact on every CPU (the very checkpoint leaves outputs
bitwise unchanged; other weights change them and pushing the first back restores them).

vLLM's own in-place reload gave NaN on an AMD EPYC with AVX2 only (2026-11-23) and stayed finite on
an Intel Xeon with AVX-512/VNNI/AMX (2026-12-02): the breakage follows the oneDNN path the CPU
takes. What it does on this machine (NaN, exactly our result, or different) is recorded as a
warning naming the CPU, never a failure."""

from __future__ import annotations

import warnings

import pytest
from safetensors.torch import load_file

from rollout_service.tools.machine import cpu
from tests.engine.probes import run_reload_probe, vllms_route
from tests.weights.conftest import perturb, write_checkpoint

pytestmark = pytest.mark.engine


def test_our_int8_reload_is_exact_on_every_cpu(tiny_model, tmp_path, record_property):
    from rollout_service.quant.checkpoint import quantize_checkpoint
    from rollout_service.quant.recipe import Recipe

    w0 = quantize_checkpoint(tiny_model, tmp_path / "int8-w0", Recipe("int8"))
    bf16_w1 = write_checkpoint(tiny_model, perturb(load_file(tiny_model / "model.safetensors"), seed=5), tmp_path / "w1")
    w1 = quantize_checkpoint(bf16_w1, tmp_path / "int8-w1", Recipe("int8"))
    result = run_reload_probe(w0, w1)
    assert all(x == x for x in result["before"])  # finite before
    assert result["ours_same_equal"] and result["ours_w1_changed"] and result["ours_restored_equal"]
    vllm = vllms_route(result)
    record_property("vllm_int8_reload", vllm)
    warnings.warn(f"vLLM's own int8 reload_weights {vllm} on this CPU ({cpu()})", stacklevel=1)
