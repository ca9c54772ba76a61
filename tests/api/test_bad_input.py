"""Every bad input gets INVALID_ARGUMENT (HTTP 400) naming the field and value; the server keeps serving."""

from __future__ import annotations

import grpc
import httpx
import pytest

from rollout_client import InvalidArgumentError

pytestmark = pytest.mark.engine

# name -> (HTTP JSON body, client kwargs, field the error must name, text the message must contain)
CASES = {
    "empty batch": ({"prompts": []}, dict(prompts=[]), "prompts", "at least 1"),
    "prompt longer than context": (
        {"prompts": [{"text": "ok"}, {"token_ids": [7] * 300}]},
        dict(prompts=["ok"], prompt_token_ids=[[7] * 300]),
        "prompts[1]", "max_model_len=256",
    ),
    "token id outside vocabulary": (
        {"prompts": [{"token_ids": [1, 2, 5000]}]}, dict(prompt_token_ids=[[1, 2, 5000]]),
        "prompts[0].token_ids[2]", "5000",
    ),
    "negative token id": (
        {"prompts": [{"token_ids": [-1]}]}, dict(prompt_token_ids=[[-1]]), "prompts[0].token_ids[0]", "-1",
    ),
    "negative temperature": (
        {"prompts": [{"text": "x"}], "sampling": {"temperature": -0.5}}, dict(prompts=["x"], temperature=-0.5),
        "sampling.temperature", "-0.5",
    ),
    "max_tokens below 1": (
        {"prompts": [{"text": "x"}], "sampling": {"max_tokens": 0}}, dict(prompts=["x"], max_tokens=0),
        "sampling.max_tokens", "0",
    ),
    "top_p zero": (
        {"prompts": [{"text": "x"}], "sampling": {"top_p": 0}}, dict(prompts=["x"], top_p=0.0),
        "sampling.top_p", "greater than 0",
    ),
    "top_p above one": (
        {"prompts": [{"text": "x"}], "sampling": {"top_p": 1.5}}, dict(prompts=["x"], top_p=1.5),
        "sampling.top_p", "1.5",
    ),
    "stop token outside vocabulary": (
        {"prompts": [{"text": "x"}], "sampling": {"stop_token_ids": [3, 99999]}},
        dict(prompts=["x"], stop_token_ids=[3, 99999]), "sampling.stop_token_ids[1]", "99999",
    ),
    "allowed token outside vocabulary": (
        {"prompts": [{"text": "x"}], "sampling": {"allowed_token_ids": [3, 4096]}},
        dict(prompts=["x"], allowed_token_ids=[3, 4096]), "sampling.allowed_token_ids[1]", "4096",
    ),
    "logit bias for a token outside vocabulary": (
        {"prompts": [{"text": "x"}], "sampling": {"logit_bias": {"70000": 1.0}}},
        dict(prompts=["x"], logit_bias={70000: 1.0}), "sampling.logit_bias[70000]", "70000",
    ),
    "min_tokens above max_tokens": (
        {"prompts": [{"text": "x"}], "sampling": {"min_tokens": 9, "max_tokens": 4}},
        dict(prompts=["x"], min_tokens=9, max_tokens=4), "sampling.min_tokens", "max_tokens=4",
    ),
    "min_tokens with only stop tokens allowed": (
        {"prompts": [{"text": "x"}], "sampling": {"min_tokens": 2, "allowed_token_ids": [3, 4], "stop_token_ids": [3, 4]}},
        dict(prompts=["x"], min_tokens=2, allowed_token_ids=[3, 4], stop_token_ids=[3, 4]), "sampling.min_tokens",
        "nothing could be sampled",
    ),
    "too many logprobs": (
        {"prompts": [{"text": "x"}], "sampling": {"logprobs": 50}}, dict(prompts=["x"], logprobs=50),
        "sampling.logprobs", "max_logprobs=20",
    ),
    "greedy with n > 1": (
        {"prompts": [{"text": "x"}], "sampling": {"n": 3, "temperature": 0}}, dict(prompts=["x"], n=3, temperature=0.0),
        "sampling.n", "n=3",
    ),
    "stop strings without detokenizing": (
        {"prompts": [{"text": "x"}], "sampling": {"stop": ["."], "detokenize": False}},
        dict(prompts=["x"], stop=["."], detokenize=False), "sampling.stop", "detokenize=true",
    ),
    "prompt with neither text nor ids": ({"prompts": [{}]}, dict(prompts=[""]), "prompts[0]", "exactly one"),
}


def _still_serves(client):
    out = client.generate(["still here"], max_tokens=3, temperature=0.0)
    assert len(out[0].samples[0].token_ids) >= 1


@pytest.mark.parametrize("name", list(CASES))
def test_grpc_bad_input_is_invalid_argument_naming_the_field(bf16_client, name):
    _, kwargs, field, text = CASES[name]
    kwargs = dict(kwargs)
    with pytest.raises(InvalidArgumentError) as info:
        bf16_client.generate(kwargs.pop("prompts", None), kwargs.pop("prompt_token_ids", None), **kwargs)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details.startswith(field + ":"), info.value.details
    assert text in info.value.details
    _still_serves(bf16_client)


@pytest.mark.parametrize("name", list(CASES))
def test_http_bad_input_is_400_naming_the_field(bf16_server, bf16_client, name):
    body, _, field, text = CASES[name]
    r = httpx.post(f"{bf16_server.http_url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "INVALID_ARGUMENT" and error["field"] == field, error
    assert text in error["message"]
    _still_serves(bf16_client)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompts": [{"text": "x"}], "sampling": {"temprature": 1.0}}, "sampling.temprature"),
        ({"prompts": [{"text": "x", "lang": "en"}]}, "prompts[0].lang"),
        ({"prompts": [{"text": "x"}], "extra": 1}, "extra"),
    ],
)
def test_http_unknown_field_is_400_naming_it(bf16_server, bf16_client, body, field):
    r = httpx.post(f"{bf16_server.http_url}/v1/generate", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["field"] == field, r.text
    assert "Extra inputs are not permitted" in r.json()["error"]["message"]
    _still_serves(bf16_client)


def test_http_malformed_json_is_400(bf16_server):
    r = httpx.post(f"{bf16_server.http_url}/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_ARGUMENT", r.text


def test_client_rejects_unknown_sampling_parameter_before_sending(bf16_client):
    with pytest.raises(TypeError, match="temprature"):
        bf16_client.generate(["x"], temprature=1.0)
