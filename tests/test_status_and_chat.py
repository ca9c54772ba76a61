"""`rollout-service status` and `chat` against a real server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.engine
CLI = [sys.executable, "-m", "rollout_service.cli"]


def test_status_reports_version_replicas_last_push_and_throughput(trainer_server, tiny_model):
    from safetensors.torch import load_file

    from rollout_client import RolloutClient

    with RolloutClient(trainer_server.grpc_address, timeout=120) as client:
        pushed = client.push_weights(load_file(tiny_model / "model.safetensors"), label="status check", progress=False)
    out = subprocess.run([*CLI, "status", "-a", trainer_server.grpc_address, "--interval", "0.2", "--json"],
                         capture_output=True, text=True, timeout=120, check=True)
    data = json.loads(out.stdout)
    assert int(data["weight_version"]) == int(data["committed_version"]) == pushed.version and data["replicas"] == 1
    assert {k: int(v) for k, v in data["replica_versions"].items()} == {"local": pushed.version}
    assert data["last_push"]["label"] == "status check" and data["tokens_per_s"] >= 0
    table = subprocess.run([*CLI, "status", "-a", trainer_server.grpc_address, "--interval", "0.2"],
                           capture_output=True, text=True, timeout=120, check=True).stdout
    assert f"v{pushed.version} 'status check'" in table and "tokens/s" in table


def test_status_of_an_unreachable_address_is_a_clear_error():
    out = subprocess.run([*CLI, "status", "-a", "127.0.0.1:1", "--interval", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "127.0.0.1:1" in out.stderr and "UNAVAILABLE" in out.stderr


def test_chat_answers_each_line_with_the_served_version(trainer_server):
    out = subprocess.run([*CLI, "chat", "-a", trainer_server.grpc_address, "--max-tokens", "5", "--temperature", "0"],
                         input="The trainer computes\nA weight push\n\n", capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.count("5 tokens, mean logprob") == 2 and "version" in out.stdout
