"""A stranger's idle and half-sent HTTP connections cannot take the server from its callers: 2,000 of
them leave /healthz and a trainer's call answering, and each is closed once its request head is
late (api/http_server.py). In-process over a test double of the backend (tests/api/test_guards.py)."""

from __future__ import annotations

import asyncio
import time

import pytest

from rollout_service.api.http_server import GuardedHttpProtocol, raise_open_file_limit
from tests.api.test_guards import KEYS, FrontEnds, make_config

IDLE = 2000  # connections that never send a byte
SLOW = 100  # connections sending a request head a byte a second
HEAD_TIMEOUT_S = 3.0


@pytest.fixture
def short_head_timeout(monkeypatch):
    monkeypatch.setattr(GuardedHttpProtocol, "head_timeout_s", HEAD_TIMEOUT_S)


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    try:
        return await asyncio.wait_for(reader.read(1), 0.5) == b""
    except TimeoutError:
        return False
    except ConnectionError:
        return True


@pytest.mark.reliability("load")
async def test_thousands_of_idle_connections_leave_health_and_a_trainer_answering(tiny_model, tmp_path, short_head_timeout, record_property):
    """2,000 idle HTTP connections and 100 sending a request head a byte a second, from a stranger:
    /healthz and a trainer's HTTP and gRPC calls still answer within seconds, and the server closes
    every one of them once its request head is late (the head timeout, 3 s here, 20 s by default)."""
    if raise_open_file_limit() < 2 * (IDLE + SLOW) + 200:  # both ends of every connection are in this process
        pytest.skip("the open-file limit is too low for this test")
    async with FrontEnds(make_config(tiny_model, tmp_path), None) as ends:
        port = int(ends.url.rsplit(":", 1)[1])
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(IDLE)]
        slow = [await asyncio.open_connection("127.0.0.1", port) for _ in range(SLOW)]
        head = b"GET /healthz HTTP/1.1\r\nhost: x\r\n"

        async def dribble(writer: asyncio.StreamWriter):
            for i in range(len(head)):  # never the blank line that ends the head
                writer.write(head[i : i + 1])
                await asyncio.sleep(1.0)

        dribblers = [asyncio.create_task(dribble(w)) for _, w in slow]
        opened = time.monotonic()
        try:
            async with ends.http_client(KEYS["trainer"]) as http:
                start = time.monotonic()
                assert (await http.get("/healthz")).status_code == 200
                reply = await http.post("/v1/generate", json={"prompts": [{"token_ids": [1, 2]}]})
                assert reply.status_code == 200 and len(reply.json()["completions"]) == 1, reply.text
                answered = time.monotonic() - start
                assert answered < 5.0
                record_property("idle / trickling connections held", f"{IDLE} / {SLOW}")
                record_property("/healthz and a trainer's generate answered in (s)", round(answered, 3))
            client = ends.client(KEYS["trainer"])  # gRPC too
            assert len(await client.generate(prompt_token_ids=[[1]])) == 1
            await client.close()
            # Past the head timeout the server has closed every one of them, the dribbling ones included.
            await asyncio.sleep(max(0.0, opened + HEAD_TIMEOUT_S + 1.0 - time.monotonic()))
            closed = await asyncio.gather(*(_closed_by_server(r) for r, _ in idle + slow))
            assert sum(closed) == IDLE + SLOW, f"{IDLE + SLOW - sum(closed)} connections still open"
            record_property("connections closed by the server after the head timeout", sum(closed))
        finally:
            for task in dribblers:
                task.cancel()
            for _, writer in idle + slow:
                writer.close()


async def test_a_keep_alive_connection_gets_the_head_timeout_again_after_each_response(tiny_model, tmp_path, short_head_timeout):
    async with FrontEnds(make_config(tiny_model, tmp_path), None) as ends:
        reader, writer = await asyncio.open_connection("127.0.0.1", int(ends.url.rsplit(":", 1)[1]))
        for _ in range(2):  # a request within the timeout is served, twice on one connection
            await asyncio.sleep(HEAD_TIMEOUT_S / 2)
            writer.write(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
            await reader.readuntil(b'"SERVING"}')
        await asyncio.sleep(HEAD_TIMEOUT_S + 1.0)
        assert await _closed_by_server(reader)
        writer.close()


async def test_one_peer_cannot_hold_more_than_its_connections_and_others_are_served(tiny_model, tmp_path, monkeypatch):
    """A stranger at 127.0.0.2 opens more connections than a peer may hold: the ones beyond are
    closed at once, while a trainer at 127.0.0.1 is served; idle connections are not requests, so
    they never make the server refuse one."""
    monkeypatch.setattr(GuardedHttpProtocol, "per_peer", 50)
    monkeypatch.setattr("rollout_service.api.http_app.MAX_HTTP_REQUESTS", 20)  # below the stranger's 50 idle ones
    async with FrontEnds(make_config(tiny_model, tmp_path), None) as ends:
        port = int(ends.url.rsplit(":", 1)[1])
        stranger = [await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0)) for _ in range(60)]
        try:
            closed = await asyncio.gather(*(_closed_by_server(r) for r, _ in stranger))
            assert sum(closed) == 10, f"{sum(closed)} of the stranger's 60 connections closed, not the 10 beyond 50"
            async with ends.http_client(KEYS["trainer"]) as http:
                assert (await http.get("/healthz")).status_code == 200
                reply = await http.post("/v1/generate", json={"prompts": [{"token_ids": [1, 2]}]})
                assert reply.status_code == 200, reply.text
        finally:
            for _, writer in stranger:
                writer.close()


async def test_requests_beyond_the_limit_are_429_but_health_answers(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr("rollout_service.api.http_app.MAX_HTTP_REQUESTS", 2)
    async with FrontEnds(make_config(tiny_model, tmp_path), None) as ends:
        ends.backend.open.clear()  # generates stay in the backend until it opens
        async with ends.http_client(KEYS["trainer"]) as http:
            held = [asyncio.create_task(http.post("/v1/generate", json={"prompts": [{"token_ids": [1]}]})) for _ in range(2)]
            while ends.backend.generate_calls < 2:
                await asyncio.sleep(0.01)
            reply = await http.post("/v1/generate", json={"prompts": [{"token_ids": [1]}]})
            assert reply.status_code == 429 and "HTTP requests" in reply.text, reply.text
            assert (await http.get("/healthz")).status_code == 200
            ends.backend.open.set()
            assert all(r.status_code == 200 for r in await asyncio.gather(*held))
            assert (await http.post("/v1/generate", json={"prompts": [{"token_ids": [1]}]})).status_code == 200


async def test_a_body_on_a_route_that_reads_none_is_refused_not_buffered(tiny_model, tmp_path):
    """/healthz is open to strangers and /v1/status to any key: neither reads a body, so one of more
    than 64 KiB is refused (413) by its Content-Length, or as it streams, never buffered."""
    async with FrontEnds(make_config(tiny_model, tmp_path), None) as ends:
        async with ends.http_client(KEYS["eval"]) as http:
            for path in ("/healthz", "/v1/status"):
                reply = await http.request("GET", path, content=b"x" * (1 << 20))
                assert reply.status_code == 413 and "65536 bytes" in reply.text, reply.text

                async def streamed():
                    for _ in range(32):
                        yield b"x" * 4096

                reply = await http.request("GET", path, content=streamed())
                assert reply.status_code == 413, reply.text
