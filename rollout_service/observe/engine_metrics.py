"""vLLM's own Prometheus metrics of every engine replica, merged into the ingress's scrape.

vLLM v1 registers its metrics (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
`vllm:time_to_first_token_seconds`, ...) in prometheus_client's global REGISTRY of the process
that holds its AsyncLLM, i.e. the replica's (the engine core sends its stats there), and only
when stats logging is on (engine/engine.py leaves vLLM's `disable_log_stats` at False). With
PROMETHEUS_MULTIPROC_DIR set they still read this process's values from the REGISTRY.

Each replica answers `exposition()` with those families in the text format (EngineReplica
`engine_metrics`); at a scrape the ingress broadcasts it and `merged` joins the replicas' samples
under one family each, with a `replica` label. The ingress's own metrics live in a registry of
their own (observe/metrics.py), so with `--backend local`, where the replica runs in the
ingress's process, no family is exposed twice.

Merged at the ingress rather than exported through Ray's metrics agent: one scrape target on both
backends. Through Ray's agent, vLLM would have to record through `ray.util.metrics`
(vllm/v1/metrics/ray_wrappers.py) instead of prometheus_client, Prometheus would scrape every
node's metrics export port (found through Ray's service discovery file on the head), and the
single-process backend, which has no Ray, would need a second path.

vLLM unregisters the `vllm:` families of an earlier engine when an engine starts, so a process
with two engines would expose the second one's twice: each backend runs one engine per process.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "vllm:"


class Families:
    """A fixed list of metric families, as `generate_latest` takes a registry."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def exposition() -> str:
    """This process's vLLM metric families in the text format (empty before an engine started)."""
    return generate_latest(Families([f for f in REGISTRY.collect() if f.name.startswith(PREFIX)])).decode()


def merged(expositions: list[tuple[str, str]]) -> list[Metric]:
    """The families of every (replica id, exposition), each once, every sample labelled with
    its replica. An exposition that does not parse is left out: a scrape never fails for one."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(expositions):
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError:
            continue
        for family in parsed:
            into = families.setdefault(family.name, Metric(family.name, family.documentation, family.type, family.unit))
            if into.type != family.type:  # replicas of different vLLM versions mid-upgrade: the first one's kept
                continue
            into.samples += [s._replace(labels={**s.labels, "replica": replica}) for s in family.samples]
    return list(families.values())
