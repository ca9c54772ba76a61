"""Fuzzing every Generate route of a running server (hypothesis) with what a hostile caller sends:
numbers at and beyond every integer width (int32, int64, uint64, 2**70), NaN and infinities, lists
longer than vLLM's runners hold (allowed ids, logit bias, stop ids and strings), and JSON nested
thousands of levels deep. Each case is answered with a success or a client error, never a server
error; afterwards the engine is alive and serves the same version with the same greedy output.
FUZZ_SERVER_EXAMPLES cases per route (100 in `make test`, 10,000 in `make reliability`).

A valid case runs on the engine, so valid draws are kept small (a few prompts, a few tokens); a
call that still takes long ends at its own deadline (X-Request-Timeout / the gRPC deadline), which
is counted apart and is the caller's choice, not a server error."""

from __future__ import annotations

import json
import math
import os

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

pytestmark = pytest.mark.engine

CASES = settings(
    max_examples=int(os.environ.get("FUZZ_SERVER_EXAMPLES", "100")), deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large],
)
DEADLINE_S = 10
GRPC_CLIENT_CODES = {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "NOT_FOUND"}
PROMPT = [5, 9, 13, 17]
GREEDY = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}

EDGES = [0, 1, 2, -1, 255, 256, 1023, 1024, 1025, 2047, 2048, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
         2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**70, -(2**31), -(2**63), -(2**63) - 1]
small = st.integers(1, 3)
any_int = st.one_of(st.sampled_from(EDGES), st.integers(-(2**80), 2**80), small)
u32 = st.one_of(st.sampled_from([e for e in EDGES if 0 <= e < 2**32]), st.integers(0, 2**32 - 1), small)
i64 = st.one_of(st.sampled_from([e for e in EDGES if -(2**63) <= e < 2**63]), st.integers(-(2**63), 2**63 - 1))
i32 = st.one_of(st.sampled_from([e for e in EDGES if -(2**31) <= e < 2**31]), st.integers(-(2**31), 2**31 - 1), st.integers(0, 2047))
floats = st.one_of(st.sampled_from([0.0, -0.0, 1.0, 2.0, 2.0001, -1.0, 1e-45, 3.4e38, 1e300, math.inf, -math.inf, math.nan]),
                   st.floats(allow_nan=True, allow_infinity=True))
# Up to twice what the GPU runner holds (1024 allowed ids / bias entries, 128 stop ids).
long_ids = st.lists(i32, max_size=2100)
id_lists = st.one_of(st.lists(i32, max_size=5), long_ids)
texts = st.text(max_size=12)

SAMPLING = {  # field -> its strategy in protobuf's types
    "n": u32, "max_tokens": u32, "temperature": floats, "top_p": floats, "top_k": u32, "min_p": floats,
    "stop": st.lists(texts, max_size=300), "stop_token_ids": id_lists, "seed": i64, "ignore_eos": st.booleans(),
    "logprobs": u32, "prompt_logprobs": u32, "detokenize": st.booleans(), "min_tokens": u32,
    "repetition_penalty": floats, "presence_penalty": floats, "frequency_penalty": floats,
    "logit_bias": st.dictionaries(i32, floats, max_size=2100), "allowed_token_ids": id_lists,
}


def _not_slow(sampling: dict) -> bool:
    """Keep valid draws small: many samples of many tokens would make a case run for minutes."""
    n, max_tokens = sampling.get("n", 1), sampling.get("max_tokens", 16)
    return not (isinstance(n, int) and isinstance(max_tokens, int) and 8 < n <= 256 and 16 < max_tokens <= 256)


