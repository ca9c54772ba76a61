"""The three in-flight policies, each with a long generation running when a push is applied.

"Running" holds by construction on any machine: the push is received and staged first; the
generation starts, and the server holds generation as soon as every sample has its first token
(held(stepped=True)), so the samples are frozen with ~500 steps to go when the push's commit goes
out. The push then pauses per its own policy
(which replaces the hold: drain steps the frozen samples to their end, abort ends them, continue
keeps them) and resumes generation when it is applied. The push reports how many samples it found
in the engine (PushResult.samples_in_flight)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from tests.observe import InBackground, held, step, wait_until
from tests.weights.conftest import LONG_CONTEXT, PROMPTS, perturb

pytestmark = pytest.mark.engine

MAX_TOKENS = 500
assert MAX_TOKENS + len(PROMPTS[0]) <= LONG_CONTEXT
LONG = dict(prompt_token_ids=PROMPTS[:2], n=2, max_tokens=MAX_TOKENS, temperature=1.0, seed=3, ignore_eos=True)
SAMPLES = 2 * 2


def push_during_long_generation(server, client, weights, policy: str, generate=None):
    """Returns (samples, push result, version before); `generate()` makes the long call (default:
    Generate with LONG) and returns its samples."""
    generate = generate or (lambda: [s for c in client.generate(**LONG) for s in c.samples])
    before = client.status().weight_version
    staged, commit = threading.Event(), threading.Event()

    def tensors():
        yield from weights.items()
        staged.set()  # every tensor is handed to gRPC (one per bucket): only the commit is left
        commit.wait(300)

    push = InBackground(lambda: client.push_weights(tensors(), inflight=policy, bucket_bytes=1))
    try:
        wait_until(lambda: staged.is_set() or push.done(), "the push's tensors to be sent")
        if push.done():
            push.outcome()  # the push failed early: raise its error
        # Held before the call is made, so the generation cannot end before it is seen in the
        # engine, however fast the machine or slow the polling (a busy CI machine).
        with held(server):
            generation = InBackground(generate)
            wait_until(lambda: generation.done() or client.status().counters.engine_requests_running == SAMPLES,
                       "the long generation in the engine")
            if generation.done():
                generation.outcome()  # the call failed before reaching the engine: raise its error
            # Added is not yet scheduled: a request the engine has not stepped holds no KV blocks,
            # and a drain pause keeps it queued for the new weights. So every sample first gets its
            # first token, decided inside the server, and is held again.
            step(server)
            commit.set()
            result = push.outcome()
    finally:
        commit.set()  # never leave the server holding a half-done push for the next test
    samples = generation.outcome()
    assert len(samples) == SAMPLES
    return samples, result, before


@pytest.fixture(scope="module")
def new_weights(weights0):
    return perturb(weights0, seed=11)


def test_drain_finishes_running_samples_on_the_old_weights_first(bf16_target, bf16_target_client, new_weights):
    samples, result, before = push_during_long_generation(bf16_target, bf16_target_client, new_weights, "drain")
    assert result.version == before + 1 and result.samples_in_flight == SAMPLES
    for s in samples:
        assert s.finish_reason == "length" and len(s.token_ids) == MAX_TOKENS
        assert s.weight_version == s.first_weight_version == before


def test_abort_ends_running_samples_which_resume_from_their_tokens_on_the_new_version(bf16_target, bf16_target_client, new_weights):
    client = bf16_target_client
    captured = {}

    def generate():
        captured["completions"] = client.generate(**LONG)
        return [s for c in captured["completions"] for s in c.samples]

    samples, result, before = push_during_long_generation(bf16_target, client, new_weights, "abort", generate)
    assert result.version == before + 1 and result.samples_in_flight == SAMPLES
    assert all(s.finish_reason == "aborted" and len(s.token_ids) < MAX_TOKENS for s in samples)
    assert all(s.weight_version == s.first_weight_version == before for s in samples)
    assert all(len(s.logprobs) == len(s.token_ids) for s in samples)
    assert client.status().counters.engine_requests_running == 0
    sampling = {k: v for k, v in LONG.items() if k not in ("prompt_token_ids", "n", "max_tokens", "seed")}
    for completion in captured["completions"]:
        for s in completion.samples:
            whole = client.resume(completion, s, max_tokens=MAX_TOKENS, **sampling)
            assert whole.token_ids[: len(s.token_ids)] == s.token_ids and len(whole.token_ids) == MAX_TOKENS
            assert len(whole.logprobs) == MAX_TOKENS and whole.finish_reason == "length"
            runs = [(before, len(s.token_ids))] if s.token_ids else []
            assert whole.token_weight_versions == runs + [(before + 1, MAX_TOKENS - len(s.token_ids))]


def test_continue_carries_samples_across_the_flip_and_recomputes_their_kv_on_the_new_weights(
    bf16_target, bf16_target_client, weights0, tiny_model
):
    """Under "continue" no token is sampled from keys and values of one version and weights of
    another: the pause drops the running samples' KV, and they are prefilled again (prompt + tokens
    so far) on the new weights. So every token after the flip has the logprob that the new weights
    give it over the whole sequence, as transformers computes it."""
    from transformers import AutoModelForCausalLM

    from tests.engine.reference import hf_token_logprobs

    other = perturb(weights0, seed=12)  # unlike what the tests before pushed: stale KV would show
    samples, result, before = push_during_long_generation(bf16_target, bf16_target_client, other, "continue")
    assert result.version == before + 1 and result.samples_in_flight == SAMPLES
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    model.load_state_dict({k: v.float() for k, v in other.items()}, strict=False)
    model.tie_weights()
    errors, before_flip, first_after = [], [], []
    for i, s in enumerate(samples):
        assert s.finish_reason == "length" and len(s.token_ids) == MAX_TOKENS
        assert (s.first_weight_version, s.weight_version) == (before, before + 1)
        (old, k), (new, rest) = s.token_weight_versions  # every token's version: two runs
        assert (old, new, k + rest) == (before, before + 1, MAX_TOKENS) and k >= 1
        reference = hf_token_logprobs(model, PROMPTS[i // 2], s.token_ids).numpy()
        errors.append(np.abs(s.logprobs[k:] - reference[k:]))
        before_flip.append(np.abs(s.logprobs[:k] - reference[:k]))
        first_after.append(errors[-1][:16])  # attending most to the positions whose KV was recomputed
    errors, before_flip, first_after = (np.concatenate(x) for x in (errors, before_flip, first_after))
    print(f"continue: vs transformers on the new weights, mean |d| {errors.mean():.4f} (max {errors.max():.3f}) over "
          f"{errors.size} tokens after the flip, {before_flip.mean():.3f} over the {before_flip.size} before it")
    print(f"continue: the 16 tokens right after the flip: mean |d| {first_after.mean():.4f}")
    assert errors.mean() <= 0.02 and first_after.mean() <= 0.03  # bf16 engine vs float32 reference
    assert before_flip.mean() >= 5 * errors.mean()  # the reference tells the two versions apart
    assert result.drain_ms == 0.0  # nothing waited for the running samples


def test_openai_choices_carry_each_tokens_version_across_a_push(bf16_target, bf16_target_client, new_weights):
    import openai

    with openai.OpenAI(base_url=f"{bf16_target.http_url}/v1", api_key="none", max_retries=0, timeout=300) as oai:
        model = oai.models.list().data[0].id

        def generate():
            reply = oai.completions.create(
                model=model, prompt=LONG["prompt_token_ids"], n=2, max_tokens=MAX_TOKENS, temperature=1.0,
                seed=3, logprobs=0, extra_body={"ignore_eos": True, "token_weight_versions": True, "return_token_ids": True},
            )
            return [choice.model_extra | {"logprobs": choice.logprobs.token_logprobs} for choice in reply.choices]

        choices, result, before = push_during_long_generation(bf16_target, bf16_target_client, new_weights, "continue", generate)
    assert result.version == before + 1
    for choice in choices:
        (old, k), (new, rest) = choice["token_weight_versions"]
        assert (old, new, k + rest) == (before, before + 1, MAX_TOKENS) and k >= 1
        assert (choice["first_weight_version"], choice["weight_version"]) == (before, before + 1)
        assert len(choice["token_ids"]) == len(choice["logprobs"]) == MAX_TOKENS


def test_the_servers_default_policy_is_reported(bf16_target_client):
    assert bf16_target_client.status().inflight_policy == "drain"
