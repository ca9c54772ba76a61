"""Values that kill vLLM's GPU engine with one request are refused on every route, naming the field
and the limit, and the server keeps serving.

vLLM 0.32's GPU model runner holds a request's allowed ids, logit bias and (with min_tokens) stop
ids in fixed-size arrays and treats an overflow as fatal in EngineCore.step
(vllm/v1/worker/gpu/sample/logit_bias.py); seeds go into int64 arrays and prompt + min_tokens into
int32 ones (sample/states.py). The CPU runner used here has none of those arrays, so on this
machine the old server answered 200 (or a 500 for numbers msgspec cannot encode) where a GPU
server died: these tests check the refusal itself, which is what protects a GPU engine.
"""

from __future__ import annotations

import grpc
import httpx
import pytest

from rollout_client import InvalidArgumentError

pytestmark = pytest.mark.engine

# name -> (sampling options as both APIs name them, field of the error, text the message must contain)
CASES = {
    "1025 allowed token ids": ({"allowed_token_ids": list(range(1025))}, "sampling.allowed_token_ids", "at most 1024"),
    "1025 logit bias entries": ({"logit_bias": {str(t): 1.0 for t in range(1025)}}, "sampling.logit_bias", "at most 1024"),
    "128 stop ids and the end-of-sequence id with min_tokens": (
        {"stop_token_ids": list(range(1, 129)), "min_tokens": 1, "max_tokens": 4}, "sampling.stop_token_ids", "at most 128",
    ),
    "max_tokens and min_tokens of three billion": (
        {"max_tokens": 3_000_000_000, "min_tokens": 3_000_000_000}, "sampling.max_tokens", "less than or equal to 2147483647",
    ),
    "max_tokens beyond the context": ({"max_tokens": 1_000_000, "min_tokens": 1_000_000}, "sampling.max_tokens", "max_model_len=256"),
    "top_k beyond the vocabulary": ({"top_k": 100_000}, "sampling.top_k", "vocabulary size 2048"),
}
# Numbers that gRPC's types cannot carry, only JSON: beyond int64 and uint64.
JSON_ONLY = {
    "seed of 2**63": ({"seed": 2**63}, "sampling.seed", str(2**63)),
    "seed of 2**64": ({"seed": 2**64}, "sampling.seed", str(2**64)),
    "max_tokens of 2**64": ({"max_tokens": 2**64}, "sampling.max_tokens", str(2**64)),
    "n of 2**70": ({"n": 2**70}, "sampling.n", str(2**70)),
    "logprobs of 2**64": ({"logprobs": 2**64}, "sampling.logprobs", str(2**64)),
}
OPENAI = {"/v1/completions": {"prompt": "hello"}, "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}]}}


def _still_serves(client):
    assert client.generate(["still here"], max_tokens=3, temperature=0.0)[0].samples[0].token_ids


def _grpc_kwargs(sampling: dict) -> dict:
    kwargs = dict(sampling)
    if "logit_bias" in kwargs:
        kwargs["logit_bias"] = {int(k): v for k, v in kwargs["logit_bias"].items()}
    return kwargs


@pytest.mark.parametrize("name", list(CASES))
def test_grpc_refuses_a_value_that_kills_a_gpu_engine(bf16_client, name):
    sampling, field, text = CASES[name]
    with pytest.raises(InvalidArgumentError) as info:
        bf16_client.generate(["hello"], **_grpc_kwargs(sampling))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith(field + ":") and text in info.value.details, info.value.details
    _still_serves(bf16_client)


@pytest.mark.parametrize("name", list(CASES) + list(JSON_ONLY))
def test_http_generate_refuses_a_value_that_kills_a_gpu_engine_or_overflows(bf16_server, bf16_client, name):
    sampling, field, text = {**CASES, **JSON_ONLY}[name]
    r = httpx.post(f"{bf16_server.http_url}/v1/generate", json={"prompts": [{"text": "hello"}], "sampling": sampling}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["field"] == field and text in error["message"], error
    _still_serves(bf16_client)


@pytest.mark.parametrize("path", list(OPENAI))
@pytest.mark.parametrize("name", list(CASES) + list(JSON_ONLY))
def test_openai_routes_refuse_a_value_that_kills_a_gpu_engine_or_overflows(bf16_server, bf16_client, name, path):
    sampling, field, _ = {**CASES, **JSON_ONLY}[name]
    body = {**OPENAI[path], **sampling}
    r = httpx.post(f"{bf16_server.http_url}{path}", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]  # OpenAI's shape, the field named as the request named it
    assert error["code"] == "INVALID_ARGUMENT" and error["param"] == field.removeprefix("sampling."), error
    _still_serves(bf16_client)


def test_a_token_id_beyond_int64_is_400_naming_it(bf16_server):
    body = {"prompts": [{"token_ids": [5, 2**64]}]}
    r = httpx.post(f"{bf16_server.http_url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["field"] == "prompts[0].token_ids", r.text
    assert "token_ids[1]=18446744073709551616" in r.json()["error"]["message"]


def test_a_minimum_version_far_beyond_the_committed_one_is_refused_at_once(bf16_server, bf16_client):
    """Not held for max_version_wait_s (600 s): 1024 such calls from one eval key held every
    version-gated slot. The call may wait for the next version only."""
    committed = bf16_client.status().committed_version
    with pytest.raises(InvalidArgumentError, match=rf"min_weight_version: {2**63} is beyond.*at most {committed + 1}"):
        bf16_client.generate(["hello"], max_tokens=2, min_weight_version=2**63, timeout=10)
    r = httpx.post(f"{bf16_server.http_url}/v1/completions", timeout=10,
                   json={"prompt": "hi", "max_tokens": 2, "min_weight_version": committed + 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "min_weight_version", r.text
