"""The Python client against a real server: bucketed pushes from generators, the progress
summary, wait_for_version, streaming, the async client, and the mismatch report."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from rollout_client import AsyncRolloutClient, RolloutClient, mismatch_report

pytestmark = pytest.mark.engine
GREEDY = dict(prompt_token_ids=[[11, 22, 33, 44, 55, 66]], max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def base_weights(tiny_model):
    return load_file(tiny_model / "model.safetensors")


@pytest.fixture(scope="module")
def client(trainer_server):
    with RolloutClient(trainer_server.grpc_address, timeout=120) as c:
        yield c


def test_a_generator_push_in_buckets_serves_the_new_version_and_prints_a_summary(client, base_weights, capsys):
    client.push_weights(base_weights, progress=False)
    before = client.generate(**GREEDY)[0].samples[0]
    pulled = []

    def scaled():  # a trainer gathering its parameters one at a time
        for name, t in base_weights.items():
            pulled.append(name)
            yield name, (t.float() * 1.5).to(torch.bfloat16) if name == "model.norm.weight" else t

    result = client.push_weights(scaled(), bucket_bytes=1 << 20, chunk_bytes=1 << 16, label="bucketed", progress=True)
    assert pulled == list(base_weights) and result.tensors_applied == len(base_weights)
    assert result.dense_bytes == sum(t.numel() * t.element_size() for t in base_weights.values()) >= result.bytes_received
    err = capsys.readouterr().err
    assert f"-> version {result.version}" in err and "GB/s" in err
    after = client.generate(**GREEDY)[0].samples[0]
    assert after.weight_version == result.version and after.logprobs.tolist() != before.logprobs.tolist()


def test_wait_for_version_returns_at_once_for_a_served_version_and_times_out_on_a_future_one(client):
    served = client.status().weight_version
    assert client.wait_for_version(served, timeout=5).weight_version == served
    with pytest.raises(Exception, match=f"weight version {served + 5} not served"):
        client.wait_for_version(served + 5, timeout=1.0, poll_s=0.2)


def test_stream_gives_each_prompt_once_with_its_logprobs(client):
    prompts = [[5 + i, 6 + i, 7 + i] for i in range(4)]
    got = list(client.generate_stream(prompt_token_ids=prompts, max_tokens=5, temperature=0.0, ignore_eos=True))
    assert sorted(c.prompt_index for c in got) == [0, 1, 2, 3]
    assert all(len(c.samples[0].logprobs) == 5 for c in got)


async def test_the_async_client_pushes_and_generates(trainer_server, base_weights):
    async with AsyncRolloutClient(trainer_server.grpc_address, timeout=120) as client:
        result = await client.push_weights(base_weights, label="async", progress=False)
        completion = (await client.generate(**GREEDY))[0]
        assert completion.samples[0].weight_version == result.version
        assert (await client.status()).last_push.label == "async"


def test_mismatch_report_of_bf16_rollouts_against_a_float32_trainer_is_small(client, base_weights, tiny_model):
    from transformers import AutoModelForCausalLM

    client.push_weights(base_weights, progress=False)
    completion = client.generate(prompt_token_ids=[[3, 1, 4, 1, 5, 9, 2, 6]], n=4, max_tokens=12, temperature=1.0, seed=7)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    trainer, rollout = [], []
    for s in completion.samples:
        ids = torch.tensor([completion.prompt_token_ids + s.token_ids])
        logits = model(ids).logits[0, len(completion.prompt_token_ids) - 1 : -1]
        trainer.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.token_ids)[:, None])[:, 0])
        rollout.append(torch.from_numpy(s.logprobs))
    report = mismatch_report(torch.cat(trainer).detach(), torch.cat(rollout))
    assert report.tokens == 48
    assert 0 < report.mean_abs_diff < 0.1 and report.kl < 0.01 and report.fraction_clipped == 0
