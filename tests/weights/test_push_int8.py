"""int8 (W8A8) pushes: bf16 weights pushed into an int8 server are requantized on arrival with the
code `serve --quantization int8` uses at load, so the engine then holds bitwise what a fresh int8
server started from the same bf16 checkpoint holds."""

from __future__ import annotations

import pytest
import torch

from tests.weights.conftest import engine_weights, greedy, start_server, step

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def quant_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("int8-cache")


@pytest.fixture(scope="module")
def int8_target(request, tiny_model, tmp_path_factory, quant_cache):
    return start_server(request, tiny_model, tmp_path_factory, "int8-target", "--quantization", "int8", "--cache-dir", str(quant_cache))


@pytest.fixture(scope="module")
def int8_reference(request, model1, tmp_path_factory, quant_cache):
    """A fresh int8 server started from the bf16 checkpoint W1 (quantized at load)."""
    return start_server(request, model1, tmp_path_factory, "int8-w1", "--quantization", "int8", "--cache-dir", str(quant_cache))


def _client(server):
    from rollout_client import RolloutClient

    return RolloutClient(server.grpc_address, timeout=120)


def test_int8_push_holds_bitwise_the_weights_of_a_fresh_int8_server(int8_target, int8_reference, weights1):
    with _client(int8_target) as target, _client(int8_reference) as reference:
        before = greedy(target)
        result = target.push_weights(weights1)
        assert result.version == 1 and result.requantize_s > 0
        pushed, fresh = engine_weights(int8_target), engine_weights(int8_reference)
        # Scales, azp_adj, unquantized tensors, and each int8 layer's output on a fixed input
        # (the CPU kernel keeps its int8 weight prepacked, out of reach).
        assert pushed.keys() == fresh.keys()
        assert any(k.endswith("weight_scale") for k in pushed) and any(k.endswith("qkv_proj.probe") for k in pushed)
        assert [k for k in pushed if not torch.equal(pushed[k], fresh[k])] == []
        after = greedy(target)
        assert after == greedy(reference) and after != before


def test_int8_partial_push_equals_a_full_push_of_the_merged_weights(int8_target, int8_reference, weights0, weights1):
    subset = {k: v for k, v in weights0.items() if ".layers.0.mlp.up_proj" in k or ".layers.3." in k}
    with _client(int8_target) as target, _client(int8_reference) as reference:
        target.push_weights(weights1)
        target.push_weights(subset)
        reference.push_weights({**weights1, **subset})
        assert greedy(target) == greedy(reference)
        pushed, merged = engine_weights(int8_target), engine_weights(int8_reference)
        assert [k for k in pushed if not torch.equal(pushed[k], merged[k])] == []
        reference.push_weights(weights1)


def test_an_int8_delta_push_holds_bitwise_what_a_push_of_the_whole_tensors_holds(int8_target, weights1):
    """The server rebuilds each delta tensor whole before it requantizes, so the int8 weights,
    scales and outputs are those of the whole push of the same bf16 weights. (The delta push goes
    through shared memory, the default on one host; the whole one is streamed.)"""
    w2 = step(weights1, seed=5)
    with _client(int8_target) as trainer:
        trainer.push_weights(weights1, delta=True)
        result = trainer.push_weights(w2, delta=True)
        assert result.delta_tensors == len(w2) and result.bytes_received < 0.2 * result.dense_bytes
        assert result.shared_bytes == result.bytes_received
        by_delta, outputs = engine_weights(int8_target), greedy(trainer)
        trainer.push_weights(weights1, shared_memory=False, delta=False)
        trainer.push_weights(w2, shared_memory=False, delta=False)
        whole = engine_weights(int8_target)
        assert [k for k in whole if not torch.equal(whole[k], by_delta[k])] == [] and greedy(trainer) == outputs
