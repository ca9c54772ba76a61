"""Delta pushes: a tensor sent as its changes since the client's last push is rebuilt by the server
and served bitwise as if sent whole; a delta against a base the server does not hold falls back to
a whole push by itself; every bad delta is refused and changes nothing."""

from __future__ import annotations

import zlib

import grpc
import numpy as np
import pytest
import torch
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

from rollout_client import RolloutClient
from rollout_client.delta import encode
from tests.weights.conftest import engine_weights, greedy, step

pytestmark = pytest.mark.engine

NAME, SHAPE = "model.layers.0.self_attn.o_proj.weight", (256, 256)
NORM = "model.norm.weight"


def bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).contiguous().reshape(-1).view(torch.uint16).numpy().copy()


def test_a_delta_push_serves_bitwise_what_a_push_of_the_whole_tensors_serves(bf16_target, bf16_target_client, weights1):
    w2 = step(weights1, seed=1)
    with RolloutClient(bf16_target.grpc_address, timeout=120) as trainer:
        first = trainer.push_weights(weights1, delta=True)  # no base yet: whole, and recorded
        assert first.delta_tensors == 0 and trainer.delta_base.version == first.version
        assert trainer.delta_base.nbytes == sum(t.numel() * 2 for t in weights1.values())
        before = engine_weights(bf16_target)
        second = trainer.push_weights(w2, delta=True)
        assert second.delta_tensors == len(w2) and second.dense_bytes == first.dense_bytes
        assert second.bytes_received < 0.2 * second.dense_bytes, second.wire_ratio
        by_delta, outputs = engine_weights(bf16_target), greedy(trainer)
    bf16_target_client.push_weights(weights1, delta=False)
    whole = bf16_target_client.push_weights(w2, delta=False)
    assert whole.delta_tensors == 0 and whole.bytes_received == whole.dense_bytes == second.dense_bytes
    assert [k for k in by_delta if not torch.equal(by_delta[k], engine_weights(bf16_target)[k])] == []
    assert greedy(bf16_target_client) == outputs
    assert [k for k in before if not torch.equal(before[k], by_delta[k])] != []  # the step changed the engine


def test_by_default_a_streamed_push_is_a_delta_push_and_a_shared_memory_push_is_whole(bf16_target, weights1):
    """delta=None (the default) sends deltas where bytes cross a link (streamed, as to another host)
    and whole tensors through shared memory, where a delta only adds work."""
    w2, w3 = step(weights1, seed=21), step(weights1, seed=22)
    with RolloutClient(bf16_target.grpc_address, timeout=120) as remote:
        first = remote.push_weights(weights1, shared_memory=False)
        assert first.delta_tensors == 0 and remote.delta_base.version == first.version
        second = remote.push_weights(w2, shared_memory=False)
        assert second.delta_tensors == len(w2) and second.bytes_received < 0.2 * second.dense_bytes
        assert second.shared_bytes == 0
    with RolloutClient(bf16_target.grpc_address, timeout=120) as local:
        local.push_weights(w2)
        handed = local.push_weights(w3)
        assert handed.delta_tensors == 0 and handed.shared_bytes == handed.bytes_received == handed.dense_bytes
        assert local.delta_base.nbytes == 0  # no copy kept where no delta is sent
        with RolloutClient(bf16_target.grpc_address, timeout=120) as never:
            whole = never.push_weights(w3, shared_memory=False, delta=False)
            assert whole.delta_tensors == 0 and whole.bytes_received == whole.dense_bytes and never.delta_base.nbytes == 0


def test_a_delta_against_a_version_the_server_dropped_goes_whole_by_itself(bf16_target, bf16_target_client, weights0, weights1):
    w2 = step(weights1, seed=2)
    with RolloutClient(bf16_target.grpc_address, timeout=120) as trainer:
        base = trainer.push_weights(weights1, delta=True).version
        for _ in range(3):  # the store keeps 3 versions: the trainer's base is dropped
            bf16_target_client.push_weights(weights0)
        with pytest.warns(UserWarning, match=f"version {base} is no longer kept"):
            fell_back = trainer.push_weights(w2, delta=True)
        assert fell_back.delta_tensors == 0 and f"version {base} is no longer kept" in fell_back.fell_back
        assert fell_back.bytes_received == fell_back.dense_bytes and trainer.delta_base.version == fell_back.version
        outputs = greedy(trainer)
        again = trainer.push_weights(step(w2, seed=3), delta=True)  # on the new base, deltas again
        assert again.delta_tensors == len(w2) and again.fell_back == ""
    bf16_target_client.push_weights(w2)
    assert greedy(bf16_target_client) == outputs


