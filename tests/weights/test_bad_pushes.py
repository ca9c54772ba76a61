"""Every bad push is rejected with a precise error naming the tensor and the problem, and leaves
the served version and outputs exactly as they were."""

from __future__ import annotations

import threading
import time
import zlib

import grpc
import numpy as np
import pytest
import torch
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

from rollout_client import AbortedError
from tests.observe import wait_until
from tests.weights.conftest import engine_weights, greedy

pytestmark = pytest.mark.engine

NAME = "model.layers.0.self_attn.o_proj.weight"
SHAPE = (256, 256)


def spec(name=NAME, dtype="bfloat16", shape=SHAPE, data=None, crc=None, nbytes=None) -> pb.TensorSpec:
    data = data if data is not None else BF16
    return pb.TensorSpec(
        name=name, dtype=dtype, shape=shape, nbytes=len(data) if nbytes is None else nbytes,
        crc32=zlib.crc32(data) if crc is None else crc,
    )


def tensor_bytes(value: float = 0.01, dtype=np.float32, shape=SHAPE) -> bytes:
    """bf16 bytes (the top halves of float32) unless dtype says otherwise."""
    a = np.full(shape, value, dtype=np.float32)
    if dtype == "bfloat16":
        return (a.view(np.uint32) >> 16).astype(np.uint16).tobytes()
    return a.astype(dtype).tobytes()


BF16 = tensor_bytes(dtype="bfloat16")


def header(*specs, **kw) -> pb.PushWeightsRequest:
    return pb.PushWeightsRequest(header=pb.PushHeader(tensors=list(specs), **kw))


def chunk(index: int, offset: int, data: bytes) -> pb.PushWeightsRequest:
    return pb.PushWeightsRequest(chunk=pb.PushChunk(tensor_index=index, offset=offset, data=data))


COMMIT = pb.PushWeightsRequest(commit=pb.PushCommit())
NAN = bytearray(BF16)
NAN[1000:1002] = b"\xc0\x7f"  # bf16 NaN at element 500

