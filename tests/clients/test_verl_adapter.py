"""The verl plugin's parts with the real verl 0.9.1 package (installed --no-deps, see
clients/python/trainer-adapters.txt) against a real server, called directly: the trainer-side
rollout (verl's BaseRollout, DataProto, RolloutConfig) and the server actor's class (verl's
TokenOutput). test_verl_plugin.py drives them through verl's own managers."""

from __future__ import annotations

import asyncio

import pytest
import torch
from safetensors.torch import load_file

from tests.trainers import require_trainer

require_trainer("verl")  # skipped where not installed; in CI a failure
from verl import DataProto  # noqa: E402
from verl.workers.config import RolloutConfig  # noqa: E402
from verl.workers.rollout.base import BaseRollout  # noqa: E402
from verl.workers.rollout.replica import TokenOutput  # noqa: E402

from rollout_client.integrations.verl import Connection, RolloutServiceRollout, RolloutServiceServer  # noqa: E402

pytestmark = pytest.mark.engine
PAD = 0
RESPONSE_LENGTH = 8


@pytest.fixture(scope="module")
def base_weights(tiny_model):
    return load_file(tiny_model / "model.safetensors")


@pytest.fixture(scope="module")
def rollout(trainer_server, base_weights):
    r = RolloutServiceRollout(
        RolloutConfig(name="rollout_service", response_length=RESPONSE_LENGTH, prompt_length=6), None, None,
        address=trainer_server.grpc_address,
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


def test_update_weights_pushes_a_new_version_labelled_with_the_global_step(rollout, base_weights):
    greedy = left_padded([[5, 6, 7, 8, 9, 10]])
    before = rollout.generate_sequences(greedy).batch["responses"]
    changed = {k: (-v if k == "model.norm.weight" else v) for k, v in base_weights.items()}
    pushed = asyncio.run(rollout.update_weights(iter(changed.items()), global_steps=12))
    assert rollout.client.status().last_push.label == "12"
    out = rollout.generate_sequences(greedy)
    assert out.non_tensor_batch["weight_version"][0] == pushed.version
    assert not torch.equal(out.batch["responses"], before)
    asyncio.run(rollout.update_weights(iter(base_weights.items())))
    assert torch.equal(rollout.generate_sequences(greedy).batch["responses"], before)


def _untouchable():
    raise AssertionError("the generator was stepped: a refusal must come before any gather")
    yield


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"wire_format": "delta_flush"}, "wire_format='delta_flush'"),
        ({"wire_format": "bucketed"}, "wire_format='bucketed'"),
        ({"peft_config": {"r": 8}}, "lora.merge=True"),
    ],
)
def test_a_sync_the_service_cannot_apply_is_refused_before_the_generator_is_stepped(rollout, kwargs, match):
    with pytest.raises(ValueError, match=match):
        asyncio.run(rollout.update_weights(_untouchable(), **kwargs))


async def test_the_server_actor_fills_max_tokens_as_verls_vllm_server_and_returns_verls_token_output(trainer_server):
    config = RolloutConfig(name="rollout_service", prompt_length=6, response_length=20)
    server = RolloutServiceServer(config, 0, Connection(trainer_server.grpc_address, timeout=120))
    params = {"temperature": 1.0, "top_k": -1, "top_p": 1.0, "repetition_penalty": 1.0, "logprobs": True, "ignore_eos": True}
    out = await server.generate(prompt_ids=[5, 6, 7], sampling_params=params, request_id="turn-1")
    assert isinstance(out, TokenOutput) and out.stop_reason == "completed"
    assert len(out.token_ids) == len(out.log_probs) == 20  # no max_tokens sent: the response length
    assert out.extra_fields["weight_version"] == out.extra_fields["first_weight_version"] >= 1
    without = await server.generate(prompt_ids=[5, 6, 7], sampling_params={**params, "logprobs": False}, request_id="turn-2")
    assert without.log_probs is None


async def test_aborted_calls_come_back_aborted_and_new_ones_wait_for_resume(bf16_server):
    """Generation is held (tests/observe.py), so the call sits in the engine until it is aborted."""
    from tests.observe import held

    config = RolloutConfig(name="rollout_service", prompt_length=6, response_length=200)
    server = RolloutServiceServer(config, 0, Connection(bf16_server.grpc_address, timeout=120))
    params = {"temperature": 1.0, "ignore_eos": True, "logprobs": True}
    client = server.client
    aborted_before = (await client.status()).counters.prompts_aborted
    with held(bf16_server):
        running = asyncio.ensure_future(server.generate(prompt_ids=[5, 6, 7], sampling_params=params, request_id="long"))
        for _ in range(12000):  # until the service has the request in its (held) engine
            if (await client.status()).counters.engine_requests_running == 1:
                break
            await asyncio.sleep(0.01)
        report = await server.abort_all_requests()
        assert report == {"aborted_count": 1, "request_ids": ["long"]}
        out = await running
        assert out.stop_reason == "aborted" and out.token_ids == [] and out.log_probs == []
        assert set(out.extra_fields) == {"weight_version", "first_weight_version", "global_steps", "min_global_steps", "max_global_steps"}
        for _ in range(12000):  # the service notices the cancelled call and aborts its engine request
            if (await client.status()).counters.prompts_aborted == aborted_before + 1:
                break
            await asyncio.sleep(0.01)
        assert (await client.status()).counters.prompts_aborted == aborted_before + 1
    waiting = asyncio.ensure_future(server.generate(prompt_ids=[5, 6], sampling_params={**params, "max_tokens": 2}, request_id="next"))
    await asyncio.sleep(0)  # one turn of the loop: an open gate would have started the call by now
    assert "next" not in server._calls and not waiting.done()  # held until resume_generation
    await server.resume_generation()
    assert len((await waiting).token_ids) == 2


def test_no_address_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("ROLLOUT_SERVICE_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="ROLLOUT_SERVICE_ADDRESS"):
        RolloutServiceRollout(RolloutConfig(name="rollout_service"), None, None)


# Last in the module: it leaves the shared server on a version the module's rollout did not push.
def test_a_push_by_someone_else_fails_the_next_sync_and_its_samples_are_refused(rollout, trainer_server, base_weights):
    from rollout_client import FailedPreconditionError, RolloutClient
    from rollout_client.rl import StaleRolloutError

    before = rollout.last_push.version
    with RolloutClient(trainer_server.grpc_address, timeout=120) as foreign:
        foreign.push_weights(base_weights, label="someone else", progress=False)
    with pytest.raises(StaleRolloutError, match=f"newer than this trainer's last push \\({before}\\)"):
        rollout.generate_sequences(left_padded([[5, 6, 7]]))
    with pytest.raises(FailedPreconditionError, match=f"expected_version: {before} is stale"):
        asyncio.run(rollout.update_weights(iter(base_weights.items()), global_steps=99))
    assert rollout.last_push.version == before
