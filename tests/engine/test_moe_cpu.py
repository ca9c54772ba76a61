"""The MoE CPU workaround (rollout_service/engine/moe_cpu.py): loading expert weights into a running
MoE engine through our route is exact (the very checkpoint leaves outputs bitwise unchanged;
other weights change them and pushing the first back restores them). vLLM's own in-place reload
computes with unpacked weights where the CPU kernel expects prepacked ones (off by up to 1.0 in
logprob on an AMD EPYC, 2026-12-02); what it does here is recorded as a warning naming the CPU."""

from __future__ import annotations

import warnings

import pytest
from safetensors.torch import load_file

from rollout_service.models.tiny import TinyModelSpec, make_tiny_model
from rollout_service.tools.machine import cpu
from tests.engine.probes import run_reload_probe, vllms_route
from tests.weights.conftest import perturb, write_checkpoint

pytestmark = pytest.mark.engine


def test_our_expert_reload_is_exact(tmp_path, record_property):
    w0 = make_tiny_model(tmp_path / "moe-w0", TinyModelSpec(arch="qwen3-moe", layers=2))
    w1 = write_checkpoint(w0, perturb(load_file(w0 / "model.safetensors"), seed=5), tmp_path / "moe-w1")
    result = run_reload_probe(w0, w1)
    assert result["ours_same_equal"] and result["ours_w1_changed"] and result["ours_restored_equal"]
    vllm = vllms_route(result)
    record_property("vllm_moe_reload", vllm)
    warnings.warn(f"vLLM's own MoE reload_weights {vllm} on this CPU ({cpu()})", stacklevel=1)