def test_a_delta_push_of_generated_tensors_that_falls_back_sends_each_tensor_once(bf16_target, bf16_target_client, weights0, weights1):
    """A generator (a trainer gathering shards) can be read once: the tensors read before the
    refusal are sent again from the base, then the rest of the generator."""
    w2 = step(weights1, seed=4)
    pulled: list[str] = []

    def gathered():
        for name, tensor in w2.items():
            pulled.append(name)
            yield name, tensor

    with RolloutClient(bf16_target.grpc_address, timeout=120) as trainer:
        trainer.push_weights(weights1, delta=True)
        for _ in range(3):
            bf16_target_client.push_weights(weights0)
        with pytest.warns(UserWarning, match="pushing whole tensors instead"):
            result = trainer.push_weights(gathered(), delta=True, bucket_bytes=1 << 16)
        assert pulled == list(w2) and result.tensors_applied == len(w2) and result.fell_back
        outputs = greedy(trainer)
    bf16_target_client.push_weights(w2)
    assert greedy(bf16_target_client) == outputs


async def test_the_asyncio_client_pushes_deltas_and_falls_back_as_the_blocking_one(bf16_target, bf16_target_client, weights0, weights1):
    from rollout_client import AsyncRolloutClient

    w2, w3 = step(weights1, seed=6), step(weights1, seed=7)
    async with AsyncRolloutClient(bf16_target.grpc_address, timeout=120) as trainer:
        await trainer.push_weights(weights1, delta=True)
        assert (await trainer.push_weights(w2, delta=True)).delta_tensors == len(w2)
        for _ in range(3):
            bf16_target_client.push_weights(weights0)
        with pytest.warns(UserWarning, match="pushing whole tensors instead"):
            result = await trainer.push_weights(w3, delta=True)
        assert result.fell_back and result.delta_tensors == 0 and trainer.delta_base.version == result.version
        outputs = greedy(bf16_target_client)
    bf16_target_client.push_weights(w3)
    assert greedy(bf16_target_client) == outputs


# ---- every bad delta is refused, and nothing changes -------------------------------------------


def _requests(spec: pb.TensorSpec, payload: bytes, base_version: int | None = 0, commit: bool = True) -> list:
    header = pb.PushHeader(tensors=[spec])
    if base_version is not None:
        header.delta_base_version = base_version
    out = [pb.PushWeightsRequest(header=header), pb.PushWeightsRequest(chunk=pb.PushChunk(tensor_index=0, offset=0, data=payload))]
    return out + [pb.PushWeightsRequest(commit=pb.PushCommit())] if commit else out


def _delta_spec(name: str, base: np.ndarray, new: np.ndarray, payload: bytes, changed: int, **override) -> pb.TensorSpec:
    delta = dict(codec="zlib", base_crc32=zlib.crc32(base.view(np.uint8)), changed=changed, wire_nbytes=len(payload))
    fields = dict(name=name, dtype="bfloat16", shape=SHAPE if name == NAME else (base.size,), nbytes=new.nbytes,
                  crc32=zlib.crc32(new.view(np.uint8)))
    delta.update({k: v for k, v in override.items() if k in delta})
    fields.update({k: v for k, v in override.items() if k in fields})
    return pb.TensorSpec(**fields, delta=pb.DeltaSpec(**delta))


def _out_of_range(norm: np.ndarray) -> tuple[pb.TensorSpec, bytes]:
    """A delta naming element size+44 of model.norm.weight (codec none: the bytes as they are)."""
    index = norm.size + 44
    raw = np.array([1], "<u4").tobytes() + np.array([index & 0xFF, index >> 8], np.uint8).tobytes() + bytes([2, 0])
    return _delta_spec(NORM, norm, norm, raw, 1, codec="none"), raw


