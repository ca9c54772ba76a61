"""The load run's bookkeeping (load_tests/tally.py), without an engine or locust."""

from __future__ import annotations

import math

from load_tests.tally import PUSH, Tally, percentile


def test_a_sample_of_a_version_nobody_committed_fails_the_run_and_is_named():
    tally = Tally()
    tally.start(3)
    tally.commit(4)
    tally.add_samples([{3}, {3, 4}, {4}])
    assert tally.uncommitted() == [] and tally.summary(1.0, 0)["ok"]
    tally.add_samples([{4, 6}])
    s = tally.summary(1.0, 0)
    assert not s["ok"] and s["uncommitted_versions_seen"] == [6] and s["committed_versions"] == [3, 4]
    assert s["samples"] == 4 and s["versions_seen"] == {"3": 2, "4": 3, "6": 1}


def test_the_summary_counts_calls_failures_tokens_and_pushes_per_type_and_per_call():
    tally = Tally()
    tally.start(0)
    for ms in range(1, 101):
        tally.add_request("grpc", "trainer", float(ms), 32, failed=False)
    tally.add_request("http", "eval", 5.0, 4, failed=True)
    tally.add_request("grpc", PUSH, 200.0, 7_000_000, failed=False)  # bytes, not tokens
    s = tally.summary(2.0, 5.0)
    assert not s["ok"] and (s["requests"], s["failures"], s["tokens"]) == (102, 1, 3204)
    assert s["tokens_per_s"] == 1602.0 and s["pushes"] == {"count": 1, "failures": 0, "every_s": 5.0}
    assert s["by_name"]["grpc trainer"]["p50_ms"] == 51.0 and s["by_name"]["grpc trainer"]["p99_ms"] == 100.0
    assert s["by_type"]["grpc"]["requests"] == 101 and s["by_type"]["http"]["failures"] == 1
    assert math.isnan(percentile([], 0.5))
