"""A real single-process server (--weights-dir) killed with SIGKILL at each step of a commit, by a
fault point (rollout_service/faults.py), and started again on the same store: it resumes the last
committed version (N) or the one being committed (N+1), exactly as the step says, every CRC-32
verified, with the same greedy outputs as that version gave before; and a store kept with
--keep-versions 2 serves on and commits with --keep-versions 4. `make test` runs the kill after
CURRENT (3 engine starts); `make reliability` also the other steps (slow: 4 more).

Two weight sets A and B are pushed in turn (each push carries every tensor), so each version's
outputs are known from when the same weights were served before."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rollout_service import faults
from rollout_service.cli import app
from tests.weights.conftest import greedy, perturb, start_server

A_SEED, B_SEED = 21, 22


def test_a_fault_point_is_inert_until_armed_and_fires_once(tmp_path):
    """Armed through the file ROLLOUT_FAULT_FILE names: the process reaching that point dies by
    SIGKILL and consumes the file, so the same process started again runs on."""
    fault = tmp_path / "fault"
    script = "from rollout_service.faults import fault_point; fault_point('x.other'); fault_point('x.armed'); print('ran on')"
    run = lambda: subprocess.run([sys.executable, "-c", script], env={**os.environ, faults.ENV: str(fault)}, capture_output=True, text=True)  # noqa: E731
    assert run().stdout == "ran on\n"  # not armed
    faults.arm(fault, "x.armed")
    died = run()
    assert died.returncode == -signal.SIGKILL and died.stdout == "" and not fault.exists()
    assert run().stdout == "ran on\n"  # one-shot


@pytest.fixture
def fault_file(tmp_path, monkeypatch) -> Path:
    """Servers started in the test read their fault point from this file."""
    path = tmp_path / "fault"
    monkeypatch.setenv(faults.ENV, str(path))
    return path


def killed_at(point: str, server, weights, fault_file: Path) -> float:
    """Arm `point` and push `weights`: the server kills itself there. Its engine, left in its
    process group, is killed too (as a crash of the machine would). Returns the time of death."""
    from rollout_client import RolloutClient

    faults.arm(fault_file, point)
    with RolloutClient(server.grpc_address, timeout=120) as client, pytest.raises(Exception):
        client.push_weights(weights, progress=False)
    assert server.proc.wait(120) == -signal.SIGKILL and not fault_file.exists(), f"the server did not die at {point}"
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.proc.pid, signal.SIGKILL)
    return time.monotonic()


def resumed(server, store: Path, version: int, outputs) -> None:
    """`server` serves `version` with `outputs`; the store verifies whole (every kept version's
    CRC-32s) and holds nothing of the push that was cut off."""
    from rollout_client import RolloutClient

    with RolloutClient(server.grpc_address, timeout=120) as client:
        status = client.status()
        assert (status.committed_version, status.weight_version) == (version, version)
        assert greedy(client) == outputs
    verified = CliRunner().invoke(app, ["store", "verify", str(store)], catch_exceptions=False)
    assert verified.exit_code == 0 and "left over" not in verified.output, verified.output
    assert not any((store / "incoming").iterdir()) and not list(store.glob(f"v{version + 1:06d}*"))


@pytest.mark.engine
@pytest.mark.slow  # 2.5 min: make test-all and make reliability (test_store_durability covers the keep without an engine)
@pytest.mark.reliability("fault")
def test_a_larger_keep_serves_on_and_a_kill_after_current_names_the_push_resumes_it(
    request, tiny_model, tmp_path_factory, weights0, fault_file, record_property
):
    """Kept with --keep-versions 2 for four pushes, restarted with 4: the server starts, serves
    version 4 and commits a fifth push. SIGKILLed once CURRENT names a sixth push (the commit
    point passed), it resumes that version N+1 with the fifth kept whole; a torn CURRENT is then
    refused at start naming the file, and `store repair` mends it."""
    from rollout_client import RolloutClient

    store = tmp_path_factory.mktemp("crash-store") / "weights"
    a, b = perturb(weights0, A_SEED), perturb(weights0, B_SEED)

    def serve(name: str, keep: int):
        return start_server(request, tiny_model, tmp_path_factory, name, "--weights-dir", str(store), "--keep-versions", str(keep))

    first = serve("keep-2", 2)
    with RolloutClient(first.grpc_address, timeout=120) as client:
        client.push_weights(a, progress=False)
        outputs = {"a": greedy(client)}
        client.push_weights(b, progress=False)
        outputs["b"] = greedy(client)
        client.push_weights(a, progress=False)
        assert client.push_weights(b, progress=False).version == 4
    assert outputs["a"] != outputs["b"]
    first.stop()

    second = serve("keep-4", 4)  # today: exits at start (v1's manifest was deleted under keep 2)
    resumed(second, store, 4, outputs["b"])
    with RolloutClient(second.grpc_address, timeout=120) as client:
        assert client.push_weights(a, progress=False).version == 5  # today: committed, then its shards deleted
        assert greedy(client) == outputs["a"]
    killed_at("store.commit.after_current", second, b, fault_file)

    started = time.monotonic()
    third = serve("after-current", 4)
    record_property("restart to serving (s)", time.monotonic() - started)
    resumed(third, store, 6, outputs["b"])  # and version 5 verifies whole beside it
    assert sorted(d.name for d in store.glob("v??????")) == ["v000003", "v000004", "v000005", "v000006"]
    record_property("--keep-versions 2 -> 4 between runs", "started on version 4, committed version 5, kept it")
    record_property("store.commit.after_current", "resumed N+1 (6), outputs equal, every CRC-32 verified")
    third.stop()

    (store / "CURRENT").write_text("")  # as a power loss leaves a CURRENT renamed before its bytes landed
    with pytest.raises(RuntimeError) as refused:
        serve("torn", 4)
    assert f"weight store {store}/CURRENT: empty is not a version number" in str(refused.value)
    assert f"rollout-service store repair {store}" in str(refused.value)
    repaired = CliRunner().invoke(app, ["store", "repair", str(store)], catch_exceptions=False)
    assert "rolled CURRENT back from torn to version 6" in repaired.output and (store / "CURRENT").read_text() == "6"
    record_property("torn CURRENT at start", "refused naming the file; store repair restored version 6")
    record_property("data lost", "none")


@pytest.mark.engine
@pytest.mark.slow
@pytest.mark.reliability("fault")
def test_a_kill_before_current_names_the_push_resumes_n_and_one_while_deleting_old_versions_n_plus_1(
    request, tiny_model, tmp_path_factory, weights0, fault_file, record_property
):
    """SIGKILLed once a push's shards are moved into the store, and once its manifest is written
    (CURRENT not renamed yet), the server resumes N; SIGKILLed between two deletions of old
    versions after a commit (--keep-versions 2), N+1, with no kept version naming a deleted shard."""
    from rollout_client import RolloutClient

    store = tmp_path_factory.mktemp("crash-store-2") / "weights"
    a, b = perturb(weights0, A_SEED), perturb(weights0, B_SEED)

    def serve(name: str):
        return start_server(request, tiny_model, tmp_path_factory, name, "--weights-dir", str(store), "--keep-versions", "2")

    first = serve("crash-1")
    with RolloutClient(first.grpc_address, timeout=120) as client:
        client.push_weights(a, progress=False)
        outputs = {"a": greedy(client)}
        client.push_weights(b, progress=False)
        outputs["b"] = greedy(client)
    killed_at("store.commit.after_adopt", first, a, fault_file)

    second = serve("after-adopt")
    resumed(second, store, 2, outputs["b"])
    record_property("store.commit.after_adopt", "resumed N (2), outputs equal, every CRC-32 verified")
    killed_at("store.commit.after_manifest", second, a, fault_file)

    third = serve("after-manifest")
    resumed(third, store, 2, outputs["b"])
    record_property("store.commit.after_manifest", "resumed N (2), outputs equal, every CRC-32 verified")
    killed_at("store.collect", third, a, fault_file)  # version 3 deletes version 1

    fourth = serve("during-collect")
    resumed(fourth, store, 3, outputs["a"])
    assert sorted(d.name for d in store.glob("v??????")) == ["v000002", "v000003"]
    record_property("store.collect (deleting old versions)", "resumed N+1 (3), outputs equal, every CRC-32 verified")
    record_property("data lost", "none")
