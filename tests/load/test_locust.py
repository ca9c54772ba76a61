"""The locust load (load_tests/locustfile.py), short, against the trainer server: trainers
generating batches and pushing weights, evaluators over gRPC and HTTP; no request fails and every
sample carries a committed weight version. And the check itself: a push the run did not make
fails it. Locust runs as a subprocess: it patches its process with gevent, which must stay out of
pytest's."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rollout_client import RolloutClient
from tests.observe import wait_until

pytestmark = pytest.mark.engine
LOCUSTFILE = Path(__file__).resolve().parents[2] / "load_tests" / "locustfile.py"
NAMES = {"grpc trainer Generate 8x2", "grpc PushWeights", "grpc eval Generate 1x1", "http eval /v1/generate 1x1"}


def start_locust(server, tiny_model: Path, tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path, Path]:
    summary, log = tmp_path / "summary.json", tmp_path / "locust.log"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
        "--grpc-address", server.grpc_address, "--http-url", server.http_url,
        "--weights", str(tiny_model / "model.safetensors"), "--summary-json", str(summary), *args,
    ]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT), summary, log


@pytest.mark.reliability("load")  # listed in RELIABILITY.md (tests/reliability.py)
def test_trainers_pushing_and_evaluators_fail_no_request_and_see_only_committed_versions(
    trainer_server, tiny_model, tmp_path, record_property
):
    """20 s of locust: 2 trainers (8x2-sample batches over gRPC, a weight push every 3 s) and 2
    evaluators (1-prompt generates, gRPC and HTTP); no request fails, every push commits, and every
    sample carries a committed weight version."""
    proc, summary, log = start_locust(
        trainer_server, tiny_model, tmp_path, "-u", "4", "-r", "4", "--run-time", "20s", "--stop-timeout", "30",
        "--push-every", "3", "--max-requests", "5000",
    )
    try:  # the run (20 s), its stop timeout (30 s) and a last push answering (PUSH_JOIN_S) at most
        assert proc.wait(20 + 30 + 120 + 30) == 0, log.read_text()[-4000:]
    finally:  # never left pushing into the shared server after this test
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    s = json.loads(summary.read_text())
    assert s["ok"] and s["failures"] == 0, s
    assert set(s["by_name"]) == NAMES and all(v["requests"] > 0 for v in s["by_name"].values()), s["by_name"]
    pushes = s["pushes"]["count"]
    assert pushes >= 1 and s["pushes"]["failures"] == 0
    # each push committed a version of its own, after the one served at the start
    assert len(s["committed_versions"]) == pushes + 1 and min(s["committed_versions"]) == s["initial_version"]
    assert s["uncommitted_versions_seen"] == [] and s["samples"] > 0
    assert set(map(int, s["versions_seen"])) <= set(s["committed_versions"])
    assert max(map(int, s["versions_seen"])) > s["initial_version"], "no sample of a pushed version"
    record_property("requests (failed)", f"{s['requests']} ({s['failures']})")
    record_property("pushes", pushes)
    record_property("tokens/s", s["tokens_per_s"])
    for name in ("grpc trainer Generate 8x2", "http eval /v1/generate 1x1"):
        record_property(f"{name} p50/p99 ms", f"{s['by_name'][name]['p50_ms']:.0f}/{s['by_name'][name]['p99_ms']:.0f}")
    record_property("samples of an uncommitted version", 0)


@pytest.mark.reliability("load")
def test_a_sample_of_a_version_the_run_did_not_see_committed_fails_it(trainer_server, tiny_model, tmp_path):
    """The version check can fail: a push made behind the run's back (not by its users) gives
    samples of a version the run never saw committed, and the run exits 1 naming it."""
    proc, summary, log = start_locust(
        trainer_server, tiny_model, tmp_path, "-u", "1", "-r", "1", "--run-time", "120s", "GrpcEvaluatorUser"
    )
    try:
        wait_until(lambda: "serving version" in log.read_text() or proc.poll() is not None, "locust to start")
        assert proc.poll() is None, log.read_text()[-4000:]
        with RolloutClient(trainer_server.grpc_address, timeout=120) as client:
            version = client.push_weights(load_file(tiny_model / "model.safetensors"), label="behind locust", progress=False).version
            started = client.status().counters.requests_total
            # a call started after this one has returned to locust (one user, one call at a time)
            wait_until(lambda: client.status().counters.requests_total >= started + 2, "locust calls after the push")
        proc.send_signal(signal.SIGTERM)  # locust quits as at the end of a run: the check, then the summary
        assert proc.wait(60) == 1, log.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    s = json.loads(summary.read_text())
    assert s["uncommitted_versions_seen"] == [version] and not s["ok"] and s["failures"] == 0
    assert "never committed" in log.read_text()
