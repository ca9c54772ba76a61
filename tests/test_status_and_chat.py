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


def test_list_versions_names_the_kept_versions_newest_first_with_their_labels(trainer_server, tiny_model):
    """The store keeps the last keep_versions (3 here) of the pushes; the checkpoint is not listed."""
    from safetensors.torch import load_file

    from rollout_client import RolloutClient

    weights = load_file(tiny_model / "model.safetensors")
    with RolloutClient(trainer_server.grpc_address, timeout=120) as client:
        pushed = [client.push_weights(weights, label=f"list {i}", progress=False).version for i in range(4)]
        kept = client.list_versions()
    assert [v.version for v in kept] == pushed[::-1][:3]
    assert [v.label for v in kept] == ["list 3", "list 2", "list 1"]
    assert kept[0].committed_at >= kept[1].committed_at >= kept[2].committed_at > 0
    assert kept[0].tensors == len(weights) and kept[0].bytes == sum(t.numel() * t.element_size() for t in weights.values())


def test_status_of_an_unreachable_address_is_a_clear_error():
    out = subprocess.run([*CLI, "status", "-a", "127.0.0.1:1", "--interval", "0"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "127.0.0.1:1" in out.stderr and "UNAVAILABLE" in out.stderr


def test_chat_answers_each_line_with_the_served_version(trainer_server):
    out = subprocess.run([*CLI, "chat", "-a", trainer_server.grpc_address, "--max-tokens", "5", "--temperature", "0"],
                         input="The trainer computes\nA weight push\n\n", capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.count("5 tokens, mean logprob") == 2 and "version" in out.stdout
