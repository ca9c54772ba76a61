"""The Serve ingress and the weight store's commit: a push whose commit raised after its commit
point stands (unit test of serve/push.py over test doubles of the replicas, as in
test_cluster_push.py), and the ingress of a real deployment SIGKILLed at each step of a commit by
a fault point (rollout_service/faults.py), restarted by Serve on the same store: it resumes N or
N+1 as the step says, every CRC-32 verified, with the outputs that version gave before."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rollout_service import faults
from tests.observe import wait_until
from tests.serve.test_cluster_push import ReplicasDoubleForPushTest, commit, deployment, receive  # noqa: F401
from tests.weights.conftest import greedy, perturb


async def test_a_serve_push_whose_commit_raised_after_the_commit_point_stands(deployment, monkeypatch, caplog):  # noqa: F811
    """The ingress discards a push (and tells the replicas to drop it) only if the store does not
    hold it: a commit that raised once CURRENT named the version leaves it committed and applied."""
    ingress = deployment.ingresses[0]
    real_commit = ingress.store.commit

    def raises_after_committing(*args):  # test double of a store whose commit fails late
        real_commit(*args)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ingress.store, "commit", raises_after_committing)
    with caplog.at_level(logging.ERROR):
        result = await commit(ingress, *await receive(ingress, 1.0))
    assert result.version == 1 and deployment.store.current_version() == 1
    deployment.store.verify(deployment.store.current())  # its shards were not deleted
    assert [m for m, _ in deployment.replicas.calls] == ["take", "prepare", "apply"]  # no abort
    assert "version 1 is committed, though its commit raised afterwards" in caplog.text


# ---- a real deployment ----------------------------------------------------------------------


def ingress_pid() -> int | None:
    import psutil

    found = [p.pid for p in psutil.process_iter(["cmdline"]) if "ServeReplica:rollout:Ingress" in " ".join(p.info["cmdline"] or [])]
    return found[0] if len(found) == 1 else None


@pytest.fixture(scope="module")
def crash_cluster(tiny_model, tmp_path_factory):
    """One engine replica behind the ingress, on a weight store keeping 2 versions; the ingress
    reads its fault point from `fault`. The push lock is the ingress's own (no Redis): a killed
    ingress takes it along, so the next push need not wait for it to lapse."""
    import ray
    from ray import serve

    from rollout_service.config import ServerConfig
    from rollout_service.serve.runner import deploy, start_ray

    root = tmp_path_factory.mktemp("serve-crash")
    fault = root / "fault"
    os.environ[faults.ENV] = str(fault)  # before Ray starts: its processes inherit it too
    config = ServerConfig(
        model=tiny_model, port=0, http_port=None, max_model_len=128, replicas=1, replica_cpus=0.5,
        weights_dir=root / "weights", cache_dir=root / "cache", keep_versions=2,
    )
    try:
        start_ray(num_cpus=2, include_dashboard=False, logging_level="WARNING")
        deploy(config)
        yield config, fault
    finally:
        serve.shutdown()
        ray.shutdown()
        del os.environ[faults.ENV]


@pytest.fixture(scope="module")
def base_weights(tiny_model):
    from safetensors.torch import load_file

    return load_file(tiny_model / "model.safetensors")


def grpc_address() -> str:
    from ray import serve

    from rollout_service.serve.app import APP_NAME

    return serve.get_app_handle(APP_NAME).endpoints.remote().result(timeout_s=120)["grpc"]


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.reliability("fault")
def test_the_ingress_killed_at_each_step_of_a_commit_comes_back_on_n_or_n_plus_1(crash_cluster, base_weights, record_property):
    """SIGKILL the ingress after a push's shards are adopted, after its manifest, after CURRENT
    names it, and between deletions of old versions: Serve restarts it, the deployment serves N
    (the first two) or N+1 (the last two) with the outputs those weights gave before, the store
    verifies whole, and nothing of an uncommitted push is left once the ingress has cleaned."""
    from rollout_client import RolloutClient

    from rollout_service.cli import app

    config, fault = crash_cluster
    store = Path(config.weights_dir)
    a, b = perturb(base_weights, 21), perturb(base_weights, 22)
    with RolloutClient(grpc_address(), timeout=300) as client:
        client.push_weights(a, progress=False)
        outputs = {"a": greedy(client)}
        client.push_weights(b, progress=False)
        outputs["b"] = greedy(client)
    assert outputs["a"] != outputs["b"]
    served = "b"
    steps = [("store.commit.after_adopt", 0), ("store.commit.after_manifest", 0), ("store.commit.after_current", 1), ("store.collect", 1)]
    for point, lands in steps:
        before = int((store / "CURRENT").read_text())
        pushed = "a" if served == "b" else "b"
        pid = ingress_pid()
        faults.arm(fault, point)
        with RolloutClient(grpc_address(), timeout=300) as client, pytest.raises(Exception):
            client.push_weights(a if pushed == "a" else b, progress=False)
        killed = time.monotonic()
        assert not fault.exists(), f"the ingress did not reach {point}"
        wait_until(lambda: ingress_pid() not in (None, pid), "Serve to restart the ingress", timeout=300)
        expected = before + lands
        served = pushed if lands else served
        with RolloutClient(grpc_address(), timeout=300) as client:
            # A replica that had prepared the push applies it once the commit has been seen for
            # serve/replica.py ORPHANED_S (10 s); one that had not catches up from the store.
            wait_until(lambda: (client.status().committed_version, client.status().weight_version) == (expected, expected),
                       f"the deployment to serve version {expected}", timeout=400)
            assert greedy(client) == outputs[served]
        wait_until(lambda: not any((store / "incoming").iterdir()) and not list(store.glob(f"v{expected + 1:06d}*")),
                   "the restarted ingress to drop the cut-off push", timeout=120)
        verified = CliRunner().invoke(app, ["store", "verify", str(store)], catch_exceptions=False)
        assert verified.exit_code == 0, verified.output
        outcome = "N+1" if lands else "N"
        record_property(point, f"resumed {outcome} ({expected}) after {time.monotonic() - killed:.0f} s, outputs equal, every CRC-32 verified")
    record_property("data lost", "none")
