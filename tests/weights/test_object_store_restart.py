"""The single-process server on a weight store in S3 (a real moto server): a committed push is in
the bucket, and a server started again on the same URL resumes at that version, bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.weights.conftest import engine_weights, perturb, start_server

pytestmark = pytest.mark.engine


@pytest.mark.slow  # two engine starts; the S3 store's resume without an engine: tests/weights/test_object_store.py
def test_a_server_restarted_on_an_s3_weight_store_resumes_at_its_committed_version(request, tiny_model, tmp_path_factory, weights0, s3_server):
    from rollout_client import RolloutClient

    url = f"s3://{s3_server.new_bucket()}/weights"  # the servers inherit the moto server's environment
    first = start_server(request, tiny_model, tmp_path_factory, "s3-1", "--weights-dir", url)
    with RolloutClient(first.grpc_address, timeout=120) as client:
        client.push_weights(perturb(weights0, seed=21), label="step 1")
        layer1 = {k: v for k, v in perturb(weights0, seed=22).items() if ".layers.1." in k}
        assert client.push_weights(layer1, label="step 2").version == 2  # partial: overlaid on step 1
    committed = engine_weights(first)
    first.stop()

    second = start_server(request, tiny_model, tmp_path_factory, "s3-2", "--weights-dir", url)
    with RolloutClient(second.grpc_address, timeout=120) as client:
        assert client.status().weight_version == 2
        restarted = engine_weights(second)
        assert [k for k in committed if not torch.equal(committed[k], restarted[k])] == []
        assert client.push_weights(weights0, expected_version=2).version == 3