@st.composite
def grpc_requests(draw) -> pb.GenerateRequest:
    sampling = draw(st.fixed_dictionaries({}, optional=SAMPLING))
    assume(_not_slow(sampling))
    prompts = draw(st.lists(st.one_of(st.builds(lambda t: pb.Prompt(text=t), texts),
                                      st.builds(lambda ids: pb.Prompt(token_ids=ids), id_lists)), min_size=0, max_size=3))
    versions = {"min_weight_version": draw(st.one_of(st.just(0), st.sampled_from([e for e in EDGES if 2 <= e < 2**64])))}
    if draw(st.booleans()):
        versions["max_staleness"] = draw(u32)
    return pb.GenerateRequest(prompts=prompts, sampling=pb.SamplingParams(**sampling), **versions)


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth if depth % 2 else '{"a":' * depth + "1" + "}" * depth


DEEP = st.integers(50, 20_000).map(_deep)
PLACEHOLDER = "__deep__"


def _json(value: dict, deep: str | None) -> bytes:
    """`value` as JSON (NaN and infinities as Python writes them), with a deeply nested value in
    place of the placeholder string if `deep` is given."""
    text = json.dumps(value)
    return (text.replace(json.dumps(PLACEHOLDER), deep, 1) if deep else text).encode()


json_any = st.one_of(any_int, floats, texts, st.booleans(), st.none(), long_ids, st.just(PLACEHOLDER))


@st.composite
def generate_bodies(draw) -> bytes:
    """/v1/generate JSON: the proto's fields with numbers of any width, and any value anywhere."""
    sampling = draw(st.fixed_dictionaries({}, optional={k: st.one_of(any_int, floats, id_lists, json_any) for k in SAMPLING}))
    assume(_not_slow(sampling))
    if "logit_bias" in sampling and draw(st.booleans()):
        sampling["logit_bias"] = {str(k): v for k, v in draw(SAMPLING["logit_bias"]).items()}
    prompt = draw(st.one_of(st.fixed_dictionaries({"token_ids": st.lists(any_int, max_size=6)}),
                            st.fixed_dictionaries({"text": texts}), json_any))
    body = {"prompts": [prompt], "sampling": sampling}
    body |= draw(st.fixed_dictionaries({}, optional={"min_weight_version": any_int, "max_staleness": any_int, "request_id": json_any}))
    return _json(body, draw(st.none() | DEEP))


OPENAI_SAMPLING = {
    "n": any_int, "max_tokens": any_int, "temperature": floats, "top_p": floats, "top_k": any_int, "min_p": floats,
    "seed": any_int, "logprobs": any_int, "min_tokens": any_int, "stop": st.one_of(texts, st.lists(texts, max_size=300)),
    "stop_token_ids": id_lists, "allowed_token_ids": id_lists, "presence_penalty": floats, "frequency_penalty": floats,
    "repetition_penalty": floats, "ignore_eos": st.booleans(), "min_weight_version": any_int, "max_staleness": any_int,
    "logit_bias": st.dictionaries(st.one_of(st.integers(-(2**70), 2**70).map(str), texts), floats, max_size=2100),
}


@st.composite
def completion_bodies(draw) -> bytes:
    fields = draw(st.fixed_dictionaries({}, optional={k: st.one_of(v, json_any) for k, v in OPENAI_SAMPLING.items()}))
    assume(_not_slow(fields))
    prompt = draw(st.one_of(texts.filter(bool), st.lists(i32, min_size=1, max_size=6), st.lists(st.lists(any_int, max_size=4), max_size=2), json_any))
    return _json({"prompt": prompt, **fields}, draw(st.none() | DEEP))


@st.composite
def chat_bodies(draw) -> bytes:
    fields = draw(st.fixed_dictionaries({}, optional={
        **{k: st.one_of(v, json_any) for k, v in OPENAI_SAMPLING.items() if k != "logprobs"},
        "top_logprobs": any_int, "logprobs": st.booleans(), "max_completion_tokens": any_int,
        "tools": st.one_of(json_any, st.just([{"type": "function", "function": {"name": "f", "parameters": PLACEHOLDER}}])),
    }))
    assume(_not_slow(fields))
    content = draw(st.one_of(texts, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}), max_size=2), json_any))
    return _json({"messages": [{"role": draw(st.sampled_from(["user", "system", "assistant", "x"])), "content": content}], **fields},
                 draw(st.none() | DEEP))


