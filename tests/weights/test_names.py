"""Trainer names -> served names without an engine: wrapper prefixes, tied embeddings, fused MoE
experts, and the refusals that name the offending tensor and the closest served names."""

from __future__ import annotations

import asyncio

import pytest
import torch

from rollout_service.errors import InvalidArgument
from rollout_service.weights.engine_format import to_engine_format
from rollout_service.weights.manifest import ParamTable, PushHeader
from rollout_service.weights.names import NameMap, UnknownName, strip_wrappers
from rollout_service.weights.session import PushSession
from rollout_service.weights.staging import ShardWriter
from tests.weights.test_session import raw, spec, staged

EMBED = "model.embed_tokens.weight"
E, I, H = 3, 8, 4  # experts, expert intermediate size, hidden
EXPERTS = {
    f"model.layers.0.mlp.experts.{e}.{m}.weight": (H, I) if m == "down_proj" else (I, H)
    for e in range(E) for m in ("gate_proj", "up_proj", "down_proj")
}
SHAPES = {EMBED: (32, H), "model.norm.weight": (H,), "model.layers.0.self_attn.q_proj.weight": (H, H), **EXPERTS}


@pytest.mark.parametrize(
    "name",
    [
        "module.model.norm.weight",  # DDP
        "_fsdp_wrapped_module.model._fsdp_wrapped_module.norm.weight",  # FSDP1
        "model.layers.0._checkpoint_wrapped_module.self_attn.q_proj.weight",  # activation checkpointing
        "_orig_mod.model.norm.weight",  # torch.compile
        "base_model.model.model.norm.weight",  # PEFT, adapter merged
        "module._orig_mod.model.norm.weight",
    ],
)
def test_wrapper_prefixes_are_stripped(name):
    mapping = NameMap(SHAPES, tied=False).resolve(name)
    assert mapping.targets == (strip_wrappers(name),) and mapping.targets[0] in SHAPES


def test_tied_lm_head_is_the_embedding_and_an_untied_model_refuses_it():
    mapping = NameMap(SHAPES, tied=True).resolve("lm_head.weight")
    assert mapping.targets == (EMBED,) and mapping.alias_of == EMBED and mapping.shape == SHAPES[EMBED]
    with pytest.raises(UnknownName, match="'lm_head.weight' is not a parameter of the served model"):
        NameMap(SHAPES, tied=False).resolve("lm_head.weight")


def test_an_unknown_name_is_refused_with_the_closest_served_names():
    with pytest.raises(UnknownName) as err:
        NameMap(SHAPES, tied=False).resolve("module.model.layers.0.self_attn.q_projj.weight")
    assert "as 'model.layers.0.self_attn.q_projj.weight' after stripping" in str(err.value)
    assert err.value.closest[0] == "model.layers.0.self_attn.q_proj.weight"


def test_fused_experts_split_into_the_checkpoints_per_expert_tensors():
    names = NameMap(SHAPES, tied=False)
    gate_up = torch.randn(E, 2 * I, H)  # transformers 5: [experts, gate rows then up rows, hidden]
    down = torch.randn(E, H, I)
    m = names.resolve("model.layers.0.mlp.experts.gate_up_proj")
    assert m.shape == (E, 2 * I, H) and len(m.targets) == 2 * E
    parts = m.split(gate_up)
    for e in range(E):
        assert torch.equal(parts[f"model.layers.0.mlp.experts.{e}.gate_proj.weight"], gate_up[e, :I])
        assert torch.equal(parts[f"model.layers.0.mlp.experts.{e}.up_proj.weight"], gate_up[e, I:])
    d = names.resolve("module.model.layers.0.mlp.experts.down_proj")
    assert d.shape == (E, H, I)
    assert all(torch.equal(d.split(down)[f"model.layers.0.mlp.experts.{e}.down_proj.weight"], down[e]) for e in range(E))


@pytest.mark.parametrize("name, shape", [
    ("model.layers.0.mlp.experts.gate_up_proj", (E, 2 * I, H)),
    ("model.layers.0.mlp.experts.down_proj", (E, H, I)),
    ("module.model.norm.weight", (H,)),
    ("lm_head.weight", (32, H)),  # tied: the embedding
])
def test_join_puts_the_split_tensors_back_together(name, shape):
    """A delta push's base, read per checkpoint tensor, in the layout the trainer sent."""
    m = NameMap(SHAPES, tied=True).resolve(name)
    whole = torch.randn(shape)
    assert torch.equal(m.join(m.split(whole)), whole)


