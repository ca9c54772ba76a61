"""`GET /metrics` of a real server (the session's trainer_server: `--backend local`, one engine):
names and types follow Prometheus' conventions, vLLM's own metrics come labelled with the
replica, Generate calls and a push move their counters, and every metric the Grafana dashboard
and the alert rules (deploy/) query is in the scrape. The Ray Serve deployment's scrape (two
replicas) is checked in tests/serve/test_cluster.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import promql_parser
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from rollout_client import RolloutClient
from safetensors.torch import load_file

pytestmark = pytest.mark.engine

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
VLLM = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc", "vllm:num_preemptions",
        "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:generation_tokens",
        "vllm:time_to_first_token_seconds", "vllm:inter_token_latency_seconds", "vllm:request_queue_time_seconds")
def scrape(server) -> tuple[str, dict]:
    text = httpx.get(f"{server.http_url}/metrics", timeout=60).text
    return text, {f.name: f for f in text_string_to_metric_families(text)}


def total(families: dict, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(s.value for f in families.values() for s in f.samples
               if s.name == name and labels.items() <= s.labels.items())


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects, read off its syntax tree (promql-parser, the
    Rust parser Greptime ships; it refuses what Prometheus would). Grafana's $__rate_interval is
    given a value first."""
    names: set[str] = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):  # a range's too: it wraps one
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr.replace("$__rate_interval", "5m")), visit)
    return names


def queried() -> dict[str, set[str]]:
    """Every expression of the dashboard and of the alert rules -> the metric names it queries."""
    dashboard = json.loads((DEPLOY / "grafana" / "rollout-service.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    return {e: metric_names(e) for e in exprs}


def test_metric_names_are_found_in_promql():
    assert metric_names('histogram_quantile(0.99, sum by (le, replica) (rate(vllm:x_seconds_bucket{a="b(c)"}[5m])))') == {
        "vllm:x_seconds_bucket"}
    assert metric_names("a < ignoring(replica) group_left b and time() - c > 1e3") == {"a", "b", "c"}
    with pytest.raises(ValueError):  # what Prometheus would refuse
        metric_names("sum by (le (rate(a[5m]))")


def test_names_types_and_vllm_metrics_labelled_with_the_replica(trainer_server):
    text, families = scrape(trainer_server)
    declared = re.findall(r"^# TYPE (\S+)", text, re.MULTILINE)
    assert len(declared) == len(set(declared)), "a family exposed twice"
    assert "rollout_tokens_per_second" not in families
    ours = {name: f for name, f in families.items() if name.startswith("rollout_")}
    for name, f in ours.items():
        if f.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in f.samples), name
        if f.type == "histogram":
            assert name.endswith(("_seconds", "_tokens", "_bytes")), name
    replicas = {s.labels["replica"] for s in families["rollout_replica_weight_version"].samples}
    assert total(families, "rollout_replicas") == 1 and len(replicas) == 1
    for name in VLLM:
        samples = families[name].samples
        assert samples and {s.labels.get("replica") for s in samples} == replicas, name
    assert families["vllm:num_preemptions"].type == "counter"
    assert families["vllm:time_to_first_token_seconds"].type == "histogram"


def test_generate_calls_and_a_push_move_their_counters(trainer_server, tiny_model):
    _, before = scrape(trainer_server)
    with RolloutClient(trainer_server.grpc_address, timeout=120) as client:
        tokens = 0
        for _ in range(2):
            completions = client.generate(prompt_token_ids=[[5, 6, 7], [8, 9]], max_tokens=4, ignore_eos=True)
            tokens += sum(len(s.token_ids) for c in completions for s in c.samples)
        result = client.push_weights(load_file(tiny_model / "model.safetensors"), delta=False, progress=False)
    _, after = scrape(trainer_server)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert tokens == 16
    assert moved("rollout_generate_calls_total", outcome="ok") >= 2
    assert all("route" in s.labels for s in after["rollout_generate_calls"].samples)
    assert moved("rollout_generated_tokens_total", outcome="ok") >= tokens
    assert moved("rollout_generate_duration_seconds_count") >= 2
    assert moved("rollout_generate_first_sample_seconds_count") >= 2
    assert moved("rollout_sample_tokens_count") >= 4
    assert moved("vllm:generation_tokens_total") >= tokens
    assert moved("vllm:time_to_first_token_seconds_count") >= 4  # one per prompt
    assert moved("rollout_pushes_total", path="stream", outcome="ok") == 1
    assert moved("rollout_push_received_bytes_total", path="stream", outcome="ok") == result.bytes_received > 0
    assert moved("rollout_push_duration_seconds_count", path="stream", outcome="ok") == 1
    assert moved("rollout_push_pause_seconds_count", path="stream") == 1
    assert total(after, "rollout_pushes_in_flight") == 0 and total(after, "rollout_push_oldest_start_time_seconds") == 0
    assert total(after, "rollout_committed_version") == result.version
    assert [s.value for s in after["rollout_replica_weight_version"].samples] == [result.version]


def test_every_metric_the_dashboard_and_alerts_query_is_scraped(trainer_server):
    _, families = scrape(trainer_server)
    scraped = set(families) | {s.name for f in families.values() for s in f.samples}
    exprs = queried()  # each parsed: a syntax error fails here
    assert len(exprs) >= 25
    scraped.add("up")  # Prometheus' own, per scrape target
    missing = {e: names - scraped for e, names in exprs.items() if names - scraped}
    assert not missing, missing
