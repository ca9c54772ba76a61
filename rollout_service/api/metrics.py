"""Prometheus metrics of a rollout service (`GET /metrics`), the same for both backends.

`Metered` wraps the backend (serve/backend.py) and counts what passes through it: requests,
generated tokens (and a tokens/s gauge over the last window), requests in flight (the queue depth
the front end sees), pushes (bytes, seconds, pause), the served version and the replica count.
Every other call reaches the backend as it is.
"""

from __future__ import annotations

import collections
import contextlib
import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from rollout_service.types import Completion, GenerateRequest, PushResult, ServerStatus

TOKENS_WINDOW_S = 10.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metered:
    def __init__(self, backend):
        self.backend = backend
        self.config = backend.config
        self.registry = r = CollectorRegistry()
        self.requests = Counter("rollout_requests", "Generate calls, by outcome.", ["outcome"], registry=r)
        self.tokens = Counter("rollout_generated_tokens", "Tokens generated.", registry=r)
        self.tokens_per_s = Gauge(
            "rollout_tokens_per_second", f"Tokens generated per second over the last {TOKENS_WINDOW_S:.0f} s.", registry=r
        )
        self.inflight = Gauge("rollout_requests_in_flight", "Generate calls being served (queue depth).", registry=r)
        self.version = Gauge("rollout_weight_version", "Weight version being served.", registry=r)
        self.replicas = Gauge("rollout_replicas", "Engine replicas serving.", registry=r)
        self.pushes = Counter("rollout_pushes", "Weight pushes, by outcome.", ["outcome"], registry=r)
        self.push_bytes = Counter("rollout_push_bytes", "Bytes received by committed pushes.", registry=r)
        self.push_seconds = Histogram(
            "rollout_push_seconds", "Receive-to-applied time of committed pushes.", registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.push_pause = Histogram(
            "rollout_push_pause_seconds", "Time generation was paused to apply a push.", registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        # (time, tokens) of the completions in the window and their sum, kept as they come and go:
        # counting runs once per completion, so it must not re-add the whole window.
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._recent_tokens = 0

    def _count_tokens(self, n: int) -> None:
        now = time.monotonic()
        self.tokens.inc(n)
        self._recent.append((now, n))
        self._recent_tokens += n
        self._refresh_rate(now)

    def _refresh_rate(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - TOKENS_WINDOW_S:
            self._recent_tokens -= self._recent.popleft()[1]
        self.tokens_per_s.set(self._recent_tokens / TOKENS_WINDOW_S)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Completion]:
        outcome = "error"
        self.inflight.inc()
        try:
            async with contextlib.aclosing(self.backend.generate(req)) as stream:
                async for c in stream:
                    self._count_tokens(sum(len(s.token_ids) for s in c.samples))
                    yield c
            outcome = "ok"
        finally:
            self.inflight.dec()
            self.requests.labels(outcome).inc()

    async def status(self) -> ServerStatus:
        result = await self.backend.status()
        self.version.set(result.weight_version)
        self.replicas.set(result.replicas)
        return result

    async def commit_push(self, session) -> PushResult:
        try:
            result = await self.backend.commit_push(session)
        except BaseException:
            self.pushes.labels("failed").inc()
            raise
        self.pushes.labels("committed").inc()
        self.push_bytes.inc(result.bytes_received)
        self.push_seconds.observe(result.receive_s + (result.drain_ms + result.pause_ms) / 1e3)
        self.push_pause.observe(result.pause_ms / 1e3)
        self.version.set(result.version)
        return result

    def __getattr__(self, name: str):
        return getattr(self.backend, name)  # what is not counted

    async def exposition(self) -> bytes:
        """The text format for a scrape; refreshes the gauges read from the backend first."""
        with contextlib.suppress(Exception):  # a scrape must not fail because one replica is down
            await self.status()
        self._refresh_rate(time.monotonic())
        return generate_latest(self.registry)