def push(tmp_path, tensors: dict[str, torch.Tensor], tied: bool = True, later: dict | None = None) -> dict[str, torch.Tensor]:
    """Run a push of `tensors` through a PushSession, then of `later` declared once those are
    received (as a PushDeclare); what it staged, in checkpoint names."""
    table = ParamTable(SHAPES, tied=tied)

    async def run():
        header = PushHeader(tuple(spec(n, t) for n, t in tensors.items()))
        convert = lambda name, t: to_engine_format(name, t, torch.float32, None)  # noqa: E731
        s = PushSession(header, table, convert, ShardWriter(tmp_path, part_bytes=1 << 20), 1 << 20)
        try:
            for i, t in enumerate(tensors.values()):
                await s.add_chunk(i, 0, raw(t))
            if later:
                await asyncio.gather(*s._pending)  # the first tensors are converted by now
                s.declare([spec(n, t) for n, t in later.items()])
                for i, t in enumerate(later.values(), start=len(tensors)):
                    await s.add_chunk(i, 0, raw(t))
            await s.finish()
        finally:
            s.close()
        return s

    s = asyncio.run(run())
    out = staged(s)
    assert set(s.crc32) == set(out)
    return out


def test_a_tied_head_alone_updates_the_embedding(tmp_path):
    head = torch.randn(32, H)
    assert torch.equal(push(tmp_path, {"lm_head.weight": head})[EMBED], head)


def test_a_tied_head_sent_with_an_equal_embedding_is_accepted(tmp_path):
    e = torch.randn(32, H)
    for order in ({EMBED: e, "lm_head.weight": e.clone()}, {"lm_head.weight": e.clone(), EMBED: e}):
        out = push(tmp_path, order)
        assert list(out) == [EMBED] and torch.equal(out[EMBED], e)


def test_a_tied_head_that_differs_from_its_embedding_is_refused_naming_both(tmp_path):
    e = torch.randn(32, H)
    with pytest.raises(InvalidArgument, match=r"'lm_head.weight' and 'model.embed_tokens.weight' differ.*tie"):
        push(tmp_path, {EMBED: e, "lm_head.weight": e + 1})


def test_a_tied_head_declared_after_its_embedding_was_received_is_still_checked(tmp_path):
    """Client buckets declare later tensors with PushDeclare, after earlier ones are converted."""
    e = torch.randn(32, H)
    assert list(push(tmp_path, {EMBED: e}, later={"lm_head.weight": e.clone()})) == [EMBED]
    with pytest.raises(InvalidArgument, match="'lm_head.weight' and 'model.embed_tokens.weight' differ"):
        push(tmp_path, {EMBED: e}, later={"lm_head.weight": e * 2})


def test_one_parameter_under_two_names_is_refused(tmp_path):
    norm = torch.randn(H)
    with pytest.raises(InvalidArgument, match="'module.model.norm.weight' and tensors\\[0\\] 'model.norm.weight' are the same"):
        push(tmp_path, {"model.norm.weight": norm, "module.model.norm.weight": norm})


def test_a_fused_expert_push_stages_per_expert_tensors(tmp_path):
    gate_up, down = torch.randn(E, 2 * I, H), torch.randn(E, H, I)
    out = push(tmp_path, {"model.layers.0.mlp.experts.gate_up_proj": gate_up, "model.layers.0.mlp.experts.down_proj": down})
    assert set(out) == set(EXPERTS)
    assert torch.equal(out["model.layers.0.mlp.experts.2.up_proj.weight"], gate_up[2, I:])


def test_a_fused_expert_tensor_of_the_wrong_shape_is_refused(tmp_path):
    with pytest.raises(InvalidArgument, match=r"experts.gate_up_proj: shape \[3, 8, 4\] does not match the model's \[3, 16, 4\]"):
        push(tmp_path, {"model.layers.0.mlp.experts.gate_up_proj": torch.randn(E, I, H)})
