"""The three in-flight policies, each with a long generation running while a push is applied."""

from __future__ import annotations

import threading
import time

import pytest

from tests.weights.conftest import PROMPTS, perturb

pytestmark = pytest.mark.engine

LONG = dict(prompt_token_ids=PROMPTS, n=4, max_tokens=240, temperature=1.0, seed=3, ignore_eos=True)


def push_during_long_generation(client, weights, policy: str):
    """Start a long generation, push once it is running; returns (samples, push result, version before)."""
    client.generate(**{**LONG, "max_tokens": 4})  # warm: the long call below starts at once
    before = client.status().weight_version
    out: dict = {}
    worker = threading.Thread(target=lambda: out.setdefault("completions", client.generate(**LONG)))
    worker.start()
    deadline = time.monotonic() + 30
    while client.status().counters.engine_requests_running == 0:
        assert time.monotonic() < deadline, "the long generation never started"
        time.sleep(0.01)
    time.sleep(1.0)  # well into the generation (about 3-6 s in all here)
    result = client.push_weights(weights, inflight=policy)
    worker.join(120)
    samples = [s for c in out["completions"] for s in c.samples]
    return samples, result, before


@pytest.fixture(scope="module")
def new_weights(weights0):
    return perturb(weights0, seed=11)


def test_drain_finishes_running_samples_on_the_old_weights_first(bf16_target_client, new_weights):
    samples, result, before = push_during_long_generation(bf16_target_client, new_weights, "drain")
    assert result.version == before + 1
    for s in samples:
        assert s.finish_reason == "length" and len(s.token_ids) == 240
        assert s.weight_version == s.first_weight_version == before
    # The engine waited for them (the rest of the generation) before pausing for the apply.
    assert result.drain_ms > 200 and result.pause_ms < result.drain_ms


def test_abort_ends_running_samples_with_finish_reason_aborted(bf16_target_client, new_weights):
    samples, result, before = push_during_long_generation(bf16_target_client, new_weights, "abort")
    assert result.version == before + 1
    assert all(s.finish_reason == "aborted" and len(s.token_ids) < 240 for s in samples)
    assert all(s.weight_version == s.first_weight_version == before for s in samples)
    assert len(samples[0].logprobs) == len(samples[0].token_ids)
    assert bf16_target_client.status().counters.engine_requests_running == 0


def test_continue_carries_samples_across_the_flip_and_reports_both_versions(bf16_target_client, new_weights):
    samples, result, before = push_during_long_generation(bf16_target_client, new_weights, "continue")
    assert result.version == before + 1
    for s in samples:
        assert s.finish_reason == "length" and len(s.token_ids) == 240
        assert (s.first_weight_version, s.weight_version) == (before, before + 1)
    # Under continue nothing waits for the running samples.
    assert result.drain_ms < 200


def test_the_servers_default_policy_is_reported(bf16_target_client):
    assert bf16_target_client.status().inflight_policy == "drain"
