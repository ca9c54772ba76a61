"""Rollback against a real single-process server (real vLLM engine, --weights-dir, API keys): the
rolled-back version gives bitwise the greedy tokens and logprobs of the version it rolls back to, is
listed as a new version with the old ones still there, fences trainers as a push does, refuses a
version not kept (gRPC and HTTP) and a trainer's key, is a delta base, is reached from the CLI, and
is what the server serves after a restart. One server serves the module; the tests build on each
other in order. Without an engine: test_rollback.py; on Ray Serve: test_cluster.py."""

from __future__ import annotations

import json
import time

import grpc
import httpx
import pytest
from rollout_client import (
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    RolloutClient,
)
from rollout_client.delta import encode
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc
from safetensors.torch import load_file
from typer.testing import CliRunner

from rollout_service.cli import app
from rollout_service.weights.versions import version_name
from tests.weights.conftest import greedy, perturb, start_server
from tests.weights.test_delta_push import NAME, _delta_spec, _requests, bits

pytestmark = pytest.mark.engine

ADMIN, TRAINER = "rollback-admin-key-0123456789", "rollback-trainer-key-012345678"


@pytest.fixture(scope="module")
def weights0(tiny_model):
    return load_file(tiny_model / "model.safetensors")


@pytest.fixture(scope="module")
def server(request, tiny_model, tmp_path_factory):
    """Keeps 4 versions, so that three pushes and a rollback are all listed."""
    root = tmp_path_factory.mktemp("rollback")
    keys = root / "api-keys"
    keys.write_text(f"admin:{ADMIN}\ntrainer:{TRAINER}\n")
    server = start_server(request, tiny_model, tmp_path_factory, "rollback", "--weights-dir", str(root / "weights"),
                          "--keep-versions", "4", "--api-keys", str(keys))
    server.weights_dir, server.keys = root / "weights", keys
    return server


@pytest.fixture(scope="module")
def outputs() -> dict[int, list]:
    """Greedy outputs by the version that gave them, recorded as the tests go."""
    return {}


def client(server, key: str = ADMIN) -> RolloutClient:
    return RolloutClient(server.grpc_address, timeout=120, api_key=key)


def test_a_rollback_serves_the_first_version_bitwise_as_version_4_and_fences_a_trainer_as_a_push(server, weights0, outputs):
    layer1 = {k: v for k, v in perturb(weights0, seed=1).items() if ".layers.1." in k}
    with client(server, TRAINER) as trainer, client(server) as admin:
        outputs[0] = greedy(trainer)
        assert trainer.push_weights(layer1, label="step 1").version == 1  # the rest stays the checkpoint's
        outputs[1] = greedy(trainer)
        for step in (2, 3):  # whole: tensors v1 took from the checkpoint change too
            assert trainer.push_weights(perturb(weights0, seed=step), label=f"step {step}").version == step
        assert greedy(trainer) not in (outputs[0], outputs[1])
        with pytest.raises(PermissionDeniedError):
            trainer.rollback(1)
        result = admin.rollback(1, expected_version=3)
        assert (result.version, result.label, result.bytes_received) == (4, "rollback to v1", 0)
        assert greedy(trainer) == outputs[1]
        status = trainer.status()
        assert status.weight_version == status.committed_version == 4 and status.last_push.label == "rollback to v1"
        listed = [(v.version, v.label) for v in trainer.list_versions()]
        assert listed == [(4, "rollback to v1"), (3, "step 3"), (2, "step 2"), (1, "step 1")]
        samples = trainer.generate(prompt_token_ids=[[10, 11, 12]], max_tokens=2)[0].samples
        assert {s.weight_version for s in samples} == {4}
        with pytest.raises(FailedPreconditionError, match="expected_version: 3 is stale, the last committed version is 4"):
            trainer.push_weights(perturb(weights0, seed=5), expected_version=3)  # the trainer's last push made 3
        assert trainer.status().committed_version == 4
        assert trainer.push_weights(perturb(weights0, seed=5), expected_version=4, label="step 5").version == 5


