"""Deadlines, disconnects and overload: the right code, the engine request aborted, nothing leaks."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from rollout_client import DeadlineExceededError, InvalidArgumentError, ResourceExhaustedError
from tests.observe import InBackground, held, step, wait_until

pytestmark = pytest.mark.engine

LONG = dict(max_tokens=230, temperature=1.0, ignore_eos=True)


def _wait_idle(client):
    """Until no call and no engine request is running; returns the counters."""
    box = {}

    def idle() -> bool:
        box["c"] = c = client.status().counters
        return c.requests_running == 0 and c.engine_requests_running == 0 and c.sequences_running == 0

    wait_until(idle, "no call and no engine request running")
    return box["c"]


def _in_engine(client, count: int) -> bool:
    return client.status().counters.engine_requests_running >= count


# Generation is held before each call below, so the call waits in the engine and cannot finish
# before its deadline or disconnect, however fast the machine. (The deadlines leave a slow machine
# time to get the requests into the engine; a prompt cancelled before that counts as aborted too.)


def test_expired_grpc_deadline_is_deadline_exceeded_and_aborts_engine_requests(bf16_server, bf16_client):
    before = _wait_idle(bf16_client)
    with held(bf16_server):
        with pytest.raises(DeadlineExceededError):
            bf16_client.generate(["slow"], n=4, timeout=2, **LONG)
        after = _wait_idle(bf16_client)
    assert after.prompts_aborted == before.prompts_aborted + 1
    bf16_client.generate(["next"], max_tokens=2)


def test_http_timeout_header_is_504_and_aborts_engine_requests(bf16_server, bf16_client):
    before = _wait_idle(bf16_client)
    body = {"prompts": [{"text": "slow"}, {"text": "slower"}], "sampling": {**LONG, "n": 2}}
    with held(bf16_server):
        r = httpx.post(f"{bf16_server.http_url}/v1/generate", json=body, headers={"X-Request-Timeout": "2"}, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "DEADLINE_EXCEEDED", r.text
        after = _wait_idle(bf16_client)
    assert after.prompts_aborted == before.prompts_aborted + 2


def test_http_client_disconnect_aborts_engine_requests(bf16_server, bf16_client):
    before = _wait_idle(bf16_client)
    body = json.dumps({"prompts": [{"text": "abandoned"}], "sampling": {**LONG, "n": 4}}).encode()
    host, port = bf16_server.http_url.removeprefix("http://").rsplit(":", 1)
    with held(bf16_server):
        with socket.create_connection((host, int(port))) as conn:
            conn.sendall(
                b"POST /v1/generate HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            )
            wait_until(lambda: _in_engine(bf16_client, 4), "the call's 4 samples in the engine")
        # The socket is closed: the server must notice and abort the engine requests.
        after = _wait_idle(bf16_client)
    assert after.prompts_aborted == before.prompts_aborted + 1
    assert after.tokens_generated == before.tokens_generated  # nothing was completed


def test_grpc_stream_closed_by_client_aborts_remaining_engine_requests(bf16_server, bf16_client):
    before = _wait_idle(bf16_client)
    # Prompt 0 leaves one token of the 256-token context, so it ends (finish "length") at the first
    # step; both prompts wait in the held engine, then run for just that step (step(): decided in the server) and
    # are held again, with 229 steps to go for prompt 1.
    stream = bf16_client.generate_stream(prompt_token_ids=[[5] * 255, [6] * 3], **LONG)
    with held(bf16_server):
        first = InBackground(lambda: next(stream))
        wait_until(lambda: _in_engine(bf16_client, 2), "both prompts in the engine")
        step(bf16_server)
        first = first.outcome()
        assert bf16_client.status().counters.engine_requests_running == 1
        stream.close()
        after = _wait_idle(bf16_client)
    assert first.prompt_index == 0 and first.samples[0].finish_reason == "length"
    assert after.prompts_aborted == before.prompts_aborted + 1
    assert after.tokens_generated == before.tokens_generated + len(first.samples[0].token_ids)


def test_a_batch_beyond_the_inflight_limit_runs_in_parts_in_prompt_order(bf16_server, bf16_client):
    """The bf16 test server holds 48 sequences at once; generation is held, so the first part stays
    in the engine while the rest of the batch waits for room."""
    _wait_idle(bf16_client)
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(25)]  # x n=4: 100 sequences
    with held(bf16_server):
        batch = InBackground(lambda: bf16_client.generate(prompt_token_ids=prompts, n=4, max_tokens=2, temperature=1.0))
        wait_until(lambda: bf16_client.status().counters.sequences_running == 48, "48 sequences in the engine")
        assert bf16_client.status().counters.sequences_waiting == 52
    completions = batch.outcome()
    assert [c.prompt_token_ids for c in completions] == prompts
    assert all(len(c.samples) == 4 and all(len(s.token_ids) == 2 for s in c.samples) for c in completions)
    assert _wait_idle(bf16_client).sequences_waiting == 0


def test_a_deadline_on_a_batch_in_parts_frees_its_running_and_its_waiting_sequences(bf16_server, bf16_client):
    """Generation is held: 48 of the 100 sequences sit in the engine and 52 wait for room when the
    deadline passes (20 s: a bound on admitting 25 prompts, which the check below observes first)."""
    before = _wait_idle(bf16_client)
    prompts = [[10 + i, 20 + i, 30 + i] for i in range(25)]  # x n=4: 100 sequences
    with held(bf16_server):
        batch = InBackground(lambda: bf16_client.generate(prompt_token_ids=prompts, n=4, timeout=20, **LONG))
        wait_until(lambda: (c := bf16_client.status().counters).sequences_running == 48 and c.sequences_waiting == 52,
                   "48 sequences in the engine and 52 waiting")
        with pytest.raises(DeadlineExceededError):
            batch.outcome()
        after = _wait_idle(bf16_client)
    assert (after.sequences_running, after.sequences_waiting) == (0, 0)
    assert after.prompts_aborted == before.prompts_aborted + 25  # waiting prompts count too
    assert len(bf16_client.generate(prompt_token_ids=prompts, n=4, max_tokens=2)) == 25  # all room is back


def test_a_full_server_is_resource_exhausted_and_later_calls_succeed(bf16_server, bf16_client):
    """Generation is held, so the 48 sequences that fill the server stay in flight until the
    checks are done; a call arriving then is refused at once (a retry helps)."""
    _wait_idle(bf16_client)
    short = dict(max_tokens=2, temperature=1.0)
    with held(bf16_server):
        fill = InBackground(lambda: bf16_client.generate(["fill"], n=48, **short))
        wait_until(lambda: bf16_client.status().counters.sequences_running == 48, "48 sequences in flight")
        rejected_before = bf16_client.status().counters.requests_rejected_overload
        with pytest.raises(ResourceExhaustedError, match=r"full \(48 sequences in flight and 0 waiting, at most max_inflight_sequences=48\); retry"):
            bf16_client.generate(["one more"], n=1, **short)
        assert bf16_client.status().counters.requests_rejected_overload == rejected_before + 1
    assert len(fill.outcome()[0].samples) == 48
    _wait_idle(bf16_client)
    bf16_client.generate(["after"], n=20, **short)


def test_more_samples_of_one_prompt_than_ever_fit_is_invalid_argument(bf16_client):
    with pytest.raises(InvalidArgumentError, match=r"sampling.n.*49 samples of one prompt can never fit.*=48"):
        bf16_client.generate(["too many"], n=49, max_tokens=2)
