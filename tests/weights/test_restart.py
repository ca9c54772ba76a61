"""The single-process server keeps each committed push in its weight store (--weights-dir) and loads
the current version at start: killed in the middle of a push and started again, it serves the last
committed version, bit for bit, and the half-received push is gone."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

from tests.observe import InBackground, wait_until
from tests.weights.conftest import GREEDY, PROMPTS, engine_weights, greedy, perturb, start_server

pytestmark = pytest.mark.engine


@pytest.mark.slow  # 2 min: make reliability and make test-all (a kill after the commit point: tests/weights/test_store_crash.py)
@pytest.mark.reliability("fault")
def test_a_server_killed_mid_push_restarts_on_the_last_committed_version(request, tiny_model, tmp_path_factory, weights0, record_property):
    """SIGKILL the single-process server (and its engine) in the middle of a push, start it again
    on its --weights-dir: it serves the last committed version with bitwise the same weights and
    outputs, the half-received push is gone, and a trainer fenced on that version pushes on."""
    from rollout_client import RolloutClient

    store = tmp_path_factory.mktemp("restart-store")
    first = start_server(request, tiny_model, tmp_path_factory, "restart-1", "--weights-dir", str(store))
    with RolloutClient(first.grpc_address, timeout=120) as client:
        base = greedy(client)
        client.push_weights(perturb(weights0, seed=11), label="step 1")
        layer1 = {k: v for k, v in perturb(weights0, seed=12).items() if ".layers.1." in k}
        assert client.push_weights(layer1, label="step 2").version == 2  # partial: overlaid on step 1
        committed, committed_weights = greedy(client), engine_weights(first)
    assert committed != base

    with pytest.raises(RuntimeError, match="is in use by another running server"):
        start_server(request, tiny_model, tmp_path_factory, "restart-second", "--weights-dir", str(store))

    release = threading.Event()

    def stalls_after_three_tensors():
        for i, item in enumerate(perturb(weights0, seed=13).items()):
            if i == 3:
                release.wait(120)
            yield item

    with RolloutClient(first.grpc_address, timeout=120) as client:
        push = InBackground(lambda: client.push_weights(stalls_after_three_tensors(), chunk_bytes=4096, bucket_bytes=4096, progress=False))
        wait_until(lambda: any((store / "incoming").iterdir()), "the third push being received")
        os.killpg(first.proc.pid, signal.SIGKILL)  # the server and its engine process
        first.proc.wait()
        release.set()
        with pytest.raises(Exception):
            push.outcome()

    started = time.monotonic()
    second = start_server(request, tiny_model, tmp_path_factory, "restart-2", "--weights-dir", str(store))
    record_property("restart to serving the last committed version (s)", time.monotonic() - started)
    with RolloutClient(second.grpc_address, timeout=120) as client:
        status = client.status()
        record_property("versions committed before the kill / served after the restart", f"2 / {status.weight_version}")
        assert status.weight_version == 2 and dict(status.replica_versions) == {"local": 2}
        assert greedy(client) == committed
        assert {c.samples[0].weight_version for c in client.generate(prompt_token_ids=PROMPTS, **GREEDY)} == {2}
        restarted = engine_weights(second)
        assert [k for k in committed_weights if not torch.equal(committed_weights[k], restarted[k])] == []
        assert not any((store / "incoming").iterdir()) and not list(store.glob("v000003*"))
        assert client.push_weights(weights0, expected_version=2).version == 3  # a fenced trainer goes on
        assert greedy(client) == base
    record_property("data lost", "none")
