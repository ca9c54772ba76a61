"""`profile`: the recipe read from a quantized checkpoint or derived from a bf16 one, and the
checks that refuse mismatched checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rollout_service.quant.checkpoint import quantize_checkpoint
from rollout_service.quant.profile import ProfileError, profile
from rollout_service.quant.recipe import Recipe, is_quantized_param


@pytest.fixture(scope="module")
def int8_model(tiny_model, tmp_path_factory) -> Path:
    return quantize_checkpoint(tiny_model, tmp_path_factory.mktemp("q") / "int8", Recipe("int8"))


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_a_round_to_nearest_checkpoint_profiles_as_int8_reproduced_bit_for_bit(tiny_model, int8_model):
    recipe, stats = profile(tiny_model, int8_model, None)
    weights = load_file(tiny_model / "model.safetensors")
    expected = sorted(n for n, t in weights.items() if is_quantized_param(n, t.ndim))
    assert recipe.fn == "int8" and list(recipe.quantized) == expected and recipe.ignore == ("lm_head",)
    assert stats.params == len(expected) == stats.identical and stats.worst_rel_diff == 0


def test_the_profile_file_round_trips_and_is_plain_torch_data(tiny_model, int8_model, tmp_path):
    recipe, _ = profile(tiny_model, int8_model, "int8")
    path = recipe.save(tmp_path / "profile.pt")
    assert torch.load(path, weights_only=True)["fn"] == "int8"
    assert Recipe.load(path) == recipe


def test_without_a_quantized_model_the_default_rule_is_written_out(tiny_model):
    recipe, stats = profile(tiny_model, None, "fp8_channel")
    assert stats is None and recipe.fn == "fp8_channel"
    assert "model.layers.0.self_attn.q_proj.weight" in recipe.quantized
    assert not any("norm" in n or "embed" in n or n.startswith("lm_head") for n in recipe.quantized)


def test_a_recipe_quantizing_fewer_parameters_is_followed_at_load(tiny_model, tmp_path):
    keep = "model.layers.0.mlp.down_proj.weight"
    full, _ = profile(tiny_model, None, "int8")
    partial = Recipe("int8", tuple(n for n in full.quantized if n != keep), ignore=("lm_head", keep.removesuffix(".weight")))
    out = load_file(quantize_checkpoint(tiny_model, tmp_path / "q", partial) / "model.safetensors")
    assert out[keep].dtype == torch.bfloat16 and keep + "_scale" not in out
    assert out["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head", "model.layers.0.mlp.down_proj"]


def test_requantization_differences_are_measured(tiny_model, int8_model, tmp_path):
    name = "model.layers.1.self_attn.o_proj.weight"

    def nudge(t):  # as GPTQ would: some integer weights moved off round-to-nearest
        t[name] = t[name].clone()
        t[name][0, :8] = (t[name][0, :8].to(torch.int16) + 1).clamp(-128, 127).to(torch.int8)

    changed = _rewrite(int8_model, tmp_path / "gptq", nudge)
    _, stats = profile(tiny_model, changed, None)
    assert stats.identical == stats.params - 1 and stats.worst_param == name and stats.worst_rel_diff > 0


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: [t.pop(f"model.layers.0.mlp.gate_proj.{k}") for k in ("weight", "weight_scale")],
         r"not the same model: parameters only in the bf16 one \['model.layers.0.mlp.gate_proj.weight'\]"),
        (lambda t: t.update({"model.norm.weight": t["model.norm.weight"] * 1.5}), "model.norm.weight: differs .* smoothed"),
        (lambda t: t.update({"model.embed_tokens.weight": t["model.embed_tokens.weight"][:100]}),
         r"model.embed_tokens.weight: shape \(2048, 256\) in the bf16 model, \(100, 256\)"),
    ],
)
def test_mismatched_checkpoints_are_refused_naming_the_tensor(tiny_model, int8_model, tmp_path, edit, match):
    with pytest.raises(ProfileError, match=match):
        profile(tiny_model, _rewrite(int8_model, tmp_path / "bad", edit), None)


def test_bad_inputs_are_clear_errors(tiny_model, int8_model, tmp_path):
    with pytest.raises(ProfileError, match="--fn fp8 does not match .* quantized as int8"):
        profile(tiny_model, int8_model, "fp8")
    with pytest.raises(ProfileError, match="--fn 'int4' is not one of"):
        profile(tiny_model, None, "int4")
    with pytest.raises(ProfileError, match="--fn says which format"):
        profile(tiny_model, None, None)
    with pytest.raises(ProfileError, match="no config.json"):
        profile(tmp_path / "missing", None, "int8")
    with pytest.raises(ProfileError, match="no quantization_config"):
        profile(tiny_model, tiny_model, None)
    with pytest.raises(ValueError, match="not a readable profile"):
        (tmp_path / "junk.pt").write_text("junk")
        Recipe.load(tmp_path / "junk.pt")