def test_a_version_not_kept_or_a_trainers_key_is_refused_over_grpc_and_http_and_nothing_is_committed(server):
    with client(server) as admin:
        with pytest.raises(NotFoundError, match="to_version: version 1 is not kept by the weight store; it keeps 5, 4, 3, 2"):
            admin.rollback(1)  # fell out of the window of 4
        with pytest.raises(FailedPreconditionError, match="expected_version: 4 is stale"):
            admin.rollback(2, expected_version=4)
        url = f"{server.http_url}/v1/weights:rollback"
        as_trainer = httpx.post(url, params={"to_version": 2}, headers={"authorization": f"Bearer {TRAINER}"}, timeout=60)
        assert as_trainer.status_code == 403, as_trainer.text
        missing = httpx.post(url, params={"to_version": 99}, headers={"authorization": f"Bearer {ADMIN}"}, timeout=60)
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "NOT_FOUND"
        assert "version 99 is not kept by the weight store; it keeps 5, 4, 3, 2" in missing.json()["error"]["message"]
        assert admin.status().committed_version == 5
    assert not list(server.weights_dir.glob(f"{version_name(6)}*"))


def test_a_delta_push_against_the_rolled_back_version_rebuilds_on_its_weights(server, weights0):
    """Version 4 holds the checkpoint's value of NAME again (version 1 did not push layer 0): a
    delta against it is checked against that value (DeltaSpec.base_crc32) and commits."""
    base = bits(weights0[NAME])
    new = base.copy()
    new[::5] += 1
    payload, changed = encode(base, new)
    requests = _requests(_delta_spec(NAME, base, new, payload, changed), payload, base_version=4)
    with grpc.insecure_channel(server.grpc_address) as channel:
        reply = pb_grpc.RolloutServiceStub(channel).PushWeights(iter(requests), timeout=120, metadata=(("authorization", f"Bearer {TRAINER}"),))
    assert reply.version == 6 and reply.delta_tensors == 1 and reply.bytes_received < reply.dense_bytes


def test_the_cli_lists_the_kept_versions_and_rolls_back_to_a_rollback(server, outputs):
    runner = CliRunner()
    listed = runner.invoke(app, ["versions", "--address", server.grpc_address, "--json", "--api-key", ADMIN])
    assert listed.exit_code == 0, listed.output
    versions = json.loads(listed.stdout)
    assert [(v["version"], v["label"]) for v in versions] == [(6, ""), (5, "step 5"), (4, "rollback to v1"), (3, "step 3")]
    assert all(time.time() - 600 < v["committed_at"] <= time.time() and v["tensors"] > 0 for v in versions)
    table = runner.invoke(app, ["versions", "-a", server.grpc_address, "--api-key", ADMIN])
    assert table.exit_code == 0 and "rollback to v1" in table.stdout and "step 5" in table.stdout
    done = runner.invoke(app, ["rollback", "--to", "4", "-a", server.grpc_address, "--expected-version", "6", "--api-key", ADMIN])
    assert done.exit_code == 0, done.output
    assert "version 7 ('rollback to v4') serves the weights of version 4" in done.stdout
    refused = runner.invoke(app, ["rollback", "--to", "2", "-a", server.grpc_address, "--api-key", ADMIN])
    assert refused.exit_code == 1 and "version 2 is not kept by the weight store; it keeps 7, 6, 5, 4" in refused.output
    with client(server) as admin:
        assert admin.status().committed_version == 7 and greedy(admin) == outputs[1]  # version 4 is version 1's weights


@pytest.mark.slow  # a second engine start (about a minute): make test-all
def test_after_a_restart_the_server_serves_the_rolled_back_version(request, server, tiny_model, tmp_path_factory, outputs):
    server.stop()
    again = start_server(request, tiny_model, tmp_path_factory, "rollback-again", "--weights-dir", str(server.weights_dir),
                         "--keep-versions", "4", "--api-keys", str(server.keys))
    with client(again) as admin:
        status = admin.status()
        assert status.weight_version == status.committed_version == 7
        assert greedy(admin) == outputs[1]
