"""The verl adapter with the real verl 0.9.1 package (installed --no-deps, see
clients/python/trainer-adapters.txt) against a real server: verl's DataProto and BaseRollout,
its RolloutConfig, its TokenOutput."""

from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("verl", reason="make install puts verl in .venv (clients/python/trainer-adapters.txt)")
from verl import DataProto  # noqa: E402
from verl.workers.config import RolloutConfig  # noqa: E402
from verl.workers.rollout.base import BaseRollout  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from rollout_client.integrations.verl import RolloutServiceRollout, RolloutServiceServerManager  # noqa: E402

pytestmark = pytest.mark.engine
PAD = 0
RESPONSE_LENGTH = 8


@pytest.fixture(scope="module")
def base_weights(tiny_model):
    return load_file(tiny_model / "model.safetensors")


@pytest.fixture(scope="module")
def rollout(trainer_server, base_weights):
    r = RolloutServiceRollout(
        RolloutConfig(name="vllm", response_length=RESPONSE_LENGTH, prompt_length=6), None, None,
        address=trainer_server.grpc_address, timeout=120,
    )
    asyncio.run(r.update_weights(iter(base_weights.items())))  # the trainer's first sync
    return r


def left_padded(prompts: list[list[int]]) -> DataProto:
    """A batch as verl's dataloader gives it to a rollout: left-padded prompts."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    return DataProto.from_dict(
        tensors={"input_ids": ids, "attention_mask": mask, "position_ids": position_ids},
        meta_info={"eos_token_id": 0, "pad_token_id": PAD, "do_sample": False},
    )


def test_it_is_a_verl_rollout(rollout):
    assert isinstance(rollout, BaseRollout)


def test_generate_sequences_returns_verls_fields_and_the_exact_rollout_logprobs(rollout, tiny_model):
    from transformers import AutoModelForCausalLM

    prompts = [[5, 6, 7, 8, 9, 10], [40, 41, 42]]
    out = rollout.generate_sequences(left_padded(prompts))
    b = out.batch
    assert b["responses"].shape == (2, RESPONSE_LENGTH) and b["rollout_log_probs"].shape == (2, RESPONSE_LENGTH)
    assert b["input_ids"].shape == (2, 6 + RESPONSE_LENGTH)
    assert torch.equal(b["input_ids"][:, 6:], b["responses"]) and torch.equal(b["prompts"][1, :3], torch.zeros(3, dtype=torch.long))
    # positions continue from each prompt's last position
    assert b["position_ids"][1].tolist() == [0, 0, 0, 0, 1, 2] + list(range(3, 3 + RESPONSE_LENGTH))
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    bf16 = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    for i, prompt in enumerate(prompts):
        n = int(b["attention_mask"][i, 6:].sum())
        response = b["responses"][i, :n].tolist()
        assert n >= 1 and b["rollout_log_probs"][i, n:].abs().sum() == 0
        ids = torch.tensor([prompt + response])
        ref = torch.log_softmax(fp32(ids).logits[0, len(prompt) - 1 : -1].float(), -1).detach()
        hf16 = torch.log_softmax(bf16(ids).logits[0, len(prompt) - 1 : -1].float(), -1).detach()
        chosen = torch.tensor(response)[:, None]
        ref_chosen, hf16_chosen = ref.gather(-1, chosen)[:, 0], hf16.gather(-1, chosen)[:, 0]
        # bf16 rounding (which differs by CPU and batch shape) moves logprobs by about as much as
        # transformers' own bf16 moves them: the rule of tests/weights/test_push_bf16.py.
        tolerance = 1.5 * float((hf16_chosen - ref_chosen).abs().max()) + 0.01
        # greedy: each token is the reference's argmax, or within that tolerance of it (a near tie)
        assert (ref.max(-1).values - ref_chosen).max() <= tolerance, (response, ref.argmax(-1).tolist())
        assert float((b["rollout_log_probs"][i, :n] - ref_chosen).abs().max()) <= tolerance
    assert list(out.non_tensor_batch["weight_version"]) == [rollout.last_push.version] * 2


def test_sampling_settings_come_from_the_config_and_the_batch_meta_info(rollout):
    batch = left_padded([[5, 6, 7]] * 4)
    batch.meta_info.update(do_sample=True, temperature=1.0, response_length=3)
    out = rollout.generate_sequences(batch)
    assert out.batch["responses"].shape == (4, 3)
    assert len({tuple(r.tolist()) for r in out.batch["responses"]}) > 1  # sampled, not greedy


@pytest.mark.parametrize("wire_format", ["named_tensors", "delta_flush"])
def test_update_weights_pushes_a_new_version_that_changes_the_outputs(rollout, base_weights, wire_format):
    greedy = left_padded([[5, 6, 7, 8, 9, 10]])
    before = rollout.generate_sequences(greedy).batch["responses"]
    changed = {k: (-v if k == "model.norm.weight" else v) for k, v in base_weights.items()}
    items = iter(changed.items())
    weights = items if wire_format == "named_tensors" else iter([(list(items), True)])
    version = asyncio.run(rollout.update_weights(weights, wire_format=wire_format)).version
    out = rollout.generate_sequences(greedy)
    assert out.non_tensor_batch["weight_version"][0] == version
    assert not torch.equal(out.batch["responses"], before)
    asyncio.run(rollout.update_weights(iter(base_weights.items())))
    assert torch.equal(rollout.generate_sequences(greedy).batch["responses"], before)


def test_an_unknown_wire_format_is_refused(rollout):
    with pytest.raises(ValueError, match="wire_format='bucketed'"):
        asyncio.run(rollout.update_weights(iter([]), wire_format="bucketed"))


async def test_the_agent_loop_server_interface_returns_verls_token_output(trainer_server):
    manager = RolloutServiceServerManager(trainer_server.grpc_address, timeout=120)
    out = await manager.generate(
        "traj-1", prompt_ids=[5, 6, 7], sampling_params={"temperature": 1.0, "top_k": -1, "logprobs": True, "max_tokens": 6}
    )
    assert isinstance(out, TokenOutput) and len(out.token_ids) == len(out.log_probs) <= 6
    assert out.stop_reason == "completed" and out.extra_fields["weight_version"] >= 1


def test_no_address_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("ROLLOUT_SERVICE_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="ROLLOUT_SERVICE_ADDRESS"):
        RolloutServiceRollout(RolloutConfig(name="vllm"), None, None)
