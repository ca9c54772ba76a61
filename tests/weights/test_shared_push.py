"""Same-host pushes through shared memory, on real servers: the default on one host, served
bitwise as the streamed push of the same tensors; nothing left in shared memory after a push
that commits or fails; a file that is not the client's refused with nothing changed; and a server
without shared memory streamed to, or refused when the caller requires it."""

from __future__ import annotations

import os
import zlib

import grpc
import pytest
import torch
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

from rollout_client import RolloutClient
from rollout_client.errors import FailedPreconditionError
from tests.weights.conftest import engine_weights, greedy, step

pytestmark = pytest.mark.engine


def _left_in(client: RolloutClient) -> list[str]:
    return sorted(os.listdir(client.status().shared_memory.dir))


def test_a_push_through_shared_memory_serves_bitwise_what_a_streamed_push_serves(bf16_target, bf16_target_client, weights0, weights1):
    streamed = bf16_target_client.push_weights(weights1, shared_memory=False, delta=False)
    assert streamed.shared_bytes == 0 and streamed.bytes_received == streamed.dense_bytes
    by_stream, outputs = engine_weights(bf16_target), greedy(bf16_target_client)
    bf16_target_client.push_weights(weights0, shared_memory=False, delta=False)
    handed = bf16_target_client.push_weights(weights1)  # the default on one host
    assert handed.shared_bytes == handed.bytes_received == handed.dense_bytes == streamed.dense_bytes
    assert "through shared memory" in str(handed)
    by_shared = engine_weights(bf16_target)
    assert [k for k in by_stream if not torch.equal(by_stream[k], by_shared[k])] == []
    assert greedy(bf16_target_client) == outputs
    assert _left_in(bf16_target_client) == ["token"]  # every file taken and deleted


def test_delta_pushes_go_through_shared_memory_too(bf16_target, bf16_target_client, weights1):
    w2 = step(weights1, seed=11)
    with RolloutClient(bf16_target.grpc_address, timeout=120) as trainer:
        trainer.push_weights(weights1, delta=True)
        result = trainer.push_weights(w2, delta=True)
        assert result.delta_tensors == len(w2) and result.shared_bytes == result.bytes_received < 0.2 * result.dense_bytes
        outputs = greedy(trainer)
    bf16_target_client.push_weights(w2, shared_memory=False, delta=False)
    assert greedy(bf16_target_client) == outputs and _left_in(bf16_target_client) == ["token"]


def test_a_failed_shared_push_changes_nothing_and_leaves_no_file(bf16_target_client, weights0):
    version = bf16_target_client.status().weight_version
    with pytest.raises(FailedPreconditionError, match="is stale"):
        bf16_target_client.push_weights(weights0, expected_version=version + 5, bucket_bytes=1 << 16)

    def failing():
        for i, item in enumerate(weights0.items()):
            if i == 10:
                raise RuntimeError("the trainer's gather failed")
            yield item

    with pytest.raises(RuntimeError, match="gather failed"):
        bf16_target_client.push_weights(failing(), bucket_bytes=1 << 16)
    assert bf16_target_client.status().weight_version == version and _left_in(bf16_target_client) == ["token"]


def _raw_push(address: str, spec: pb.TensorSpec) -> grpc.RpcError:
    channel = grpc.insecure_channel(address)
    messages = [pb.PushWeightsRequest(header=pb.PushHeader(tensors=[spec])), pb.PushWeightsRequest(commit=pb.PushCommit())]
    with pytest.raises(grpc.RpcError) as refused:
        pb_grpc.RolloutServiceStub(channel).PushWeights(iter(messages), timeout=60)
    channel.close()
    return refused.value


def _norm_spec(weights0, **shared) -> pb.TensorSpec:
    norm = weights0["model.norm.weight"]
    data = norm.contiguous().view(torch.uint8).numpy()
    return pb.TensorSpec(name="model.norm.weight", dtype="bfloat16", shape=list(norm.shape), nbytes=data.size,
                         crc32=zlib.crc32(data), shared=pb.SharedBytes(**shared))


@pytest.mark.parametrize(
    "shared, problem",
    [
        (dict(file="missing.bin"), "tensors[0].shared.file: 'missing.bin' is not in the server's shared-memory directory"),
        (dict(file="../../etc/passwd"), "tensors[0].shared.file: '../../etc/passwd' is not a file name the client may have written"),
        (dict(file="token"), "tensors[0].shared.file: 'token' is not a file name"),
        (dict(file="short.bin"), "tensors[0].shared.offset: 'short.bin' holds 16 bytes"),
    ],
)
def test_shared_bytes_that_are_not_the_clients_file_are_refused_and_change_nothing(bf16_target, bf16_target_client, weights0, shared, problem):
    before = bf16_target_client.status().weight_version
    directory = bf16_target_client.status().shared_memory.dir
    with open(os.path.join(directory, "short.bin"), "wb") as f:
        f.write(b"x" * 16)
    try:
        refused = _raw_push(bf16_target.grpc_address, _norm_spec(weights0, **shared))
    finally:
        if os.path.exists(os.path.join(directory, "short.bin")):
            os.unlink(os.path.join(directory, "short.bin"))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT and problem in refused.details()
    assert bf16_target_client.status().weight_version == before and _left_in(bf16_target_client) == ["token"]


def test_a_server_without_shared_memory_is_streamed_to_or_refused_when_it_is_required(trainer_server, weights0):
    """trainer_server runs with --no-shared-memory (tests/conftest.py)."""
    with RolloutClient(trainer_server.grpc_address, timeout=120) as client:
        assert not client.status().HasField("shared_memory")
        with pytest.raises(ValueError, match="the server takes no tensors in shared memory"):
            client.push_weights(weights0, shared_memory=True)
        assert client.push_weights(weights0).shared_bytes == 0
    refused = _raw_push(trainer_server.grpc_address, _norm_spec(weights0, file="push-1.bin"))
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tensors[0].shared: this server takes no tensors in shared memory" in refused.details()


def test_a_client_that_does_not_see_the_servers_directory_streams(bf16_target, weights0, monkeypatch):
    """As a client on another host, or in a container with its own /dev/shm, finds it."""
    from rollout_client import shared

    monkeypatch.setattr(shared, "can_share_memory_with", lambda info: False)  # test double: this process "elsewhere"
    with RolloutClient(bf16_target.grpc_address, timeout=120) as client:
        with pytest.raises(ValueError, match="does not see the server's shared-memory directory /dev/shm/rollout-service-"):
            client.push_weights(weights0, shared_memory=True)
        asked = []
        real_status = client.status
        monkeypatch.setattr(client, "status", lambda timeout=None: asked.append(1) or real_status(timeout))
        assert client.push_weights(weights0).shared_bytes == 0
        assert client.push_weights(weights0).shared_bytes == 0
        assert asked == []  # read once (above): a client on another host does not ask before every push
