"""The header checks against the model, and the load plan for partial pushes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from rollout_service.errors import InvalidArgument
from rollout_service.weights.manifest import ParamTable, TensorSpec
from rollout_service.weights.store import WeightSet, module_of

PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}


def test_param_table_reads_names_and_shapes_from_the_checkpoint(tiny_model):
    table = ParamTable.from_checkpoint(tiny_model)
    assert table.shapes["model.layers.0.self_attn.q_proj.weight"] == (256, 256)
    assert "lm_head.weight" in table.shapes


@pytest.mark.parametrize(
    "bad, field, text",
    [
        (TensorSpec("x.weight", "bfloat16", (2, 2), 8), "tensors[1].name", "'x.weight' is not a parameter"),
        (TensorSpec("w", "int8", (2, 2), 4), "tensors[1].dtype", "w: dtype 'int8' is not one of"),
        (TensorSpec("w", "float32", (2, 3), 24), "tensors[1].shape", "w: shape [2, 3] does not match the model's [2, 2]"),
        (TensorSpec("w", "float32", (2, 2), 8), "tensors[1].nbytes", "nbytes=8 but shape [2, 2] of float32 takes 16"),
        (TensorSpec("v", "float32", (3,), 12), "tensors[1].name", "'v' is declared twice (also tensors[0])"),
    ],
)
def test_each_bad_declaration_names_its_tensor_and_field(bad, field, text):
    table = ParamTable({"w": (2, 2), "v": (3,)})
    claimed: dict[str, int] = {}
    first = TensorSpec("v", "float32", (3,), 12)
    table.check_tensor(0, first, claimed, [])
    with pytest.raises(InvalidArgument) as info:
        table.check_tensor(1, bad, claimed, [first])
    assert info.value.field == field and text in str(info.value)


def test_module_of_maps_checkpoint_names_to_vllms_fused_modules():
    assert module_of("model.layers.3.self_attn.k_proj.weight", PACKED) == "model.layers.3.self_attn.qkv_proj"
    assert module_of("model.layers.3.self_attn.k_proj.bias", PACKED) == "model.layers.3.self_attn.qkv_proj"
    assert module_of("model.layers.3.mlp.up_proj.weight_scale", PACKED) == "model.layers.3.mlp.gate_up_proj"
    assert module_of("model.layers.3.mlp.down_proj.weight", PACKED) == "model.layers.3.mlp.down_proj"
    assert module_of("model.norm.weight", PACKED) == "model.norm"
    assert module_of("model.layers.3.mlp.experts.7.up_proj.weight", PACKED) == "model.layers.3.mlp.experts"


def test_plan_completes_touched_fused_modules_from_the_current_weights(tmp_path):
    names = [f"l.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
    (tmp_path / "ckpt").mkdir()
    save_file({n: torch.zeros(1) for n in names}, tmp_path / "ckpt" / "model.safetensors")
    staging = tmp_path / "staging"
    staging.mkdir()
    ws = WeightSet(tmp_path / "ckpt", staging, PACKED)
    push = staging / "push-1" / "part-00000.safetensors"
    push.parent.mkdir()
    plan = dict((p, sorted(n)) for p, n in ws.plan({"l.k_proj.weight": push}))
    assert plan == {str(push): ["l.k_proj.weight"], str(tmp_path / "ckpt" / "model.safetensors"): ["l.q_proj.weight", "l.v_proj.weight"]}
    ws.commit({"l.k_proj.weight": push})
    # The next push replaces k again: the first push's directory holds nothing current and goes.
    push2 = staging / "push-2" / "part-00000.safetensors"
    push2.parent.mkdir()
    ws.commit({"l.k_proj.weight": push2})
    assert not push.parent.exists() and push2.parent.exists()
