"""The front ends' guards (keys and roles, TLS, limits) on both protocols, in-process over a test
double of the backend: a unit test of the API layer (the engine-backed server is tests/api/test_security.py).
"""

from __future__ import annotations

from array import array
import asyncio
import contextlib
import json
import struct
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rollout_client import (
    AsyncRolloutClient,
    InvalidArgumentError,
    NO_RETRY,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

from rollout_service.api.access import Access
from rollout_service.api.grpc_server import create_server
from rollout_service.api.http_app import create_app
from rollout_service.config import ServerConfig
from rollout_service.api.http_server import start_http
from rollout_service.observe.metrics import Metered
from rollout_service.types import Completion, Counters, PushResult, Sample, ServerStatus
from tests.tls import Pki

KEYS = {"trainer": "trainer-key-0123456789abcdef", "eval": "eval-key-0123456789abcdef", "admin": "admin-key-0123456789abcdef"}
OTHER_TRAINER = "trainer-two-0123456789abcdef"


class RecordingBackendDouble:
    """Test double of api.backend.Backend: records the calls that get through the guards, and can
    hold generation so calls stay running."""

    def __init__(self, config: ServerConfig):
        self.config = config
        self.generate_calls = 0
        self.commits = 0
        self.declared: list[str] = []
        self.open = asyncio.Event()
        self.open.set()

    async def generate(self, req):
        self.generate_calls += 1
        await self.open.wait()
        for i, prompt in enumerate(req.prompts):
            sample = Sample([5, 6], "ab", [-0.5, -0.25], "length", self.commits)
            yield Completion(i, prompt.token_ids or array("i", [1]), [sample] * req.sampling.n)

    async def status(self) -> ServerStatus:
        return ServerStatus("double", "none", "bfloat16", self.commits, 256, 100, "processed", False, 64, "-", 0.0,
                            Counters(), "drain")

    @contextlib.asynccontextmanager
    async def begin_push(self, read_header):
        double = self
        header = await read_header()

        class Session:
            path = "stream"
            committed = False
            bytes_received = 0

            def __init__(self):
                self.header = header

            def declare(self, specs):
                double.declared += [s.name for s in specs]

            async def add_chunk(self, index, offset, data):
                pass

            async def add_shared(self, index, data):
                pass

        self.declared += [t.name for t in header.tensors]
        yield Session()

    async def commit_push(self, session) -> PushResult:
        self.commits += 1
        session.committed = True
        return PushResult(self.commits, 0, len(self.declared), 0, 0, 0, 0)

    async def check_health(self):
        pass

    async def engine_metrics(self):
        return []


class FrontEnds:
    """gRPC and HTTP servers of one config over a RecordingBackendDouble, on this loop."""

    def __init__(self, config: ServerConfig, pki: Pki | None):
        self.config, self.pki = config, pki
        self.backend = RecordingBackendDouble(config)

    async def __aenter__(self):
        metered = Metered(self.backend)
        self.access = access = Access.from_config(self.config)
        self.grpc, grpc_port = await create_server(metered, self.config, access)
        self.http, self.http_task, http_port = await start_http(create_app(metered, access), self.config)
        self.grpc_address = f"127.0.0.1:{grpc_port}"
        scheme = "https" if self.pki else "http"
        self.url = f"{scheme}://127.0.0.1:{http_port}"
        return self

    async def __aexit__(self, *exc):
        await self.grpc.stop(0)
        self.http.should_exit = True
        await self.http_task

    def client(self, key: str | None = None, certificate: bool = True) -> AsyncRolloutClient:
        tls = {}
        if self.pki:
            tls = {"root_certificates": self.pki.ca}
            if certificate:
                tls |= {"client_certificate": self.pki.client_cert, "client_key": self.pki.client_key}
        return AsyncRolloutClient(self.grpc_address, timeout=20, retry=NO_RETRY, api_key=key, **tls)

    def http_client(self, key: str | None = None, certificate: bool = True) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        verify = self.pki.client_context(certificate) if self.pki else True
        return httpx.AsyncClient(base_url=self.url, headers=headers, verify=verify, timeout=20)


def make_config(tiny_model: Path, tmp_path: Path, pki: Pki | None = None, **limits) -> ServerConfig:
    keys = tmp_path / "keys"
    keys.write_text("".join(f"{role}:{key}\n" for role, key in KEYS.items()) + f"trainer:{OTHER_TRAINER}\n")
    tls = {}
    if pki:
        tls = {"tls_cert": pki.server_cert, "tls_key": pki.server_key, "tls_client_ca": pki.ca}
    return ServerConfig(model=tiny_model, port=0, http_port=0, api_keys=keys, max_model_len=256, **tls, **limits)


@pytest.fixture
async def plain(tiny_model, tmp_path):
    config = make_config(
        tiny_model, tmp_path, max_prompts_per_call=4, max_samples_per_call=8, max_prompt_tokens=16,
        max_tokens_per_sample=32, max_request_mib=1, max_request_mib_per_key=1, max_push_mib=1, max_concurrent_generates_per_key=2,
        max_concurrent_pushes_per_key=1, push_idle_timeout_s=1.0,
    )
    async with FrontEnds(config, None) as ends:
        yield ends


def weights(nbytes: int = 64) -> dict[str, np.ndarray]:
    return {"model.embed_tokens.weight": np.zeros(nbytes // 4, np.float32)}


def safetensors_body(declared_bytes: int, sent: int | None = None) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": [declared_bytes // 4], "data_offsets": [0, declared_bytes]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(declared_bytes if sent is None else sent)


# --- keys and roles ----------------------------------------------------------------------------

async def test_each_role_on_grpc_gets_exactly_its_calls(plain):
    for role, key in KEYS.items():
        client = plain.client(key)
        assert len(await client.generate(prompt_token_ids=[[1, 2]], max_tokens=2)) == 1
        assert (await client.status()).weight_version >= 0
        if role == "eval":
            with pytest.raises(PermissionDeniedError, match="role 'eval' may not push; roles that may: trainer, admin"):
                await client.push_weights(weights())
        else:
            assert (await client.push_weights(weights())).version >= 1
        await client.close()


async def test_without_a_key_or_with_an_unknown_one_grpc_is_unauthenticated_but_health_answers(plain):
    commits = plain.backend.commits
    for key in (None, "not-a-known-key-at-all"):
        client = plain.client(key)
        for call in (client.status(), client.generate(prompt_token_ids=[[1]]), client.push_weights(weights())):
            with pytest.raises(UnauthenticatedError):
                await call
        await client.close()
    assert plain.backend.commits == commits
    async with grpc.aio.insecure_channel(plain.grpc_address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_each_role_on_http_gets_exactly_its_paths(plain):
    body = safetensors_body(64)
    expect = {
        # path: statuses for (no key, trainer, eval, admin)
        ("POST", "/v1/generate"): (401, 200, 200, 200),
        ("POST", "/v1/weights"): (401, 200, 403, 200),
        ("GET", "/v1/status"): (401, 200, 200, 200),
        ("GET", "/metrics"): (401, 200, 200, 200),
        ("GET", "/openapi.json"): (401, 403, 403, 200),
        ("GET", "/healthz"): (200, 200, 200, 200),
    }
    for (method, path), statuses in expect.items():
        for key, status in zip((None, KEYS["trainer"], KEYS["eval"], KEYS["admin"]), statuses):
            async with plain.http_client(key) as http:
                if path == "/v1/generate":
                    reply = await http.post(path, json={"prompts": [{"token_ids": [1, 2]}]})
                elif path == "/v1/weights":
                    reply = await http.post(path, content=body)
                else:
                    reply = await http.request(method, path)
            assert reply.status_code == status, (method, path, key and key[:5], reply.text)
            if status == 401:
                assert reply.headers["www-authenticate"] == "Bearer"
                assert reply.json()["error"]["code"] == "UNAUTHENTICATED"


async def test_a_refused_call_never_reaches_the_backend(plain):
    calls = plain.backend.generate_calls
    async with plain.http_client(None) as http:
        await http.post("/v1/generate", json={"prompts": [{"token_ids": [1]}]})
    client = plain.client("wrong-key-0123456789abcdef")
    with pytest.raises(UnauthenticatedError):
        await client.generate(prompt_token_ids=[[1]])
    await client.close()
    assert plain.backend.generate_calls == calls


# --- limits ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "call, field",
    [
        (dict(prompt_token_ids=[[1]] * 5), "prompts"),
        (dict(prompt_token_ids=[[1]] * 3, n=3), "sampling.n"),
        (dict(prompt_token_ids=[[1] * 17]), "prompts[0].token_ids"),
        (dict(prompts=["x" * (16 * 64 + 1)]), "prompts[0].text"),
        (dict(prompt_token_ids=[[1]], max_tokens=33), "sampling.max_tokens"),
    ],
)
async def test_each_generate_limit_is_invalid_argument_naming_its_field(plain, call, field):
    calls = plain.backend.generate_calls
    client = plain.client(KEYS["trainer"])
    with pytest.raises(InvalidArgumentError, match=f"^INVALID_ARGUMENT: {field.replace('[', '.').replace(']', '.')}"):
        await client.generate(**call)
    await client.close()
    body = {"prompts": [{"text": t} for t in call.get("prompts", [])] + [{"token_ids": t} for t in call.get("prompt_token_ids", [])],
            "sampling": {k: v for k, v in call.items() if k in ("n", "max_tokens")}}
    async with plain.http_client(KEYS["trainer"]) as http:
        reply = await http.post("/v1/generate", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["field"] == field
    assert plain.backend.generate_calls == calls


async def test_bodies_and_pushes_over_their_limits_are_413_or_resource_exhausted(plain):
    declared = plain.backend.declared[:]
    async with plain.http_client(KEYS["trainer"]) as http:
        big = {"prompts": [{"token_ids": [1]}], "request_id": "x" * (1024 * 1024)}
        assert (await http.post("/v1/generate", json=big)).status_code == 413
        # Without Content-Length (chunked), counted as it streams.
        async def chunks():
            for _ in range(3):
                yield b" " * (512 * 1024)
        assert (await http.post("/v1/generate", content=chunks())).status_code == 413
        reply = await http.post("/v1/weights", content=safetensors_body(2 * 1024 * 1024, sent=0))
        assert reply.status_code == 413 and "max_push_mib" in reply.text
        reply = await http.post("/v1/weights", content=safetensors_body(2 * 1024 * 1024))
        assert reply.status_code == 413
    client = plain.client(KEYS["trainer"])
    with pytest.raises(ResourceExhaustedError, match="max_push_mib"):
        await client.push_weights(weights(2 * 1024 * 1024))
    await client.close()
    assert plain.backend.declared == declared


async def until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"not reached in {timeout} s: {what}"
        await asyncio.sleep(0.01)


async def test_per_key_concurrency_caps_hold_and_free_with_the_call(plain):
    from rollout_service.api.access import Operation

    name = plain.access.authorize(f"Bearer {KEYS['trainer']}", Operation.GENERATE).name
    running = lambda: plain.access._running[(name, Operation.GENERATE)]  # noqa: E731
    plain.backend.open.clear()  # every call stays in the backend until it opens
    first, other = plain.client(KEYS["trainer"]), plain.client(OTHER_TRAINER)
    unary = asyncio.create_task(first.generate(prompt_token_ids=[[1]]))
    stream = asyncio.create_task(anext(aiter(first.generate_stream(prompt_token_ids=[[1]]))))
    await until(lambda: running() == 2, "both calls hold a slot")
    with pytest.raises(ResourceExhaustedError, match="per-key limit"):
        await first.generate(prompt_token_ids=[[1]])
    async with plain.http_client(KEYS["trainer"]) as http:
        reply = await http.post("/v1/generate", json={"prompts": [{"token_ids": [1]}]})
        assert reply.status_code == 429, reply.text
    other_call = asyncio.create_task(other.generate(prompt_token_ids=[[1]]))  # another key: its own slots
    await until(lambda: plain.backend.generate_calls >= 3, "the other key's call admitted")
    for call in (unary, stream):  # cancelled calls, unary and streaming, give their slots back
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await call
    await until(lambda: running() == 0, "the cancelled calls' slots freed")
    again = asyncio.create_task(first.generate(prompt_token_ids=[[1]]))
    await until(lambda: running() == 1, "a new call of the same key admitted")
    plain.backend.open.set()
    assert len(await again) == 1 and len(await other_call) == 1
    await until(lambda: running() == 0, "finished calls' slots freed")
    await first.close()
    await other.close()


async def test_a_key_s_generate_bytes_in_flight_are_capped_before_the_request_is_parsed(tiny_model, tmp_path):
    """max_request_mib_per_key=1: one call of 0.6 MiB held in the backend, a second of 0.6 MiB from
    the same key is refused (gRPC and HTTP) before its message is parsed; another key's is not."""
    config = make_config(tiny_model, tmp_path, max_request_mib=1, max_request_mib_per_key=1)
    async with FrontEnds(config, None) as plain:
        await _bytes_capped(plain)


async def _bytes_capped(plain):
    plain.backend.open.clear()
    first, other = plain.client(KEYS["trainer"]), plain.client(OTHER_TRAINER)
    big = [[7] * 40] * 15_000  # 0.63 MiB as a protobuf message; 6,500 of them 0.6 MiB as JSON
    held = asyncio.create_task(first.generate(prompt_token_ids=big))
    await until(lambda: plain.backend.generate_calls == 1, "the first call held in the backend")
    with pytest.raises(ResourceExhaustedError, match="max_request_mib_per_key=1"):
        await first.generate(prompt_token_ids=big)
    async with plain.http_client(KEYS["trainer"]) as http:
        reply = await http.post("/v1/generate", json={"prompts": [{"token_ids": ids} for ids in big[:6_500]]})
        assert reply.status_code == 429 and "max_request_mib_per_key" in reply.text, reply.text
    assert plain.backend.generate_calls == 1
    other_call = asyncio.create_task(other.generate(prompt_token_ids=big))  # another key's bytes are its own
    await until(lambda: plain.backend.generate_calls == 2, "the other key's call admitted")
    plain.backend.open.set()
    await held
    await other_call
    assert len(await first.generate(prompt_token_ids=big)) == len(big)  # the bytes came back with the call
    await first.close()
    await other.close()


async def test_a_push_whose_sender_goes_silent_is_aborted_and_applies_nothing(plain):
    from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
    from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

    commits = plain.backend.commits
    spec = pb.TensorSpec(name="model.norm.weight", dtype="float32", shape=[16], nbytes=64)

    async def silent_after_header():
        yield pb.PushWeightsRequest(header=pb.PushHeader(tensors=[spec]))
        await asyncio.sleep(4)  # well past push_idle_timeout_s

    async with grpc.aio.insecure_channel(plain.grpc_address) as channel:
        stub = pb_grpc.RolloutServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PushWeights(silent_after_header(), metadata=(("authorization", f"Bearer {KEYS['trainer']}"),), timeout=20)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "push_idle_timeout_s" in info.value.details()

    async def silent_body():
        yield safetensors_body(64)[:20]
        await asyncio.sleep(4)  # well past push_idle_timeout_s

    async with plain.http_client(KEYS["trainer"]) as http:
        reply = await http.post("/v1/weights", content=silent_body())
    assert reply.status_code == 504 and "push_idle_timeout_s" in reply.text
    assert plain.backend.commits == commits
    client = plain.client(KEYS["trainer"])  # the per-key push slot was given back
    assert (await client.push_weights(weights())).version == commits + 1
    await client.close()


async def test_a_push_declaring_too_many_tensors_or_a_huge_header_is_refused_before_it_is_parsed(plain):
    """At most 1,024 tensors (twice the checkpoint's, at least 1,024) and a safetensors header of at
    most 1 MiB (8x the checkpoint's, at least 1 MiB): refused as they are announced, nothing parsed."""
    from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
    from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

    specs = [pb.TensorSpec(name=f"t{i}", dtype="float32", shape=[1], nbytes=4) for i in range(1025)]
    for messages in ([pb.PushWeightsRequest(header=pb.PushHeader(tensors=specs))],
                     [pb.PushWeightsRequest(header=pb.PushHeader(tensors=specs[:1])),
                      pb.PushWeightsRequest(declare=pb.PushDeclare(tensors=specs[1:]))]):
        async with grpc.aio.insecure_channel(plain.grpc_address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await pb_grpc.RolloutServiceStub(channel).PushWeights(
                    iter(messages), metadata=(("authorization", f"Bearer {KEYS['trainer']}"),), timeout=20)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "1025 tensors" in info.value.details()
    async with plain.http_client(KEYS["trainer"]) as http:
        reply = await http.post("/v1/weights", content=struct.pack("<Q", 2 << 20) + b"{")
    assert reply.status_code == 413 and "safetensors header of 2097152 bytes" in reply.text, reply.text
    assert plain.backend.declared == ["t0"] and plain.backend.commits == 0  # the second push's first header only


async def test_a_push_or_body_that_trickles_in_under_the_idle_timeout_is_aborted(plain):
    """A byte every 0.4 s never trips push_idle_timeout_s (1 s), but the sender's waiting in all is
    bounded by 1 s plus its bytes at 1 MiB/s: gRPC pushes, HTTP pushes and Generate bodies alike."""
    from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
    from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

    commits = plain.backend.commits
    spec = pb.TensorSpec(name="model.norm.weight", dtype="float32", shape=[16], nbytes=64)

    async def trickling_chunks():
        yield pb.PushWeightsRequest(header=pb.PushHeader(tensors=[spec]))
        for offset in range(64):
            await asyncio.sleep(0.4)
            yield pb.PushWeightsRequest(chunk=pb.PushChunk(tensor_index=0, offset=offset, data=b"\0"))

    async with grpc.aio.insecure_channel(plain.grpc_address) as channel:
        stub = pb_grpc.RolloutServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PushWeights(trickling_chunks(), metadata=(("authorization", f"Bearer {KEYS['trainer']}"),), timeout=20)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and "MiB/s" in info.value.details(), info.value.details()

    port = int(plain.url.rsplit(":", 1)[1])
    body = safetensors_body(64)
    status, text = await trickled_http(port, "/v1/weights", body, len(body) - 64)
    assert status == 504 and "MiB/s" in text, text
    status, text = await trickled_http(port, "/v1/weights", body, 4)  # the header itself, read under the push lock
    assert status == 504 and "MiB/s" in text, text
    generate = json.dumps({"prompts": [{"token_ids": [1, 2, 3]}]}).encode()
    status, text = await trickled_http(port, "/v1/generate", generate, 5)
    assert status == 504 and "MiB/s" in text, text
    assert plain.backend.commits == commits and plain.backend.generate_calls == 0


async def trickled_http(port: int, path: str, body: bytes, head: int) -> tuple[int, str]:
    """POST `body` to `path`: its first `head` bytes at once, then a byte every 0.4 s until the
    server answers; returns (status, response text)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {KEYS['trainer']}\r\n"
                 f"connection: close\r\ncontent-type: application/octet-stream\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body[:head])

    async def trickle():
        for i in range(head, len(body)):
            await asyncio.sleep(0.4)
            writer.write(body[i : i + 1])

    sender = asyncio.create_task(trickle())
    try:
        response = await asyncio.wait_for(reader.read(), 30)
    finally:
        sender.cancel()
        writer.close()
    status_line, _, rest = response.decode().partition("\r\n")
    return int(status_line.split()[1]), rest


# --- TLS ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    return Pki.make(tmp_path_factory.mktemp("pki"))


async def test_mutual_tls_serves_a_client_with_a_certificate_and_refuses_one_without(tiny_model, tmp_path, pki):
    async with FrontEnds(make_config(tiny_model, tmp_path, pki), pki) as ends:
        client = ends.client(KEYS["trainer"])
        assert len(await client.generate(prompt_token_ids=[[1]])) == 1
        await client.close()
        bare = ends.client(KEYS["trainer"], certificate=False)
        with pytest.raises(UnavailableError):
            await bare.status()
        await bare.close()
        async with ends.http_client(KEYS["trainer"]) as http:
            assert (await http.get("/v1/status")).status_code == 200
        async with ends.http_client(KEYS["trainer"], certificate=False) as http:
            with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                await http.get("/v1/status")
        plaintext = AsyncRolloutClient(ends.grpc_address, timeout=5, retry=NO_RETRY, api_key=KEYS["trainer"])
        with pytest.raises(UnavailableError):
            await plaintext.status()
        await plaintext.close()


async def test_tls_without_client_certificates_serves_any_client_that_trusts_the_server(tiny_model, tmp_path, pki):
    config = make_config(tiny_model, tmp_path, pki).model_copy(update={"tls_client_ca": None})
    async with FrontEnds(config, pki) as ends:
        client = ends.client(KEYS["eval"], certificate=False)
        assert (await client.status()).weight_version == 0
        await client.close()
        async with ends.http_client(KEYS["eval"], certificate=False) as http:
            assert (await http.get("/v1/status")).status_code == 200