CASES = {
    "unknown tensor name": (
        [header(spec(name="model.layers.0.self_attn.x_proj.weight")), COMMIT],
        grpc.StatusCode.INVALID_ARGUMENT, "'model.layers.0.self_attn.x_proj.weight' is not a parameter",
    ),
    "wrong shape": (
        [header(spec(shape=(256, 128), data=BF16[: len(BF16) // 2])), COMMIT],
        grpc.StatusCode.INVALID_ARGUMENT, "shape [256, 128] does not match the model's [256, 256]",
    ),
    "unsupported dtype": (
        [header(spec(dtype="float64")), COMMIT], grpc.StatusCode.INVALID_ARGUMENT, "dtype 'float64' is not one of",
    ),
    "nbytes disagrees with the shape": (
        [header(spec(nbytes=100)), COMMIT], grpc.StatusCode.INVALID_ARGUMENT, "nbytes=100 but shape [256, 256]",
    ),
    "checksum mismatch": (
        [header(spec(crc=12345)), chunk(0, 0, BF16), COMMIT], grpc.StatusCode.DATA_LOSS, "CRC-32 of the received bytes",
    ),
    "bytes missing at the commit": (
        [header(spec()), chunk(0, 0, BF16[:1000]), COMMIT], grpc.StatusCode.DATA_LOSS, "1000 of 131072 bytes received",
    ),
    "bytes beyond the declared size": (
        [header(spec()), chunk(0, 0, BF16), chunk(0, len(BF16), b"xx"), COMMIT],
        grpc.StatusCode.DATA_LOSS, "2 byte(s) beyond its declared nbytes=131072",
    ),
    "a chunk past the end in one piece": (
        [header(spec()), chunk(0, 0, BF16 + b"xx"), COMMIT], grpc.StatusCode.DATA_LOSS, "2 byte(s) beyond its declared",
    ),
    "a chunk after the end": (
        [header(spec()), chunk(0, 0, BF16), chunk(0, len(BF16) + 8, b"xx"), COMMIT],
        grpc.StatusCode.DATA_LOSS, "chunk at offset 131080 after the last byte",
    ),
    "a gap between chunks": (
        [header(spec()), chunk(0, 0, BF16[:100]), chunk(0, 200, BF16[200:]), COMMIT],
        grpc.StatusCode.DATA_LOSS, "chunk at offset 200 where byte 100 was expected",
    ),
    "a chunk for an undeclared tensor": (
        [header(spec()), chunk(3, 0, BF16), COMMIT], grpc.StatusCode.INVALID_ARGUMENT, "3 names no declared tensor",
    ),
    "duplicate tensor": (
        [header(spec(), spec()), COMMIT], grpc.StatusCode.INVALID_ARGUMENT, "declared twice (also tensors[0])",
    ),
    "duplicate tensor across declarations": (
        [header(spec()), pb.PushWeightsRequest(declare=pb.PushDeclare(tensors=[spec()])), COMMIT],
        grpc.StatusCode.INVALID_ARGUMENT, "tensors[1].name",
    ),
    "NaN values": (
        [header(spec(data=bytes(NAN))), chunk(0, 0, bytes(NAN)), COMMIT],
        grpc.StatusCode.INVALID_ARGUMENT, f"{NAME}: 1 non-finite value(s), the first nan at index [1, 244]",
    ),
    "Inf values": (
        [header(spec(dtype="float32", data=tensor_bytes(np.inf))), chunk(0, 0, tensor_bytes(np.inf)), COMMIT],
        grpc.StatusCode.INVALID_ARGUMENT, "65536 non-finite value(s), the first inf",
    ),
    "stale expected_version": (
        [header(spec(), expected_version=10**6), COMMIT], grpc.StatusCode.FAILED_PRECONDITION, "1000000 is stale",
    ),
    "stream ends before the commit": (
        [header(spec()), chunk(0, 0, BF16)], grpc.StatusCode.CANCELLED, "ended before its commit",
    ),
    "first message is not a header": ([chunk(0, 0, BF16), COMMIT], grpc.StatusCode.INVALID_ARGUMENT, "must be its header"),
    "no tensors": ([header(), COMMIT], grpc.StatusCode.INVALID_ARGUMENT, "declared no tensor"),
    "unknown in-flight policy": (
        [header(spec(), inflight="later"), COMMIT], grpc.StatusCode.INVALID_ARGUMENT, "'later' is not one of",
    ),
}


@pytest.fixture(scope="module")
def stub(bf16_target):
    with grpc.insecure_channel(bf16_target.grpc_address) as channel:
        yield pb_grpc.RolloutServiceStub(channel)


@pytest.fixture(scope="module")
def baseline(bf16_target, bf16_target_client):
    return bf16_target_client.status().weight_version, engine_weights(bf16_target), greedy(bf16_target_client)


def assert_unchanged(server, client, baseline) -> None:
    """Same version, bitwise the same engine tensors, and so the same outputs under greedy()'s
    fixed schedule."""
    version, weights, outputs = baseline
    assert client.status().weight_version == version
    now = engine_weights(server)
    assert [k for k in weights if not torch.equal(weights[k], now[k])] == []
    assert greedy(client) == outputs


@pytest.mark.parametrize("case", list(CASES))
def test_bad_push_is_rejected_and_changes_nothing(stub, bf16_target, bf16_target_client, baseline, case):
    messages, code, text = CASES[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.PushWeights(iter(messages), timeout=60)
    assert info.value.code() == code, info.value.details()
    assert text in info.value.details()
    assert_unchanged(bf16_target, bf16_target_client, baseline)


@pytest.mark.reliability("fault")
def test_client_cancelling_mid_push_changes_nothing_and_frees_the_server(stub, bf16_target, bf16_target_client, baseline, record_property):
    """A client cancels its push midway: the version, weights and outputs are unchanged, and the
    server takes the next push once it has seen the cancel."""
    sent, never = threading.Event(), threading.Event()

    def messages():
        yield header(spec())
        yield chunk(0, 0, BF16[:1000])
        sent.set()
        never.wait(60)  # the call is cancelled meanwhile
        yield COMMIT

    future = stub.PushWeights.future(messages(), timeout=60)
    assert sent.wait(10)
    future.cancel()
    cancelled = time.monotonic()
    assert_unchanged(bf16_target, bf16_target_client, baseline)
    # The server is free again once it has seen the cancel: a good push goes through.
    good = {NAME: np.frombuffer(tensor_bytes(), np.float32).reshape(SHAPE)}
    results = []

    def pushed() -> bool:
        try:
            results.append(bf16_target_client.push_weights(good))
        except AbortedError:  # the cancelled push is still being cleaned up
            return False
        return True

    wait_until(pushed, "the server to take a push after the cancelled one")
    record_property("cancel to the next push committed (s)", time.monotonic() - cancelled)
    assert results[0].version == baseline[0] + 1


def test_a_second_push_while_one_runs_is_aborted(stub):
    """Two pushes each hold after their header until one of them is refused: they overlap by
    construction, whichever reaches the server first."""
    decided = threading.Event()

    def held_push():
        yield header(spec())
        decided.wait(60)
        yield chunk(0, 0, BF16)
        yield COMMIT

    pushes = [stub.PushWeights.future(held_push(), timeout=120) for _ in range(2)]
    for future in pushes:
        future.add_done_callback(lambda _: decided.set())
    assert decided.wait(60), "neither push was refused"
    outcomes = []
    for future in pushes:
        try:
            outcomes.append(future.result().tensors_applied)
        except grpc.RpcError as err:
            outcomes.append((err.code(), err.details()))
    assert 1 in outcomes, outcomes
    code, details = next(o for o in outcomes if o != 1)
    assert code == grpc.StatusCode.ABORTED and "another push is in progress" in details


def test_http_bad_pushes_get_the_same_errors(bf16_target, bf16_target_client):
    import httpx
    from safetensors.torch import save

    version = bf16_target_client.status().weight_version
    url = f"{bf16_target.http_url}/v1/weights"
    good = save({NAME: torch.zeros(SHAPE, dtype=torch.bfloat16)})
    unknown = save({"lm_head.bias": torch.zeros(4, dtype=torch.bfloat16)})
    r = httpx.post(url, content=unknown, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_ARGUMENT"
    assert "'lm_head.bias' is not a parameter" in r.json()["error"]["message"]
    r = httpx.post(url, content=good[:-10], timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "DATA_LOSS", r.text
    bad_crc = save({NAME: torch.zeros(SHAPE, dtype=torch.bfloat16)}, metadata={"crc32": f'{{"{NAME}": 7}}'})
    r = httpx.post(url, content=bad_crc, timeout=60)
    assert r.status_code == 400 and "CRC-32" in r.json()["error"]["message"]
    r = httpx.post(url, content=good, params={"expected_version": version + 5}, timeout=60)
    assert r.status_code == 412 and r.json()["error"]["code"] == "FAILED_PRECONDITION"
    assert bf16_target_client.status().weight_version == version
