"""A Ray Serve deployment (one engine replica, no Redis) with log_format json and otlp_endpoint
pointing at an OTLP receiver in this process: the ingress and the replica are processes of their
own, each exporting its spans there, so a trace that holds both shows the context crossed Ray.
The replica's log lines are read from Ray's log files of this session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rollout_service.config import ServerConfig
from tests.observability import traced

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def deployment(tiny_model, otlp_sink, tmp_path_factory):
    import ray
    from ray import serve

    from rollout_service.serve.runner import deploy, start_ray

    root = tmp_path_factory.mktemp("traced-serve")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # the deployment's processes get OTEL_* (serve/app.py)
    config = ServerConfig(
        model=tiny_model, port=0, http_port=0, max_model_len=128, replicas=1, replica_cpus=0.5,
        weights_dir=root / "weights", cache_dir=root / "cache", log_format="json", otlp_endpoint=otlp_sink.endpoint,
    )
    start_ray(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        ends = deploy(config).endpoints.remote().result()
        yield ends["grpc"], f"http://{ends['http']}", Path(ray._private.worker._global_node.get_logs_dir_path())
    finally:
        os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        serve.shutdown()
        ray.shutdown()


def test_generate_spans_cross_from_the_ingress_to_the_replica_in_one_trace(deployment, otlp_sink):
    grpc_address, http_url, _ = deployment
    traced.generate_in_callers_trace(otlp_sink, grpc_address)
    traced.refused_generate_has_its_id(grpc_address, http_url)


def test_a_push_has_a_span_per_phase_and_the_replicas_log_lines_carry_its_request_id(deployment, otlp_sink, tiny_model):
    _, http_url, logs_dir = deployment
    request_id = traced.push_in_callers_trace(otlp_sink, http_url, tiny_model)
    lines = [line for path in logs_dir.rglob("*") if path.is_file() for line in path.read_text(errors="replace").splitlines()]
    records = traced.json_lines_with(request_id, lines)
    applied = [r for r in records if r["logger"] == "rollout_service.replica" and "serves version" in r["message"]]
    assert applied, f"no replica log line with request_id {request_id} in {logs_dir}"
