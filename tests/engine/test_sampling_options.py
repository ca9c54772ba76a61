"""The sampling options trainers pass (penalties, logit bias, allowed token ids, min_tokens) act as
vLLM's do, and the returned logprobs stay those of the distribution each token was sampled from:
a float32 server against a transformers forward pass with our own implementation of every option
(tests/engine/reference.py), within 1e-3. Each case first shows that its option moves the
logprobs, so the comparison could tell a dropped option apart."""

from __future__ import annotations

import numpy as np
import pytest

from tests.engine.reference import hf_token_logprobs

pytestmark = pytest.mark.engine

TOLERANCE = 1e-3
PROMPTS = [[(11 * i + 3 * j) % 1900 + 40 for j in range(7)] for i in range(3)]
MAX_TOKENS = 24

# name -> sampling options; logit_bias "favoured" is filled in per run with the ids the model
# favours, so that the bias matters.
CASES = {
    "repetition": dict(temperature=1.0, repetition_penalty=1.4),
    "greedy repetition": dict(temperature=0.0, repetition_penalty=1.6),
    "presence and frequency": dict(temperature=0.8, presence_penalty=0.7, frequency_penalty=0.5, top_k=50),
    "logit bias": dict(temperature=1.0, logit_bias="favoured"),
}


@pytest.fixture(scope="module")
def hf_fp32(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def client(fp32_server):
    from rollout_client import RolloutClient

    with RolloutClient(fp32_server.grpc_address, timeout=120) as client:
        yield client


def _options(client, case: dict, vocab_size: int) -> dict:
    """`case` with logit_bias made concrete: -3 on every token the unbiased greedy rollouts pick,
    +2 on as many others, so both signs act on tokens that carry probability."""
    if case.get("logit_bias") != "favoured":
        return dict(case)
    greedy = client.generate(prompt_token_ids=PROMPTS, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    picked = sorted({t for c in greedy for t in c.samples[0].token_ids})
    bias = {t: -3.0 for t in picked} | {t + 1: 2.0 for t in picked if t + 1 not in picked and t + 1 < vocab_size}
    return {**case, "logit_bias": bias}


def _reference_kwargs(options: dict) -> dict:
    keys = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
            "frequency_penalty", "logit_bias", "allowed_token_ids", "min_tokens")
    return {k: v for k, v in options.items() if k in keys}


@pytest.mark.parametrize("case", list(CASES))
def test_an_option_s_logprobs_are_those_of_the_distribution_sampled_from(client, hf_fp32, case):
    options = _options(client, CASES[case], client.status().vocab_size)
    n = 1 if options["temperature"] == 0 else 2
    completions = client.generate(prompt_token_ids=PROMPTS, n=n, max_tokens=MAX_TOKENS, seed=5, ignore_eos=True, **options)
    ref_kwargs = _reference_kwargs(options)
    plain = {k: v for k, v in ref_kwargs.items() if k in ("temperature", "top_k")}
    worst, moved = 0.0, []
    for c in completions:
        for s in c.samples:
            assert len(s.token_ids) == len(s.logprobs) == MAX_TOKENS
            ref = hf_token_logprobs(hf_fp32, c.prompt_token_ids, s.token_ids, **ref_kwargs).numpy()
            assert np.isfinite(ref).all(), f"{case}: a sampled token the reference gives probability 0"
            worst = max(worst, float(np.abs(np.asarray(s.logprobs) - ref).max()))
            without = hf_token_logprobs(hf_fp32, c.prompt_token_ids, s.token_ids, **plain).numpy()
            moved.append(float(np.abs(ref - without)[np.isfinite(without)].mean()))  # top-k may drop a token without the option
    print(f"{case}: max |logprob - reference| {worst:.2e}; the option moves logprobs by {np.mean(moved):.3f} on average")
    assert np.mean(moved) > 0.05, f"{case}: the option barely changes the logprobs; the test could not see it dropped"
    assert worst <= TOLERANCE, (case, worst)


def test_min_tokens_holds_back_stop_tokens_and_allowed_token_ids_bound_the_samples(client, hf_fp32, tiny_model):
    """30 allowed ids, 10 of them stop tokens: without min_tokens a sample would reach 10 tokens
    with probability about (2/3)^10 = 2 %; with min_tokens=10 all of them do, and some then stop."""
    from transformers import AutoConfig

    allowed = list(range(300, 330))
    stops = allowed[::3]
    options = dict(temperature=1.0, allowed_token_ids=allowed, stop_token_ids=stops, min_tokens=10)
    completions = client.generate(prompt_token_ids=PROMPTS, n=4, max_tokens=MAX_TOKENS, seed=9, **options)
    samples = [(c.prompt_token_ids, s) for c in completions for s in c.samples]
    assert all(len(s.token_ids) >= 10 and set(s.token_ids) <= set(allowed) for _, s in samples)
    assert any(s.finish_reason == "stop" and s.token_ids[-1] in stops for _, s in samples)
    eos = AutoConfig.from_pretrained(tiny_model).eos_token_id
    worst = 0.0
    for prompt, s in samples:
        ref = hf_token_logprobs(hf_fp32, prompt, s.token_ids, temperature=1.0, allowed_token_ids=allowed,
                                min_tokens=10, stop_ids=[*stops, eos]).numpy()
        worst = max(worst, float(np.abs(np.asarray(s.logprobs) - ref).max()))
    print(f"min_tokens + allowed_token_ids: max |logprob - reference| {worst:.2e} over {len(samples)} samples")
    assert worst <= TOLERANCE


def test_min_tokens_holds_back_end_of_sequence_until_it_is_reached(client, hf_fp32, tiny_model):
    """End-of-sequence biased to near-certainty: every sample is held to exactly min_tokens tokens,
    then ends on it."""
    from transformers import AutoConfig

    eos = AutoConfig.from_pretrained(tiny_model).eos_token_id
    options = dict(temperature=1.0, min_tokens=5, logit_bias={eos: 100.0})
    completions = client.generate(prompt_token_ids=PROMPTS, n=2, max_tokens=MAX_TOKENS, seed=4, **options)
    worst = 0.0
    for c in completions:
        for s in c.samples:
            assert len(s.token_ids) == 6 and s.token_ids[-1] == eos and s.finish_reason == "stop", s.token_ids
            assert eos not in s.token_ids[:5]
            ref = hf_token_logprobs(hf_fp32, c.prompt_token_ids, s.token_ids, stop_ids=[eos], **options).numpy()
            worst = max(worst, float(np.abs(np.asarray(s.logprobs) - ref).max()))
    assert worst <= TOLERANCE
