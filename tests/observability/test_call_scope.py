"""The call scope of the front ends without an engine: a grpc.aio server with the interceptor
(serving the standard health service) and a FastAPI app with the middleware, both real; the
request id comes back on success, on errors and on refusals, and the ingress span joins the
caller's trace."""

from __future__ import annotations

import asyncio
import logging

import grpc
import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from rollout_client import NO_RETRY, AsyncRolloutClient, RolloutClientError

from rollout_service.errors import InvalidArgument
from rollout_service.observe import calls
from rollout_service.observe.call_scope import CallInterceptor, CallMiddleware
from rollout_service.observe.logs import RequestIdFilter

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class SeenInterceptor(grpc.aio.ServerInterceptor):
    """Test double of the access interceptor's place in the chain: records the call current there."""

    def __init__(self):
        self.seen: list[calls.Call | None] = []

    async def intercept_service(self, continuation, details):
        self.seen.append(calls.current())
        return await continuation(details)


async def _health_server(interceptor: SeenInterceptor) -> tuple[grpc.aio.Server, str]:
    """A server of the health service alone (a Rollout call to it is UNIMPLEMENTED)."""
    server = grpc.aio.server(interceptors=[CallInterceptor(), interceptor])
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _grpc_round(metadata) -> tuple[dict, grpc.StatusCode, list]:
    async def run():
        seen = SeenInterceptor()
        server, address = await _health_server(seen)
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                call = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service="no.such.Service"), metadata=metadata
                )
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await call
                return dict(await call.initial_metadata()), failed.value.code(), seen.seen
        finally:
            await server.stop(0)

    return asyncio.run(run())


def test_the_python_client_sends_a_generates_request_id_as_the_calls():
    async def run():
        seen = SeenInterceptor()
        server, address = await _health_server(seen)
        try:
            async with AsyncRolloutClient(address, timeout=30, retry=NO_RETRY) as client:
                with pytest.raises(RolloutClientError):
                    await client.generate(prompt_token_ids=[[1, 2]], request_id="trainer-step-3")
                with pytest.raises(RolloutClientError):
                    await client.generate(prompt_token_ids=[[1, 2]], request_id="not\nascii ü")
        finally:
            await server.stop(0)
        return seen.seen

    given, unusable = asyncio.run(run())
    assert given.request_id == "trainer-step-3" and given.route == "Generate"
    assert len(unusable.request_id) == 32  # not sent: the server made one


def test_grpc_keeps_the_callers_request_id_and_returns_it_on_an_error():
    initial, code, seen = _grpc_round((("x-request-id", "rollout-9"),))
    assert code is grpc.StatusCode.NOT_FOUND and initial["x-request-id"] == "rollout-9"
    assert seen == [calls.Call("rollout-9", "Check", None)]  # the checks after it run in the call


def test_grpc_makes_a_request_id_when_the_caller_sends_none():
    initial, _, seen = _grpc_round(())
    assert len(initial["x-request-id"]) == 32 and seen[0].request_id == initial["x-request-id"]


def _app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(CallMiddleware, routes=lambda: {getattr(r, "path", None) for r in app.routes})
    log = logging.getLogger("rollout_service.test_scope")

    @app.get("/v1/status")
    async def status():
        log.warning("status asked")
        return {"request_id": calls.current().request_id}

    @app.post("/v1/generate")
    async def refused():
        raise InvalidArgument("prompts", "no prompts")

    @app.get("/v1/broken")
    async def broken():
        raise RuntimeError("a bug")

    @app.exception_handler(InvalidArgument)
    async def _invalid(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=400)

    return app


async def _http(*requests) -> list[httpx.Response]:
    transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return [await client.request(method, path, headers=headers) for method, path, headers in requests]


def test_http_returns_the_request_id_on_success_refusal_and_failure(memory_spans):
    ok, refused, broken, unknown = asyncio.run(_http(
        ("GET", "/v1/status", {"x-request-id": "eval-1", "traceparent": TRACEPARENT}),
        ("POST", "/v1/generate", {"x-request-id": "eval-2"}),
        ("GET", "/v1/broken", {}),
        ("GET", "/no/such/path", {"x-request-id": "bad\x01id"}),
    ))
    assert ok.headers["x-request-id"] == "eval-1" and ok.json() == {"request_id": "eval-1"}
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "eval-2"
    assert broken.status_code == 500 and len(broken.headers["x-request-id"]) == 32
    assert unknown.status_code == 404 and unknown.headers["x-request-id"] not in ("", "bad\x01id")
    spans = {s.attributes["rollout.request_id"]: s for s in memory_spans.get_finished_spans()}
    status = spans["eval-1"]
    assert status.name == "GET /v1/status" and status.attributes["http.response.status_code"] == 200
    assert f"{status.context.trace_id:032x}" == TRACEPARENT.split("-")[1]
    assert f"{status.parent.span_id:016x}" == TRACEPARENT.split("-")[2]
    assert spans["eval-2"].status.is_unset  # a refused request is the caller's error, not the server's
    assert not spans[broken.headers["x-request-id"]].status.is_ok
    assert spans[unknown.headers["x-request-id"]].name == "GET"  # not named by a stranger's path


def test_http_log_lines_in_a_call_carry_its_request_id(caplog):
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.WARNING, logger="rollout_service.test_scope"):
        asyncio.run(_http(("GET", "/v1/status", {"x-request-id": "eval-3"})))
    (record,) = [r for r in caplog.records if r.getMessage() == "status asked"]
    assert record.request_id == "eval-3"
