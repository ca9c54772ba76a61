"""Bodies a hostile caller sends get a client error naming the field, never a 500, on /v1/generate
and the OpenAI routes: integers past Python's 4,300-digit limit, token ids past int32 in an OpenAI
prompt, versions past uint64, logit bias keys of thousands of digits, megabyte ids. In-process over a
test double of the backend (tests/api/test_guards.py); the engine-backed fuzzing is
tests/api/test_fuzz_generate.py."""

from __future__ import annotations

import json

import httpx
import pytest

from rollout_service.api.access import Access
from rollout_service.api.http_app import create_app
from rollout_service.observe.metrics import Metered
from tests.api.test_guards import KEYS, RecordingBackendDouble, make_config

CHAT = {"messages": [{"role": "user", "content": "hi"}]}
CASES = {  # name -> (path, body, the field the error names)
    "an integer of 5,000 digits in /v1/generate": (
        "/v1/generate", b'{"prompts": [{"token_ids": [' + b"1" * 5000 + b"]}]}", "body"),
    "an integer of 5,000 digits in /v1/completions": (
        "/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"1" * 5000 + b"}", "body"),
    "a token id past int32 in a completions prompt": (
        "/v1/completions", json.dumps({"prompt": [[2**40]]}).encode(), "prompt[0].token_ids"),
    "min_weight_version past uint64 in a completion": (
        "/v1/completions", json.dumps({"prompt": "x", "min_weight_version": 2**70}).encode(), "min_weight_version"),
    "max_staleness past uint32 in a completion": (
        "/v1/completions", json.dumps({"prompt": "x", "max_staleness": 2**40}).encode(), "max_staleness"),
    "min_weight_version past uint64 in a chat": (
        "/v1/chat/completions", json.dumps({**CHAT, "min_weight_version": 2**70}).encode(), "min_weight_version"),
    "a logit bias key of 5,000 digits": (
        "/v1/completions", json.dumps({"prompt": "x", "logit_bias": {"1" * 5000: 1.0}}).encode(), "logit_bias[" + "1" * 40 + "...]"),
    "a request id of a megabyte": (
        "/v1/generate", json.dumps({"prompts": [{"text": "x"}], "request_id": "r" * (1 << 20)}).encode(), "request_id"),
    "a stop string of 2,000 characters": (
        "/v1/generate", json.dumps({"prompts": [{"text": "x"}], "sampling": {"stop": ["s" * 2000]}}).encode(), "sampling.stop[0]"),
    "a temperature vLLM would raise to 0.01": (
        "/v1/completions", json.dumps({"prompt": "x", "temperature": 0.001}).encode(), "temperature"),
}


@pytest.fixture
async def http(tiny_model, tmp_path):
    config = make_config(tiny_model, tmp_path)
    app = create_app(Metered(RecordingBackendDouble(config)), Access.from_config(config))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://x",
                                 headers={"authorization": f"Bearer {KEYS['trainer']}"}) as client:
        yield client


@pytest.mark.parametrize("name", list(CASES))
async def test_a_hostile_body_is_a_400_naming_its_field(http, name):
    path, body, field = CASES[name]
    reply = await http.post(path, content=body, headers={"content-type": "application/json"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error.get("field", error.get("param")) == field, error
    assert len(reply.text) < 1000  # the offending value is shown by its start, never whole
