"""Quantizing a checkpoint: which tensors, their formats, the config vLLM reads, the cache."""

import json

import pytest
import torch
from safetensors import safe_open

from rollout_service.quant.checkpoint import cached_quantized_checkpoint, fingerprint, quantize_checkpoint
from rollout_service.quant.formats import quantize_weight
from rollout_service.quant.recipe import Recipe, is_quantized_param


@pytest.mark.parametrize(
    "name, ndim, expected",
    [
        ("model.layers.0.self_attn.q_proj.weight", 2, True),
        ("model.layers.11.mlp.down_proj.weight", 2, True),
        ("model.layers.0.self_attn.q_proj.bias", 1, False),
        ("model.layers.0.input_layernorm.weight", 1, False),
        ("model.embed_tokens.weight", 2, False),
        ("lm_head.weight", 2, False),
        ("model.norm.weight", 1, False),
    ],
)
def test_only_decoder_linear_weights_are_quantized(name, ndim, expected):
    assert is_quantized_param(name, ndim) is expected


def _tensors(path):
    out = {}
    for shard in path.glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_int8_checkpoint_holds_quantize_weight_output_and_untouched_rest(tiny_model, tmp_path):
    dst = quantize_checkpoint(tiny_model, tmp_path / "q", Recipe("int8"))
    src, out = _tensors(tiny_model), _tensors(dst)
    quantized = [n for n, t in src.items() if is_quantized_param(n, t.ndim)]
    assert len(quantized) == 4 * 7  # q, k, v, o, gate, up, down per layer
    for name, tensor in src.items():
        if name in quantized:
            q, scale = quantize_weight(tensor, "int8")
            assert torch.equal(out[name], q) and torch.equal(out[name + "_scale"], scale)
        else:
            assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor)
    config = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int-quantized" and config["ignore"] == ["lm_head"]
    assert config["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
    assert (dst / "tokenizer.json").exists()


def test_cache_reuses_output_until_the_source_changes(tiny_model, tmp_path):
    first = cached_quantized_checkpoint(tiny_model, Recipe("int8"), tmp_path)
    stamp = (first / "config.json").stat().st_mtime_ns
    assert cached_quantized_checkpoint(tiny_model, Recipe("int8"), tmp_path) == first
    assert (first / "config.json").stat().st_mtime_ns == stamp
    assert fingerprint(tiny_model, Recipe("fp8")) != fingerprint(tiny_model, Recipe("int8"))
