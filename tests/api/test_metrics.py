"""observe/metrics.py counts what passes through any backend, and observe/engine_metrics.py merges
the replicas' vLLM metrics into the scrape. The backend here is a test double; the replicas'
expositions are made by real prometheus_client registries, as vLLM's are. The scrape of a real
server is tested in tests/api/test_metrics_scrape.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from array import array

import pytest
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.parser import text_string_to_metric_families

from rollout_service import errors
from rollout_service.observe import calls, engine_metrics
from rollout_service.observe import metrics as observe_metrics
from rollout_service.observe.metrics import Metered, outcome
from rollout_service.types import Completion, Counters, PushResult, Sample, ServerStatus


def _sample(n: int, finish: str | None = "length", index: int = 0) -> Sample:
    return Sample(token_ids=list(range(n)), text="", logprobs=[0.0] * n, finish_reason=finish, weight_version=3, index=index)


def vllm_like(model: str, running: float, preemptions: int) -> str:
    """An exposition shaped as a vLLM engine's (its names, types and labels)."""
    r = CollectorRegistry()
    labels = ["model_name", "engine"]
    Gauge("vllm:num_requests_running", "Running.", labels, registry=r).labels(model, "0").set(running)
    Counter("vllm:num_preemptions", "Preemptions.", labels, registry=r).labels(model, "0").inc(preemptions)
    Histogram("vllm:time_to_first_token_seconds", "TTFT.", labels, registry=r, buckets=(0.1, 1)).labels(model, "0").observe(0.5)
    return generate_latest(r).decode()


class SessionDouble:
    def __init__(self, path: str, nbytes: int):
        self.path, self.bytes_received, self.committed = path, nbytes, False


class BackendDoubleForMetricsTest:
    """Generate: two completions (3 + 5 tokens), or `pieces` if set (a streamed call); a push of
    1 MB by `path`; 2 replicas at versions 3 and 4 of a committed 4; their engine metrics."""

    config = None

    def __init__(self):
        self.pieces: list[Completion] | None = None
        self.fail: BaseException | None = None
        self.path = "stream"
        self.replies: list = [("r-b", vllm_like("m", 2, 1)), ("r-a", vllm_like("m", 5, 7))]
        self.status_error: BaseException | None = None

    async def generate(self, req):
        for c in self.pieces or [Completion(i, array("i", [1]), [_sample(n)]) for i, n in enumerate((3, 5))]:
            yield c
        if self.fail is not None:
            raise self.fail

    async def status(self):
        if self.status_error is not None:
            raise self.status_error
        return ServerStatus(
            model="m", quantization="none", dtype="bfloat16", weight_version=3, max_model_len=8, vocab_size=8,
            logprobs_mode="processed", lm_head_fp32=False, max_inflight_sequences=1, engine_version="x",
            uptime_s=1.0, counters=Counters(), inflight_policy="drain", replicas=2,
            replica_versions={"r-a": 4, "r-b": 3}, committed_version=4,
        )

    async def engine_metrics(self):
        return [r for r in self.replies if isinstance(r, tuple)]

    @contextlib.asynccontextmanager
    async def begin_push(self, read_header):
        await read_header()
        yield SessionDouble(self.path, 1_000_000)

    async def rollback(self, to_version, expected_version):
        if to_version > 4:
            raise errors.NotFound(f"to_version: version {to_version} is not kept by the weight store")
        return PushResult(version=5, bytes_received=0, tensors_applied=0, receive_s=0.0, requantize_s=0.0,
                          apply_s=0.2, pause_ms=0.0, drain_ms=0.0)

    async def commit_push(self, session):
        session.committed = True
        return PushResult(version=4, bytes_received=1_000_000, tensors_applied=1, receive_s=0.5, requantize_s=0.1,
                          apply_s=0.05, pause_ms=60.0, drain_ms=40.0)


async def families(metered: Metered) -> dict:
    return {f.name: f for f in text_string_to_metric_families((await metered.exposition()).decode())}


async def values(metered: Metered) -> dict[str, float]:
    return {s.name + str(sorted(s.labels.items())): s.value for f in (await families(metered)).values() for s in f.samples}


async def drain(stream) -> None:
    async for _ in stream:
        pass