@pytest.fixture(scope="module")
def target(bf16_server):
    channel = grpc.insecure_channel(bf16_server.grpc_address)
    stub = pb_grpc.RolloutServiceStub(channel)
    http = httpx.Client(base_url=bf16_server.http_url, timeout=60, headers={"x-request-timeout": str(DEADLINE_S)})

    def observed():
        """The version and one prompt's greedy output, alone in its call (a fixed batch schedule)."""
        out = stub.Generate(pb.GenerateRequest(prompts=[pb.Prompt(token_ids=PROMPT)], sampling=pb.SamplingParams(**GREEDY)), timeout=120)
        status = stub.GetStatus(pb.GetStatusRequest(), timeout=60)
        sample = out.completions[0].samples[0]
        return status.weight_version, list(sample.token_ids), list(sample.logprobs)

    before = observed()
    yield stub, http, before[0]
    assert http.get("/healthz").status_code == 200, "the engine died under the fuzz cases"
    assert observed() == before, "a fuzz case changed the served version or output"
    channel.close()
    http.close()


def _http_outcome(reply: httpx.Response) -> str:
    status = reply.status_code
    if status == 504:  # the case's own X-Request-Timeout: a valid call that ran long
        assert "X-Request-Timeout" in reply.text, reply.text
        return "504 (its deadline)"
    assert status == 200 or 400 <= status < 500, (status, reply.text[:500])
    return str(status)


@pytest.mark.reliability("fuzz")
@given(request=grpc_requests())
@CASES
def test_any_grpc_generate_is_served_or_a_client_error(target, cases, request):
    """GenerateRequest messages with every field at and beyond its limits (integer edges of every
    width, NaN and infinities, lists beyond what vLLM's runners hold) to the running server's gRPC
    Generate: each is served or refused with a client-error code; the engine lives on."""
    stub, _, committed = target
    if request.min_weight_version == committed + 1:
        request.min_weight_version = 0  # a valid wait for the next push, which no case makes
    try:
        stub.Generate(request, timeout=DEADLINE_S)
        cases["OK"] += 1
    except grpc.RpcError as exc:
        code = exc.code().name
        if code == "DEADLINE_EXCEEDED":
            cases["DEADLINE_EXCEEDED (its deadline)"] += 1
            return
        assert code in GRPC_CLIENT_CODES, (code, exc.details(), str(request)[:500])
        cases[code] += 1


@pytest.mark.reliability("fuzz")
@given(body=generate_bodies())
@CASES
def test_any_http_generate_body_with_extreme_values_is_served_or_a_client_error(target, cases, body):
    """/v1/generate bodies with numbers beyond every integer width, NaN, lists beyond the runners'
    limits and JSON nested up to 20,000 levels: each is a 200 or a 4xx; the engine lives on."""
    _, http, _ = target
    cases[_http_outcome(http.post("/v1/generate", content=body, headers={"content-type": "application/json"}))] += 1


@pytest.mark.reliability("fuzz")
@given(body=completion_bodies())
@CASES
def test_any_openai_completions_body_is_served_or_a_client_error(target, cases, body):
    """/v1/completions bodies as above, in OpenAI's and vLLM's field names (logit_bias keys of any
    size, prompts of any shape): each is a 200 or a 4xx; the engine lives on."""
    _, http, _ = target
    cases[_http_outcome(http.post("/v1/completions", content=body, headers={"content-type": "application/json"}))] += 1


@pytest.mark.reliability("fuzz")
@given(body=chat_bodies())
@CASES
def test_any_openai_chat_body_is_served_or_a_client_error(target, cases, body):
    """/v1/chat/completions bodies as above, with nesting in messages and tool schemas: each is a
    200 or a 4xx; the engine lives on."""
    _, http, _ = target
    cases[_http_outcome(http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"}))] += 1
