"""api/metrics.py counts what passes through any backend; the backend here is a test double."""

from __future__ import annotations

import asyncio
from array import array

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rollout_service.api.metrics import Metered
from rollout_service.types import Completion, Counters, PushResult, Sample, ServerStatus


def _sample(n: int) -> Sample:
    return Sample(token_ids=list(range(n)), text="", logprobs=[0.0] * n, finish_reason="length", weight_version=3)


class BackendDoubleForMetricsTest:
    """Yields two completions (3 + 5 tokens) per generate; a push result of 1 MB; 2 replicas."""

    config = None

    async def generate(self, req):
        for i, n in enumerate((3, 5)):
            yield Completion(prompt_index=i, prompt_token_ids=array("i", [1]), samples=[_sample(n)])

    async def status(self):
        return ServerStatus(
            model="m", quantization="none", dtype="bfloat16", weight_version=3, max_model_len=8, vocab_size=8,
            logprobs_mode="processed", lm_head_fp32=False, max_inflight_sequences=1, engine_version="x",
            uptime_s=1.0, counters=Counters(), inflight_policy="drain", replicas=2,
        )

    async def commit_push(self, session):
        return PushResult(version=4, bytes_received=1_000_000, tensors_applied=1, receive_s=0.5, requantize_s=0.1,
                          apply_s=0.05, pause_ms=60.0, drain_ms=40.0)


def scrape(metered: Metered) -> dict[str, float]:
    text = asyncio.run(metered.exposition()).decode()
    return {s.name + str(sorted(s.labels.items())): s.value for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.asyncio
async def test_generate_counts_requests_tokens_and_in_flight():
    metered = Metered(BackendDoubleForMetricsTest())
    stream = metered.generate(None)
    await anext(stream)
    assert metered.inflight._value.get() == 1
    async for _ in stream:
        pass
    assert metered.inflight._value.get() == 0
    assert metered.tokens._value.get() == 8
    assert metered.tokens_per_s._value.get() == pytest.approx(0.8)


def test_scrape_has_version_replicas_and_push_figures():
    metered = Metered(BackendDoubleForMetricsTest())
    asyncio.run(metered.commit_push(None))
    values = scrape(metered)
    assert values["rollout_weight_version[]"] == 3  # the scrape refreshes it from the backend
    assert values["rollout_replicas[]"] == 2
    assert values["rollout_push_bytes_total[]"] == 1_000_000
    assert values["rollout_pushes_total[('outcome', 'committed')]"] == 1
    assert values["rollout_push_pause_seconds_sum[]"] == pytest.approx(0.06)
    assert values["rollout_push_seconds_sum[]"] == pytest.approx(0.5 + 0.1)