@pytest.mark.asyncio
async def test_generate_counts_calls_and_tokens_by_route_and_outcome():
    backend = BackendDoubleForMetricsTest()
    metered = Metered(backend)
    with calls.serving(calls.Call("req-1", "Generate")):
        stream = metered.generate(None)
        await anext(stream)
        assert metered.inflight._value.get() == 1
        await drain(stream)
    assert metered.inflight._value.get() == 0
    backend.fail = errors.EngineUnavailable("replica died")
    with pytest.raises(errors.EngineUnavailable):
        await drain(metered.generate(None))  # outside a call: route "other"
    assert metered.calls.labels("Generate", "ok")._value.get() == 1
    assert metered.tokens.labels("Generate", "ok")._value.get() == 8
    assert metered.calls.labels("other", "error")._value.get() == 1
    assert metered.tokens.labels("other", "error")._value.get() == 8  # sampled before it failed
    assert metered.latency.labels("Generate")._sum.get() > 0
    assert metered.latency.labels("other")._sum.get() == 0  # failed calls are not in the latency
    assert metered.first_sample.labels("other")._sum.get() > 0


@pytest.mark.asyncio
async def test_a_caller_that_stops_reading_is_cancelled_and_streamed_samples_count_whole():
    backend = BackendDoubleForMetricsTest()
    backend.pieces = [  # prompt 0's sample 1 in pieces of 2 + 3 tokens; sample 0 whole; prompt 1 never finishes
        Completion(0, array("i", [1]), [_sample(2, None, index=1), _sample(4, "stop", index=0)]),
        Completion(0, array("i", [1]), [_sample(3, "length", index=1)]),
        Completion(1, array("i", [1]), [_sample(9, None)]),
        Completion(1, array("i", [1]), [_sample(1, None)]),
    ]
    metered = Metered(backend)
    async with contextlib.aclosing(metered.generate(None)) as stream:
        for _ in range(3):
            await anext(stream)
    assert metered.calls.labels("other", "cancelled")._value.get() == 1
    assert metered.tokens.labels("other", "cancelled")._value.get() == 2 + 4 + 3 + 9
    buckets = {s.labels["le"]: s.value for s in metered.sample_tokens.collect()[0].samples if s.name.endswith("_bucket")}
    assert buckets["4.0"] == 1 and buckets["8.0"] == 2 and buckets["+Inf"] == 2  # 4 and 5 tokens; the unfinished one not


@pytest.mark.parametrize("exc, expected", [
    (None, "ok"),
    (asyncio.CancelledError(), "cancelled"),
    (errors.Cancelled("gone"), "cancelled"),
    (errors.DeadlineExceeded("late"), "deadline_exceeded"),
    (errors.Overloaded("full"), "overloaded"),
    (errors.InvalidArgument("prompts", "empty"), "refused"),
    (errors.Conflict("another push"), "refused"),
    (errors.DataLoss("crc"), "refused"),
    (errors.EngineUnavailable("dead"), "error"),
    (errors.StorageFull("disk"), "error"),
    (RuntimeError("bug"), "error"),
])
def test_outcomes_follow_the_error_table(exc, expected):
    assert outcome(exc) == expected


@pytest.mark.asyncio
async def test_pushes_count_by_path_and_outcome_with_bytes_duration_pause_and_in_flight():
    backend = BackendDoubleForMetricsTest()
    metered = Metered(backend)

    async def header():
        return None

    before = time.time()
    async with metered.begin_push(header) as session:
        assert metered.pushes_inflight._value.get() == 1
        oldest = (await values(metered))["rollout_push_oldest_start_time_seconds[]"]
        assert before <= oldest <= time.time()
        await metered.commit_push(session)
    backend.path = "shared_memory"
    with pytest.raises(errors.DataLoss):
        async with metered.begin_push(header):
            raise errors.DataLoss("tensor a: 3 bytes beyond its size")

    async def refused():
        raise errors.Conflict("another push is in progress")

    with pytest.raises(errors.Conflict):
        async with metered.begin_push(refused):
            pass
    v = await values(metered)
    assert v["rollout_pushes_in_flight[]"] == 0 and v["rollout_push_oldest_start_time_seconds[]"] == 0
    assert v["rollout_pushes_total[('outcome', 'ok'), ('path', 'stream')]"] == 1
    assert v["rollout_pushes_total[('outcome', 'refused'), ('path', 'shared_memory')]"] == 1
    assert v["rollout_pushes_total[('outcome', 'refused'), ('path', 'unknown')]"] == 1
    assert v["rollout_pushes_total[('outcome', 'error'), ('path', 'load')]"] == 0  # present before any push
    assert v["rollout_push_received_bytes_total[('outcome', 'ok'), ('path', 'stream')]"] == 1_000_000
    assert v["rollout_push_duration_seconds_count[('outcome', 'refused'), ('path', 'shared_memory')]"] == 1
    assert v["rollout_push_pause_seconds_sum[('path', 'stream')]"] == pytest.approx(0.06)


