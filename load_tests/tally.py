"""What a load run counts, and the summary made of it: calls by (request type, name) with their
latencies, failures and tokens; the weight versions committed and those that samples carried.

Plain Python (no locust, no gevent), so tests can check it in their own process.
"""

from __future__ import annotations

from collections import Counter, defaultdict

PUSH = "PushWeights"  # the push's request name; its response_length is bytes, not tokens


def percentile(values: list[float], p: float) -> float:
    """The value below which a fraction `p` of `values` lie (nearest rank); NaN when empty."""
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))], 1) if ordered else float("nan")


class Tally:
    def __init__(self) -> None:
        self.initial_version: int | None = None
        self.committed: set[int] = set()
        self.samples = 0
        self.seen: Counter[int] = Counter()  # weight version -> samples with a token of it
        self.latency_ms: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.failures: Counter[tuple[str, str]] = Counter()
        self.tokens: Counter[tuple[str, str]] = Counter()
        self.requests = 0

    def start(self, version: int) -> None:
        """The version served when the run starts: committed before it."""
        self.initial_version = version
        self.committed.add(version)

    def commit(self, version: int) -> None:
        """A version a push reply returned."""
        self.committed.add(version)

    def add_samples(self, versions: list[set[int]]) -> None:
        """Each returned sample's weight versions (of its first and of its last token)."""
        self.samples += len(versions)
        for v in versions:
            self.seen.update(v)

    def add_request(self, request_type: str, name: str, ms: float, size: int, failed: bool) -> None:
        key = (request_type, name)
        self.latency_ms[key].append(ms)
        self.tokens[key] += 0 if name == PUSH else size
        self.failures[key] += failed
        self.requests += 1

    def uncommitted(self) -> list[int]:
        """Versions that samples carried but no push (nor the start) committed: must be empty."""
        return sorted(set(self.seen) - self.committed)

    def _stats(self, keys: list[tuple[str, str]], seconds: float) -> dict:
        latencies = [ms for k in keys for ms in self.latency_ms[k]]
        tokens = sum(self.tokens[k] for k in keys)
        return {
            "requests": len(latencies), "failures": sum(self.failures[k] for k in keys),
            "p50_ms": percentile(latencies, 0.5), "p99_ms": percentile(latencies, 0.99),
            "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
        }

    def summary(self, seconds: float, push_every: float) -> dict:
        """Everything as one JSON-ready dict; latencies in ms, per request type and per call."""
        seconds = max(seconds, 1e-9)
        keys = sorted(self.latency_ms)
        uncommitted = self.uncommitted()
        total = self._stats(keys, seconds)
        return {
            "ok": not uncommitted and not total["failures"],
            "seconds": round(seconds, 1),
            **{k: total[k] for k in ("requests", "failures", "tokens", "tokens_per_s")},
            "by_type": {t: self._stats([k for k in keys if k[0] == t], seconds) for t in sorted({k[0] for k in keys})},
            "by_name": {f"{t} {n}": self._stats([(t, n)], seconds) for t, n in keys},
            "pushes": {
                "count": sum(len(v) for (_, n), v in self.latency_ms.items() if n == PUSH),
                "failures": sum(f for (_, n), f in self.failures.items() if n == PUSH),
                "every_s": push_every,
            },
            "initial_version": self.initial_version,
            "committed_versions": sorted(self.committed),
            "samples": self.samples,
            "versions_seen": {str(v): n for v, n in sorted(self.seen.items())},
            "uncommitted_versions_seen": uncommitted,
        }
