"""Fuzzing a running server (hypothesis): PushWeights streams and HTTP bodies of every shape reach
the real front ends and engine, and each is answered with a client error; afterwards the server
serves the same version with the same greedy output. FUZZ_SERVER_EXAMPLES cases per test (100 in
`make test`, 10,000 in `make soak`).

Every generated push is invalid by construction (a valid one would commit a version): either its
tensors' shapes match no parameter, or it declares a real parameter whose CRC-32 is that of bytes
the stream never sends (a run of 0x5A), with random chunks."""

from __future__ import annotations

import json
import os
import struct
import zlib

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine

CASES = settings(
    max_examples=int(os.environ.get("FUZZ_SERVER_EXAMPLES", "100")), deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
CLIENT_CODES = {"INVALID_ARGUMENT", "DATA_LOSS", "FAILED_PRECONDITION", "CANCELLED", "RESOURCE_EXHAUSTED"}
# A real parameter (the tiny model's final norm: 256 bf16 values) and the CRC-32 of bytes no
# generated stream sends in full.
REAL = ("model.norm.weight", "bfloat16", (256,))
NEVER_SENT_CRC = zlib.crc32(b"\x5a" * 512)
PROMPT = [[5, 9, 13, 17]]
GREEDY = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}

u64 = st.one_of(st.sampled_from([0, 1, 2, 255, 256, 511, 512, 513, 2**31, 2**32, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
u32 = st.one_of(st.sampled_from([0, 1, 2, 3, 2**32 - 1]), st.integers(0, 2**32 - 1))
names = st.one_of(st.sampled_from([REAL[0], "lm_head.weight", "model.embed_tokens.weight", "", "model.x.weight"]), st.text(max_size=40))
dtypes = st.one_of(st.sampled_from(["bfloat16", "float16", "float32", "int8", "float64", ""]), st.text(max_size=10))


@st.composite
def wrong_shape_specs(draw):
    """A spec whose shape is no parameter's: refused whatever else it says."""
    shape = draw(st.lists(st.integers(0, 2**40), max_size=4).filter(lambda s: tuple(s) not in SHAPES))
    crc = draw(st.none() | u32)
    return pb.TensorSpec(name=draw(names), dtype=draw(dtypes), shape=shape, nbytes=draw(u64), crc32=crc)


def real_spec() -> pb.TensorSpec:
    name, dtype, shape = REAL
    return pb.TensorSpec(name=name, dtype=dtype, shape=shape, nbytes=512, crc32=NEVER_SENT_CRC)


chunks = st.builds(
    lambda index, offset, data: pb.PushWeightsRequest(chunk=pb.PushChunk(tensor_index=index, offset=offset, data=data)),
    st.integers(0, 4), st.one_of(st.sampled_from([0, 1, 256, 511, 512, 513]), u64), st.binary(max_size=1024),
)


@st.composite
def push_streams(draw) -> list[pb.PushWeightsRequest]:
    specs = draw(st.lists(wrong_shape_specs(), max_size=3))
    if not specs or draw(st.booleans()):
        specs.insert(draw(st.integers(0, len(specs))), real_spec())  # never valid: its bytes never all arrive
    header = pb.PushHeader(
        tensors=specs, label=draw(st.text(max_size=20)), inflight=draw(st.sampled_from(["", "drain", "abort", "continue", "later"])),
        expected_version=draw(st.none() | u64),
    )
    body = draw(st.lists(st.one_of(chunks, st.builds(lambda s: pb.PushWeightsRequest(declare=pb.PushDeclare(tensors=[s])),
                                                     wrong_shape_specs())), max_size=8))
    messages = [pb.PushWeightsRequest(header=header), *body]
    if draw(st.booleans()):
        messages.insert(draw(st.integers(0, len(messages))), pb.PushWeightsRequest(chunk=pb.PushChunk(data=b"\x5a" * 100)))
    if draw(st.booleans()):
        messages.append(pb.PushWeightsRequest(commit=pb.PushCommit()))
    if draw(st.booleans()):  # anything at all after (or instead of) the header
        messages = draw(st.permutations(messages))
    return messages


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
generate_bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {"prompts": st.lists(st.fixed_dictionaries({}, optional={"token_ids": st.lists(st.integers(-5, 10**6), max_size=5),
                                                                 "text": st.text(max_size=10)}), max_size=3)},
        optional={"sampling": st.dictionaries(st.sampled_from(["n", "max_tokens", "temperature", "top_p", "top_k", "seed",
                                                               "logprobs", "stop", "x"]), json_values, max_size=4)},
    ).map(lambda v: json.dumps(v).encode()),
)


@st.composite
def safetensors_bodies(draw) -> bytes:
    """Bytes that look like a safetensors file: an 8-byte size and a JSON header that may lie."""
    header = draw(st.dictionaries(st.one_of(st.just(REAL[0]), names), st.one_of(
        st.fixed_dictionaries({"dtype": st.sampled_from(["BF16", "F32", "F16", "I8", "X"]),
                               "shape": st.lists(st.integers(-1, 2**20), max_size=3),
                               "data_offsets": st.lists(st.integers(-1, 2**40), min_size=2, max_size=3)}),
        json_values), max_size=3))
    raw = json.dumps(header).encode()
    size = draw(st.one_of(st.just(len(raw)), u64))
    return struct.pack("<Q", size) + raw + draw(st.binary(max_size=512))


SHAPES: set[tuple] = set()


@pytest.fixture(scope="module")
def target(bf16_server, tiny_model):
    from safetensors import safe_open

    with safe_open(str(tiny_model / "model.safetensors"), "pt") as f:
        SHAPES.update(tuple(f.get_slice(k).get_shape()) for k in f.keys())
    channel = grpc.insecure_channel(bf16_server.grpc_address)
    http = httpx.Client(base_url=bf16_server.http_url, timeout=60)

    def observed():
        """The version and one prompt's greedy output, alone in its call (a fixed batch schedule)."""
        out = pb_grpc.RolloutServiceStub(channel).Generate(pb.GenerateRequest(
            prompts=[pb.Prompt(token_ids=PROMPT[0])], sampling=pb.SamplingParams(**GREEDY)), timeout=120)
        status = pb_grpc.RolloutServiceStub(channel).GetStatus(pb.GetStatusRequest(), timeout=60)
        sample = out.completions[0].samples[0]
        return status.weight_version, list(sample.token_ids), list(sample.logprobs)

    before = observed()
    yield pb_grpc.RolloutServiceStub(channel), http
    assert observed() == before, "a fuzz case changed the served version or output"
    channel.close()
    http.close()


@pytest.mark.reliability("fuzz")
@given(messages=push_streams())
@CASES
def test_any_push_stream_is_a_client_error(target, cases, messages):
    """Generated PushWeights streams (random specs and chunks, truncated, oversized and misplaced
    chunks, wrong types, bad checksums, no commit, any order) against a running server: each ends
    with a client-error code; the version and greedy output are unchanged after them all."""
    stub, _ = target
    with pytest.raises(grpc.RpcError) as info:
        stub.PushWeights(iter(messages), timeout=60)
    code = info.value.code().name
    assert code in CLIENT_CODES, (code, info.value.details(), messages[:3])
    cases[code] += 1


@pytest.mark.reliability("fuzz")
@given(body=generate_bodies)
@CASES
def test_any_http_generate_body_is_answered_without_a_server_error(target, cases, body):
    """Random bytes, random JSON and generate-shaped JSON with random fields as POST /v1/generate
    bodies against a running server: each is a 4xx, or a 200 for one that is a valid request."""
    _, http = target
    status = http.post("/v1/generate", content=body, headers={"content-type": "application/json"}).status_code
    assert 400 <= status < 500 or status == 200, (status, body[:200])
    cases[str(status)] += 1


@pytest.mark.reliability("fuzz")
@given(body=safetensors_bodies())
@CASES
def test_any_http_push_body_is_a_client_error(target, cases, body):
    """Safetensors-like bodies (sizes that lie, headers naming real and unknown tensors with random
    dtypes, shapes and offsets, random data) as POST /v1/weights: each is a 4xx."""
    _, http = target
    status = http.post("/v1/weights", content=body).status_code
    assert 400 <= status < 500, (status, body[:200])
    cases[str(status)] += 1
