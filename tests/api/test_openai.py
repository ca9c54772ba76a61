"""The OpenAI-compatible endpoints on a real server, driven by the official `openai` package over
HTTP: the logprobs are Generate's (and transformers' within 1e-3 on a float32 engine), chat uses
the model's template, streams carry the same choices, sessions continue token in / token out on
the prefix cache, and errors come back as OpenAI's clients expect them."""

from __future__ import annotations

import numpy as np
import openai
import pytest
import torch

from tests.engine.reference import hf_token_logprobs

pytestmark = pytest.mark.engine

TEXTS = ["The trainer computes", "A weight push streams new weights"]
SAMPLING = dict(temperature=0.7, top_k=20)


def client_of(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="no-keys-configured", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def bf16(bf16_server):
    with client_of(bf16_server) as client:
        yield client


def test_models_lists_the_served_model_under_its_directory_name(bf16, tiny_model):
    (model,) = bf16.models.list().data
    assert model.id == tiny_model.name and model.owned_by == "rollout-service"


def test_completion_logprobs_are_generates_and_match_transformers_within_1e_3(fp32_server, tokenizer, tiny_model):
    from rollout_client import RolloutClient
    from transformers import AutoModelForCausalLM

    prompts = [tokenizer.encode(t) for t in TEXTS]
    with client_of(fp32_server) as client:
        reply = client.completions.create(
            model=tiny_model.name, prompt=prompts, n=2, max_tokens=24, seed=11, logprobs=0, **{"temperature": 0.7},
            extra_body={"top_k": 20, "ignore_eos": True, "return_token_ids": True},
        )
    with RolloutClient(fp32_server.grpc_address, timeout=120) as rpc:
        generated = rpc.generate(prompt_token_ids=prompts, n=2, max_tokens=24, seed=11, ignore_eos=True, **SAMPLING)
    samples = [s for c in generated for s in c.samples]
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]  # choice i*n + j: sample j of prompt i
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    worst = 0.0
    for i, (choice, sample) in enumerate(zip(reply.choices, samples)):
        assert choice.model_extra["token_ids"] == sample.token_ids and len(sample.token_ids) == 24
        assert choice.logprobs.token_logprobs == sample.logprobs.tolist()  # exactly Generate's
        assert choice.model_extra["prompt_token_ids"] == prompts[i // 2]
        reference = hf_token_logprobs(model, prompts[i // 2], sample.token_ids, **SAMPLING).numpy()
        worst = max(worst, float(np.abs(np.asarray(choice.logprobs.token_logprobs) - reference).max()))
    print(f"OpenAI endpoint, fp32 engine, t0.7 top-k 20: max |dlogprob| vs transformers = {worst:.2e}")
    assert worst <= 1e-3


def test_chat_uses_the_models_template_and_choices_carry_token_ids_logprobs_and_versions(bf16, bf16_client, tokenizer, tiny_model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a prime."}]
    reply = bf16.chat.completions.create(
        model=tiny_model.name, messages=messages, n=2, max_tokens=8, seed=5, logprobs=True, top_logprobs=3,
        extra_body={"return_token_ids": True, "token_weight_versions": True, "ignore_eos": True},
    )
    assert reply.model_extra["prompt_token_ids"] == tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    version = bf16_client.status().weight_version
    assert len(reply.choices) == 2 and reply.usage.completion_tokens == 16
    for choice in reply.choices:
        ids = choice.model_extra["token_ids"]
        assert len(ids) == 8 and choice.finish_reason == "length" and choice.message.role == "assistant"
        assert choice.message.content == tokenizer.decode(ids, skip_special_tokens=True)
        assert [len(t.top_logprobs) for t in choice.logprobs.content] == [3] * 8
        assert all(t.top_logprobs[0].logprob >= t.logprob for t in choice.logprobs.content)
        extra = choice.model_extra
        assert (extra["weight_version"], extra["first_weight_version"], extra["token_weight_versions"]) == (version, version, [[version, 8]])


def test_streamed_choices_come_token_by_token_and_add_up_to_the_unstreamed_ones(bf16, tiny_model):
    args = dict(model=tiny_model.name, prompt=TEXTS, n=2, max_tokens=6, seed=7, logprobs=1)
    whole = bf16.completions.create(**args)
    chunks = list(bf16.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    streamed: dict[int, list] = {}
    for chunk in chunks:
        for c in chunk.choices:
            streamed.setdefault(c.index, []).append(c)
    assert len(chunks) > len(whole.choices) + 1  # pieces, not one chunk per finished choice
    assert [(i, "".join(p.text for p in parts), [lp for p in parts for lp in p.logprobs.token_logprobs])
            for i, parts in sorted(streamed.items())] == \
        [(c.index, c.text, c.logprobs.token_logprobs) for c in whole.choices]
    assert all(parts[-1].finish_reason == "length" and {p.finish_reason for p in parts[:-1]} <= {None}
               for parts in streamed.values())
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    messages = [{"role": "user", "content": "Count to three."}]
    chat = bf16.chat.completions.create(model=tiny_model.name, messages=messages, max_tokens=6, seed=3)
    deltas = list(bf16.chat.completions.create(model=tiny_model.name, messages=messages, max_tokens=6, seed=3, stream=True))
    assert len(deltas) > 2 and deltas[0].choices[0].delta.role == "assistant"
    assert "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_a_session_continues_token_in_token_out_on_the_prefix_cache(bf16, tokenizer, tiny_model):
    """Turn 2 sends turn 1's prompt ids + its sampled ids + the new observation tokenized alone: no
    sampled token is re-tokenized, and the prefix computed for turn 1 is served from the cache."""
    system = "You are a careful agent who checks every step. " * 7
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Begin the task."}]
    first = bf16.chat.completions.create(
        model=tiny_model.name, messages=messages, max_tokens=8, seed=1,
        extra_body={"return_token_ids": True, "session_id": "episode-1"},
    )
    sampled = first.choices[0].model_extra["token_ids"]
    observation = tokenizer.encode("\n<tool_response>\nok\n</tool_response>\n")
    prompt = first.model_extra["prompt_token_ids"] + sampled + observation
    assert len(prompt) < 240  # the bf16 server's context is 256
    second = bf16.completions.create(
        model=tiny_model.name, prompt=prompt, max_tokens=8, seed=2,
        extra_body={"return_token_ids": True, "session_id": "episode-1"},
    )
    assert second.choices[0].model_extra["prompt_token_ids"] == prompt  # as sent, not re-tokenized
    cached = second.usage.prompt_tokens_details.cached_tokens
    print(f"turn 2: {cached} of {second.usage.prompt_tokens} prompt tokens from the prefix cache")
    assert 0 < cached <= len(first.model_extra["prompt_token_ids"]) + len(sampled)


def test_errors_come_back_as_openais_clients_expect(bf16, tiny_model):
    with pytest.raises(openai.NotFoundError, match="is not served here"):
        bf16.completions.create(model="gpt-4o", prompt="x")
    with pytest.raises(openai.BadRequestError) as err:
        bf16.completions.create(model=tiny_model.name, prompt=[[1, 99999]], max_tokens=2)
    assert err.value.body["param"] == "prompt[0].token_ids[1]" and err.value.body["code"] == "INVALID_ARGUMENT"
    with pytest.raises(openai.BadRequestError) as err:
        bf16.chat.completions.create(model=tiny_model.name, messages=[{"role": "user", "content": "word " * 300}])
    assert err.value.body["param"] == "messages" and "max_model_len=256" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        bf16.completions.create(model=tiny_model.name, prompt="x", echo=True)
    assert err.value.body["param"] == "echo"
    with pytest.raises(openai.BadRequestError) as err:
        bf16.completions.create(model=tiny_model.name, prompt="x", logprobs=99)
    assert err.value.body["param"] == "logprobs" and "max_logprobs=20" in err.value.body["message"]
