"""Prometheus metrics of a rollout service (`GET /metrics`), the same for both backends.

`Metered` wraps the backend (serve/backend.py) and counts what passes through it: Generate calls
and their tokens by route (observe/calls.py) and outcome, their latency, time to first sample and
tokens per sample; pushes by path and outcome, their bytes, duration and pause, and those in
flight. Every other call reaches the backend as it is. At a scrape it asks the backend for the
deployment's state (replicas serving, the committed version, the version each replica serves)
and for the engine metrics of every replica (observe/engine_metrics.py). The scrape never fails: a
replica that fails to answer is left out, and when some replica has not answered within
SCRAPE_TIMEOUT_S (its event loop stuck: Serve's health check replaces it) that scrape leaves out
what it was asking for rather than report it wrong (no `rollout_replicas 0` while others serve),
and counts `rollout_scrape_timeouts_total`.

Conventions (Prometheus'): counters end in `_total`, durations are `_seconds` histograms, sizes in
bytes; no gauge holds what `rate()` of a counter gives. A call's tokens are counted when it ends,
with its outcome; vLLM's `vllm:generation_tokens_total` counts them as they are sampled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from starlette.requests import ClientDisconnect

from rollout_service.errors import http_status
from rollout_service.observe import calls, engine_metrics
from rollout_service.types import Completion, GenerateRequest, PushResult, ServerStatus
from rollout_service.weights.manifest import HeaderReader

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
SCRAPE_TIMEOUT_S = 5.0
# How a call or a push ended: the caller went away, its deadline passed, the server was full, the
# request was refused (the caller's mistake: any other 4xx), or the server failed (5xx).
OUTCOMES = ("ok", "cancelled", "deadline_exceeded", "overloaded", "refused", "error")
# How a push's bytes came (weights/session.py PushSession.path); "rollback": a kept version made
# current again (serve/rollback.py), which holds the push lock as a push does; "unknown": it failed
# before its header was read (another push held the lock, the coordinator was down).
PUSH_PATHS = ("stream", "shared_memory", "delta", "load", "rollback", "unknown")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
PUSH_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
PAUSE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
TOKEN_BUCKETS = tuple(2**i for i in range(2, 16))


def outcome(exc: BaseException | None) -> str:
    """One of OUTCOMES for a call that raised `exc` (None: it succeeded)."""
    if exc is None:
        return "ok"
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit, ClientDisconnect)):
        return "cancelled"
    status = http_status(exc)
    named = {499: "cancelled", 504: "deadline_exceeded", 429: "overloaded"}
    return named.get(status, "refused" if status < 500 else "error")


class Metered:
    def __init__(self, backend):
        self.backend = backend
        self.config = backend.config
        self.registry = r = CollectorRegistry()
        self.calls = Counter("rollout_generate_calls", "Generate calls ended, by route and outcome.",
                             ["route", "outcome"], registry=r)
        self.tokens = Counter("rollout_generated_tokens", "Tokens sampled for Generate calls, counted as each call ends, "
                              "by route and outcome.", ["route", "outcome"], registry=r)
        self.inflight = Gauge("rollout_generate_calls_in_flight", "Generate calls being served.", registry=r)
        self.latency = Histogram("rollout_generate_duration_seconds", "Duration of Generate calls that succeeded, by route.",
                                 ["route"], registry=r, buckets=LATENCY_BUCKETS)
        self.first_sample = Histogram("rollout_generate_first_sample_seconds", "Time from a Generate call's start to its "
                                      "first completion (streamed: first piece), by route.", ["route"], registry=r,
                                      buckets=LATENCY_BUCKETS)
        self.sample_tokens = Histogram("rollout_sample_tokens", "Tokens of each finished sample.", registry=r,
                                       buckets=TOKEN_BUCKETS)
        self.pushes = Counter("rollout_pushes", "Weight pushes ended (LoadWeights included), by path and outcome.",
                              ["path", "outcome"], registry=r)
        self.push_bytes = Counter("rollout_push_received_bytes", "Bytes received by pushes (read, for LoadWeights), "
                                  "by path and outcome.", ["path", "outcome"], registry=r)
        self.push_seconds = Histogram("rollout_push_duration_seconds", "Duration of pushes, from the call to applied "
                                      "or failed, by path and outcome.", ["path", "outcome"], registry=r,
                                      buckets=PUSH_BUCKETS)
        self.push_pause = Histogram("rollout_push_pause_seconds", "Time generation was paused to apply a committed push "
                                    "(the longest over the replicas), by path.", ["path"], registry=r, buckets=PAUSE_BUCKETS)
        self.scrape_timeouts = Counter(
            "rollout_scrape_timeouts", "Scrapes that left the deployment's state or the engines' metrics out: "
            f"some replica did not answer within {SCRAPE_TIMEOUT_S:.0f} s.", registry=r,
        )
        self.pushes_inflight = Gauge("rollout_pushes_in_flight", "Pushes being received or applied.", registry=r)
        self._push_starts: list[float] = []
        Gauge("rollout_push_oldest_start_time_seconds", "Unix time the oldest push in flight started; 0 while none runs.",
              registry=r).set_function(lambda: min(self._push_starts, default=0.0))
        for path in PUSH_PATHS:  # present from the start, so increase() sees a push's first failure
            for end in OUTCOMES:
                self.pushes.labels(path, end)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Completion]:
        call = calls.current()
        route = call.route if call is not None else "other"
        start = time.monotonic()
        tokens, first, exc = 0, True, None
        pieces: dict[tuple[int, int], int] = {}  # a streamed sample's tokens so far
        self.inflight.inc()
        try:
            async with contextlib.aclosing(self.backend.generate(req)) as stream:
                async for c in stream:
                    if first:
                        self.first_sample.labels(route).observe(time.monotonic() - start)
                        first = False
                    tokens += self._count_samples(c, pieces)
                    yield c
            self.latency.labels(route).observe(time.monotonic() - start)
        except BaseException as e:
            exc = e
            raise
        finally:
            self.inflight.dec()
            self.calls.labels(route, outcome(exc)).inc()
            self.tokens.labels(route, outcome(exc)).inc(tokens)

    def _count_samples(self, c: Completion, pieces: dict[tuple[int, int], int]) -> int:
        """Tokens in `c`; observes the samples it finishes."""
        n = 0
        for s in c.samples:
            n += len(s.token_ids)
            key = (c.prompt_index, s.index)
            so_far = pieces.pop(key, 0) + len(s.token_ids)
            if s.finish_reason is None:
                pieces[key] = so_far
            else:
                self.sample_tokens.observe(so_far)
        return n

    @contextlib.asynccontextmanager
    async def begin_push(self, read_header: HeaderReader) -> AsyncIterator:
        async with self._pushing() as ended:
            async with self.backend.begin_push(read_header) as session:
                ended.session = session
                yield session

    async def rollback(self, to_version: int, expected_version: int | None) -> PushResult:
        async with self._pushing() as ended:
            ended.path = "rollback"
            return await self.backend.rollback(to_version, expected_version)

    @contextlib.asynccontextmanager
    async def _pushing(self) -> AsyncIterator[_Push]:
        """One push or rollback: in flight (and the oldest's start) while it runs, then counted by
        path and outcome with its bytes and duration."""
        ended = _Push(time.time(), time.monotonic())
        self._push_starts.append(ended.started)
        self.pushes_inflight.inc()
        try:
            yield ended
        except BaseException as exc:
            ended.exc = exc
            raise
        finally:
            self._push_starts.remove(ended.started)
            self.pushes_inflight.dec()
            session = ended.session
            path = session.path if session is not None else ended.path
            # A committed version stands even when something after its commit point raised.
            end = "ok" if session is not None and session.committed else outcome(ended.exc)
            self.pushes.labels(path, end).inc()
            self.push_bytes.labels(path, end).inc(session.bytes_received if session is not None else 0)
            self.push_seconds.labels(path, end).observe(time.monotonic() - ended.start)

    async def commit_push(self, session) -> PushResult:
        result = await self.backend.commit_push(session)
        self.push_pause.labels(session.path).observe(result.pause_ms / 1e3)
        return result

    def __getattr__(self, name: str):
        return getattr(self.backend, name)  # what is not counted

    async def exposition(self) -> bytes:
        """The text format for a scrape: this registry's metrics, then the deployment's state and
        the replicas' engine metrics as they are now."""
        status, engines = await asyncio.gather(_within(self.backend.status()), _within(self.backend.engine_metrics()))
        if TIMED_OUT in (status, engines):
            self.scrape_timeouts.inc()
        scraped = [] if status is TIMED_OUT else deployment_families(status)
        scraped += [] if engines is TIMED_OUT else engine_metrics.merged(engines or [])
        return generate_latest(self.registry) + generate_latest(engine_metrics.Families(scraped))


TIMED_OUT = object()  # what `_within` gives for an answer that did not come in time


async def _within(awaitable):
    """Its result; TIMED_OUT past SCRAPE_TIMEOUT_S (a replica stuck); None when it fails (no
    replica serving: EngineUnavailable)."""
    try:
        return await asyncio.wait_for(awaitable, SCRAPE_TIMEOUT_S)
    except TimeoutError:
        log.warning("a scrape left the deployment's state out: a replica did not answer within %.0f s", SCRAPE_TIMEOUT_S)
        return TIMED_OUT
    except Exception as exc:  # noqa: BLE001 -- a scrape shows what it could gather
        log.debug("a scrape left something out: %r", exc)
        return None


@dataclasses.dataclass
class _Push:
    """What `Metered._pushing` counts a push or rollback by, filled in as it goes."""

    started: float  # Unix time, for rollout_push_oldest_start_time_seconds
    start: float  # monotonic
    session: object | None = None  # the push's PushSession once its header was read
    path: str = "unknown"  # where there is no session
    exc: BaseException | None = None


def deployment_families(status: ServerStatus | None) -> list[Metric]:
    """Replicas serving, the committed version and each replica's (`status` None: none answered)."""
    replicas = GaugeMetricFamily("rollout_replicas", "Engine replicas serving (answering at this scrape).",
                                 value=status.replicas if status is not None else 0)
    if status is None:
        return [replicas]
    committed = GaugeMetricFamily("rollout_committed_version", "Weight version last committed to the weight store: "
                                  "the one every replica should serve.", value=status.committed_version)
    served = GaugeMetricFamily("rollout_replica_weight_version", "Weight version each engine replica serves.",
                               labels=["replica"])
    for replica, version in sorted(status.replica_versions.items()):
        served.add_metric([replica], version)
    return [replicas, committed, served]