def _cases(weights0) -> dict:
    base, norm = bits(weights0[NAME]), bits(weights0[NORM])
    new = base.copy()
    new[::7] += 1
    payload, changed = encode(base, new)
    good = _delta_spec(NAME, base, new, payload, changed)
    corrupt = bytearray(payload)
    corrupt[len(corrupt) // 2] ^= 0xFF
    beyond, beyond_bytes = _out_of_range(norm)
    return {
        "a base version the server does not keep": (
            _requests(good, payload, base_version=10**6), grpc.StatusCode.FAILED_PRECONDITION, "is not a committed version",
        ),
        "a base of other values than the server's": (
            _requests(_delta_spec(NAME, base, new, payload, changed, base_crc32=123), payload),
            grpc.StatusCode.FAILED_PRECONDITION, "the client encoded against 0x0000007b",
        ),
        "a delta without a base version": (
            _requests(good, payload, base_version=None), grpc.StatusCode.INVALID_ARGUMENT, "needs header.delta_base_version",
        ),
        "a delta of a float32 tensor": (
            _requests(_delta_spec(NAME, base, new, payload, changed, dtype="float32", nbytes=new.size * 4), payload),
            grpc.StatusCode.INVALID_ARGUMENT, "a delta tensor is bfloat16, not float32",
        ),
        "an unknown codec": (
            _requests(_delta_spec(NAME, base, new, payload, changed, codec="lz77"), payload),
            grpc.StatusCode.INVALID_ARGUMENT, "'lz77' is not one of zlib, none",
        ),
        "more changes than elements": (
            _requests(_delta_spec(NAME, base, new, payload, changed=10**7), payload),
            grpc.StatusCode.INVALID_ARGUMENT, "10000000 changed elements in a tensor of 65536",
        ),
        "truncated": (
            _requests(good, payload[:-5]), grpc.StatusCode.DATA_LOSS, f"{len(payload) - 5} of {len(payload)} bytes received",
        ),
        "a corrupt stream": (
            _requests(good, bytes(corrupt)), grpc.StatusCode.DATA_LOSS, f"{NAME}: not a valid delta: ",
        ),
        "a wire size of 0": (
            _requests(_delta_spec(NAME, base, new, payload, changed, wire_nbytes=0), b""),
            grpc.StatusCode.INVALID_ARGUMENT, f"delta.wire_nbytes: {NAME}: 0 is not 1..131072",
        ),
        "a wire size beyond the tensor's": (
            _requests(_delta_spec(NAME, base, new, payload, changed, wire_nbytes=10**9), payload),
            grpc.StatusCode.INVALID_ARGUMENT, "1000000000 is not 1..131072 (the tensor's nbytes)",
        ),
        "an element beyond the tensor": (
            _requests(beyond, beyond_bytes), grpc.StatusCode.DATA_LOSS, f"element {norm.size + 44} is beyond the tensor's {norm.size}",
        ),
        "a rebuilt tensor other than the declared one": (
            _requests(_delta_spec(NAME, base, new, payload, changed, crc32=7), payload),
            grpc.StatusCode.DATA_LOSS, "rebuilt from its delta, its CRC-32 is",
        ),
    }


CASE_NAMES = [
    "a base version the server does not keep", "a base of other values than the server's", "a delta without a base version",
    "a delta of a float32 tensor", "an unknown codec", "more changes than elements", "truncated", "a corrupt stream",
    "a wire size of 0", "a wire size beyond the tensor's", "an element beyond the tensor",
    "a rebuilt tensor other than the declared one",
]


@pytest.fixture(scope="module")
def cases(weights0):
    built = _cases(weights0)
    assert list(built) == CASE_NAMES
    return built


@pytest.fixture(scope="module")
def stub(bf16_target):
    with grpc.insecure_channel(bf16_target.grpc_address) as channel:
        yield pb_grpc.RolloutServiceStub(channel)


@pytest.mark.parametrize("case", CASE_NAMES)
def test_a_bad_delta_is_refused_and_changes_nothing(stub, bf16_target, bf16_target_client, cases, case):
    requests, code, message = cases[case]
    version = bf16_target_client.status().committed_version
    weights, outputs = engine_weights(bf16_target), greedy(bf16_target_client)
    with pytest.raises(grpc.RpcError) as err:
        stub.PushWeights(iter(requests), timeout=60)
    assert err.value.code() == code and message in err.value.details(), err.value.details()
    tagged = ("rollout-error", "delta-base") in (err.value.trailing_metadata() or ())
    assert tagged == (code == grpc.StatusCode.FAILED_PRECONDITION)  # what makes the client fall back
    assert bf16_target_client.status().committed_version == version
    now = engine_weights(bf16_target)
    assert [k for k in weights if not torch.equal(weights[k], now[k])] == [] and greedy(bf16_target_client) == outputs
