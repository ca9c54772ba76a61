"""bf16 pushes: a server that received W by push serves exactly what a server started from W does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.weights.conftest import GREEDY, PROMPTS, engine_weights, greedy, perturb, start_server

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def reference(request, model1, tmp_path_factory):
    """A fresh bf16 server started from W1: what a push of W1 must reproduce."""
    return start_server(request, model1, tmp_path_factory, "bf16-w1")


@pytest.fixture(scope="module")
def reference_client(reference):
    from rollout_client import RolloutClient

    with RolloutClient(reference.grpc_address, timeout=120) as client:
        yield client


def test_full_push_serves_exactly_a_fresh_server_of_the_pushed_weights(bf16_target_client, reference_client, weights1):
    client = bf16_target_client
    before = client.status().weight_version
    result = client.push_weights(weights1, label="step 1", chunk_bytes=64 * 1024)
    assert result.version == before + 1 and result.tensors_applied == len(weights1)
    assert result.bytes_received == sum(t.numel() * t.element_size() for t in weights1.values())
    assert client.status().weight_version == before + 1 and client.status().last_push.label == "step 1"
    pushed, fresh = greedy(client), greedy(reference_client)
    assert pushed == fresh  # tokens and logprobs, bitwise
    for c in client.generate(prompt_token_ids=PROMPTS, **GREEDY):
        assert c.samples[0].weight_version == before + 1 == c.samples[0].first_weight_version


def test_pushed_engine_holds_bitwise_the_fresh_engines_weights(bf16_target, bf16_target_client, reference, weights1):
    bf16_target_client.push_weights(weights1)
    pushed, fresh = engine_weights(bf16_target), engine_weights(reference)
    assert pushed.keys() == fresh.keys() and any(k.endswith(".probe") for k in pushed)
    assert [k for k in pushed if not torch.equal(pushed[k], fresh[k])] == []


def test_partial_push_equals_a_full_push_of_the_merged_weights(bf16_target_client, reference_client, weights0, weights1):
    """Pushing only some tensors (here: one whole layer and half of another's fused q/k/v, whose
    other members the server must take from the current weights) keeps the rest."""
    subset = {k: v for k, v in weights0.items() if ".layers.1." in k or ".layers.2.self_attn.q_proj" in k}
    bf16_target_client.push_weights(weights1)  # start from W1 whatever ran before
    bf16_target_client.push_weights(subset)
    merged = {**weights1, **subset}
    reference_client.push_weights(merged)  # a full push equals a fresh server (test above)
    assert greedy(bf16_target_client) == greedy(reference_client)
    reference_client.push_weights(weights1)


def test_pushed_logprobs_match_transformers_on_the_pushed_weights(bf16_target_client, weights1, model1):
    """As accurate as transformers' own bf16 against the float32 reference (the issue-3 rule)."""
    from transformers import AutoModelForCausalLM

    from tests.engine.reference import hf_token_logprobs

    bf16_target_client.push_weights(weights1)
    hf32 = AutoModelForCausalLM.from_pretrained(model1, torch_dtype=torch.float32)
    hf16 = AutoModelForCausalLM.from_pretrained(model1, torch_dtype=torch.bfloat16)
    for prompt, (tokens, logprobs) in zip(PROMPTS, greedy(bf16_target_client)):
        ref = hf_token_logprobs(hf32, prompt, tokens, temperature=0.0).numpy()
        hf = hf_token_logprobs(hf16, prompt, tokens, temperature=0.0).numpy()
        engine_err = np.abs(np.asarray(logprobs) - ref).max()
        assert engine_err <= 1.5 * np.abs(hf - ref).max() + 0.01, (engine_err, np.abs(hf - ref).max())


def test_pushing_the_old_weights_back_restores_the_old_outputs(bf16_target_client, weights0, weights1):
    bf16_target_client.push_weights(weights0)
    before = greedy(bf16_target_client)
    bf16_target_client.push_weights(perturb(weights0, seed=7))
    assert greedy(bf16_target_client) != before
    bf16_target_client.push_weights(weights0)
    assert greedy(bf16_target_client) == before


def test_fp32_and_fp16_pushes_are_converted_to_the_engine_dtype(bf16_target_client, weights1):
    bf16_target_client.push_weights(weights1)
    expected = greedy(bf16_target_client)
    # bf16 -> fp32 is exact, so an fp32 push of the same values lands on the same bf16 weights.
    bf16_target_client.push_weights({k: v.float() for k, v in weights1.items()})
    assert greedy(bf16_target_client) == expected
    as_numpy = {k: v.float().numpy().astype(np.float16) for k, v in weights1.items()}
    assert bf16_target_client.push_weights(as_numpy).tensors_applied == len(weights1)


def test_http_push_of_a_safetensors_body(bf16_target, bf16_target_client, weights0, weights1):
    import httpx
    from safetensors.torch import save

    bf16_target_client.push_weights(weights1)
    expected = greedy(bf16_target_client)
    bf16_target_client.push_weights(weights0)
    body = save(weights1)
    version = bf16_target_client.status().weight_version

    def pieces():  # streamed in 64 KiB pieces, as a large upload would be
        for i in range(0, len(body), 65536):
            yield body[i : i + 65536]

    response = httpx.post(
        f"{bf16_target.http_url}/v1/weights", params={"label": "http", "expected_version": version},
        content=pieces(), timeout=120,
    )
    assert response.status_code == 200, response.text
    assert response.json()["version"] == version + 1 and response.json()["label"] == "http"
    assert greedy(bf16_target_client) == expected
