"""A call may require the version it samples with: `min_weight_version` holds it until the server
serves that version (as a rollout worker waits for the trainer's next push); the call's deadline
bounds the wait. (`max_staleness` becomes a min_weight_version as the call arrives: tests/test_types.py
and tests/serve/test_backend.py.)"""

from __future__ import annotations

import openai
import pytest
from rollout_client import DeadlineExceededError

from tests.observe import InBackground, wait_until
from tests.weights.conftest import PROMPTS, perturb

pytestmark = pytest.mark.engine

CALL = dict(prompt_token_ids=PROMPTS[:2], n=2, max_tokens=4, temperature=1.0, seed=1)


def test_a_call_requiring_the_next_version_waits_for_its_push_and_samples_only_with_it(bf16_target_client, weights0):
    client = bf16_target_client
    now = client.status().weight_version
    call = InBackground(lambda: client.generate(**CALL, min_weight_version=now + 1))
    wait_until(lambda: client.status().counters.requests_awaiting_version == 1 or call.done(), "the call to be held")
    assert not call.done(), call.outcome()
    assert client.generate(**CALL, min_weight_version=now)[0].samples[0].weight_version == now  # served: no wait
    pushed = client.push_weights(perturb(weights0, seed=21))
    assert pushed.version == now + 1
    samples = [s for c in call.outcome() for s in c.samples]
    assert len(samples) == 4 and {(s.first_weight_version, s.weight_version) for s in samples} == {(now + 1, now + 1)}
    assert client.status().counters.requests_awaiting_version == 0


def test_the_wait_ends_at_the_calls_deadline_and_leaves_nothing_behind(bf16_target, bf16_target_client):
    client = bf16_target_client
    far = client.status().weight_version + 1  # the next version: the furthest a call may wait for
    with pytest.raises(DeadlineExceededError):
        client.generate(**CALL, min_weight_version=far, timeout=2)
    with openai.OpenAI(base_url=f"{bf16_target.http_url}/v1", api_key="none", max_retries=0, timeout=60) as oai:
        model = oai.models.list().data[0].id
        with pytest.raises(openai.APIStatusError) as err:
            oai.completions.create(model=model, prompt=PROMPTS[0], max_tokens=2, extra_body={"min_weight_version": far},
                                   extra_headers={"X-Request-Timeout": "2"})
        assert err.value.status_code == 504 and err.value.body["code"] == "DEADLINE_EXCEEDED"
        with pytest.raises(openai.APIStatusError) as err:  # a stream is held the same way until its first chunk
            oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], max_tokens=2, stream=True,
                                        extra_body={"min_weight_version": far}, extra_headers={"X-Request-Timeout": "2"})
        assert err.value.status_code == 504
    wait_until(lambda: client.status().counters.requests_awaiting_version == 0, "the held calls to be gone")
    counters = client.status().counters
    assert counters.requests_running == counters.engine_requests_running == 0