async def test_a_rollback_counts_as_a_push_by_the_rollback_path():
    metered = Metered(BackendDoubleForMetricsTest())
    assert (await metered.rollback(1, None)).version == 5
    with pytest.raises(errors.NotFound):
        await metered.rollback(9, None)
    v = await values(metered)
    assert v["rollout_pushes_total[('outcome', 'ok'), ('path', 'rollback')]"] == 1
    assert v["rollout_pushes_total[('outcome', 'refused'), ('path', 'rollback')]"] == 1
    assert v["rollout_push_duration_seconds_count[('outcome', 'ok'), ('path', 'rollback')]"] == 1
    assert v["rollout_pushes_in_flight[]"] == 0 and v["rollout_push_oldest_start_time_seconds[]"] == 0


def test_the_scrape_has_the_deployment_and_every_replicas_engine_metrics_labelled_by_replica():
    backend = BackendDoubleForMetricsTest()
    backend.replies.append(EOFError("a replica that failed to answer"))  # left out, as broadcast returns it
    f = asyncio.run(families(Metered(backend)))
    assert [s.value for s in f["rollout_replicas"].samples] == [2]
    assert [s.value for s in f["rollout_committed_version"].samples] == [4]
    assert {s.labels["replica"]: s.value for s in f["rollout_replica_weight_version"].samples} == {"r-a": 4, "r-b": 3}
    running = f["vllm:num_requests_running"]
    assert running.type == "gauge"
    assert {s.labels["replica"]: s.value for s in running.samples} == {"r-a": 5, "r-b": 2}
    assert all(s.labels["model_name"] == "m" for s in running.samples)  # vLLM's own labels kept
    preempted = {s.labels["replica"]: s.value for s in f["vllm:num_preemptions"].samples if s.name.endswith("_total")}
    assert f["vllm:num_preemptions"].type == "counter" and preempted == {"r-a": 7, "r-b": 1}
    ttft = f["vllm:time_to_first_token_seconds"]
    assert ttft.type == "histogram" and {s.labels["replica"] for s in ttft.samples} == {"r-a", "r-b"}


def test_a_scrape_never_fails_for_a_replica_that_is_down_stuck_or_garbled(monkeypatch):
    backend = BackendDoubleForMetricsTest()
    backend.status_error = errors.EngineUnavailable("no engine replica is serving yet")
    backend.replies = [("r-a", "this is { not the text format"), ("r-b", vllm_like("m", 1, 0))]
    f = asyncio.run(families(Metered(backend)))
    assert [s.value for s in f["rollout_replicas"].samples] == [0]
    assert "rollout_committed_version" not in f
    assert {s.labels["replica"] for s in f["vllm:num_requests_running"].samples} == {"r-b"}

    async def stuck():
        await asyncio.sleep(60)

    monkeypatch.setattr(observe_metrics, "SCRAPE_TIMEOUT_S", 0.2)
    backend.engine_metrics = stuck
    start = time.monotonic()
    f = asyncio.run(families(Metered(backend)))
    assert time.monotonic() - start < 5 and not any(name.startswith("vllm:") for name in f)
    assert [s.value for s in f["rollout_scrape_timeouts"].samples if s.name.endswith("_total")] == [1]

    # A replica stuck in status: the deployment's state is left out, never "no replica serving".
    backend.status_error, backend.status = None, stuck
    f = asyncio.run(families(Metered(backend)))
    assert "rollout_replicas" not in f and "rollout_replica_weight_version" not in f


def test_merging_keeps_one_family_per_name_and_the_first_type_on_a_mismatch():
    gauge = "# TYPE vllm:x gauge\nvllm:x 1.0\n"
    counter = "# TYPE vllm:x_total counter\nvllm:x_total 2.0\n"
    (family,) = engine_metrics.merged([("b", counter), ("a", gauge), ("c", gauge)])
    assert family.type == "gauge" and [(s.labels["replica"], s.value) for s in family.samples] == [("a", 1.0), ("c", 1.0)]


def test_own_metrics_follow_prometheus_conventions():
    metered = Metered(BackendDoubleForMetricsTest())
    for family in metered.registry.collect():
        assert family.name.startswith("rollout_")
        if family.type == "histogram":  # of times in seconds, or of a count named by its unit
            assert family.name.endswith(("_seconds", "_tokens", "_bytes")), family.name
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type == "gauge":
            assert "per_second" not in family.name, f"{family.name}: rate() of a counter gives it"
        assert family.documentation.endswith("."), family.name
