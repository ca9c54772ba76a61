"""Deadlines, disconnects and overload: the right code, the engine request aborted, nothing leaks."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from rollout_client import DeadlineExceededError, ResourceExhaustedError, RolloutClient

pytestmark = pytest.mark.engine

LONG = dict(max_tokens=230, temperature=1.0, ignore_eos=True)


def _wait_idle(client, timeout=30.0):
    """Until no call and no engine request is running; returns the counters."""
    deadline = time.monotonic() + timeout
    while True:
        c = client.status().counters
        if c.requests_running == 0 and c.engine_requests_running == 0 and c.sequences_running == 0:
            return c
        assert time.monotonic() < deadline, f"requests still running: {c}"
        time.sleep(0.1)


def test_expired_grpc_deadline_is_deadline_exceeded_and_aborts_engine_requests(bf16_client):
    before = _wait_idle(bf16_client)
    with pytest.raises(DeadlineExceededError):
        bf16_client.generate(["slow"], n=4, timeout=0.5, **LONG)
    after = _wait_idle(bf16_client)
    assert after.prompts_aborted == before.prompts_aborted + 1
    bf16_client.generate(["next"], max_tokens=2)


def test_http_timeout_header_is_504_and_aborts_engine_requests(bf16_server, bf16_client):
    before = _wait_idle(bf16_client)
    body = {"prompts": [{"text": "slow"}, {"text": "slower"}], "sampling": {**LONG, "n": 2}}
    r = httpx.post(f"{bf16_server.http_url}/v1/generate", json=body, headers={"X-Request-Timeout": "0.5"}, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["code"] == "DEADLINE_EXCEEDED", r.text
    after = _wait_idle(bf16_client)
    assert after.prompts_aborted == before.prompts_aborted + 2


def test_http_client_disconnect_aborts_engine_requests(bf16_server, bf16_client):
    before = _wait_idle(bf16_client)
    body = json.dumps({"prompts": [{"text": "abandoned"}], "sampling": {**LONG, "n": 4}}).encode()
    host, port = bf16_server.http_url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(
            b"POST /v1/generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
        )
        deadline = time.monotonic() + 30
        while bf16_client.status().counters.sequences_running < 4:  # the call is in the engine
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
    # The socket is closed: the server must notice and abort the engine requests.
    after = _wait_idle(bf16_client)
    assert after.prompts_aborted == before.prompts_aborted + 1
    assert after.tokens_generated == before.tokens_generated  # nothing was completed


def test_grpc_stream_closed_by_client_aborts_remaining_engine_requests(bf16_client):
    before = _wait_idle(bf16_client)
    # Prompt 0 nearly fills the 256-token context, so it ends (finish "length") after a few tokens.
    stream = bf16_client.generate_stream(prompt_token_ids=[[5] * 250, [6] * 3], **LONG)
    first = next(stream)
    assert first.prompt_index == 0 and first.samples[0].finish_reason == "length"
    stream.close()
    after = _wait_idle(bf16_client)
    assert after.prompts_aborted == before.prompts_aborted + 1
    assert after.tokens_generated < before.tokens_generated + 100


def test_beyond_inflight_limit_is_resource_exhausted_and_later_calls_succeed(bf16_server, bf16_client):
    """The bf16 test server allows 48 in-flight sequences."""
    _wait_idle(bf16_client)
    background = RolloutClient(bf16_server.grpc_address, timeout=8)

    def fill():
        with pytest.raises(DeadlineExceededError):  # ends the 40 long sequences early
            background.generate(["fill"], n=40, **LONG)

    thread = threading.Thread(target=fill)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while bf16_client.status().counters.sequences_running < 40:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        rejected_before = bf16_client.status().counters.requests_rejected_overload
        with pytest.raises(ResourceExhaustedError, match="max_inflight_sequences=48"):
            bf16_client.generate(["one more"], n=9, max_tokens=2, temperature=1.0)
        assert bf16_client.status().counters.requests_rejected_overload == rejected_before + 1
        bf16_client.generate(["fits"], n=8, max_tokens=2, temperature=1.0)  # 40 + 8 <= 48
    finally:
        thread.join()
        background.close()
    _wait_idle(bf16_client)
    bf16_client.generate(["after"], n=20, max_tokens=2, temperature=1.0)
