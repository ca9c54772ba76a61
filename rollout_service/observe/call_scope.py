"""Each gRPC and HTTP call's scope, set before anything else runs for it (the access checks
included, so a refusal has it too): its request id and its ingress span, current (calls.py) for
all the code below it.

The request id is the caller's `x-request-id` (HTTP header or gRPC metadata) where usable
(calls.request_id), else a new one; it goes back in the reply's `x-request-id` header, or the
call's initial metadata, on errors too. The span is named after the RPC
(`rollout.v1.RolloutService/Generate`) or the HTTP route (`POST /v1/generate`), is a child of the
caller's span when it sends a W3C `traceparent`, and records the reply's status. Health checks,
reflection and metrics scrapes get a request id but no span: probes would bury the calls.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc

from rollout_service.observe import calls, tracing

UNTRACED_GRPC = ("/grpc.health.", "/grpc.reflection.")
# The codes that mark a server span failed (OpenTelemetry's RPC conventions): a refused request is
# the caller's error, not the server's.
SERVER_FAULTS = {
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
}
UNTRACED_HTTP = ("/healthz", "/metrics")
_HANDLERS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class CallFailed(Exception):
    """What a span records of a call that failed: its status and message."""


def _grpc_call(details: grpc.HandlerCallDetails) -> tuple[calls.Call, object]:
    metadata = {k: v for k, v in details.invocation_metadata or () if isinstance(v, str)}
    request_id = calls.request_id(metadata.get(tracing.REQUEST_ID))
    service, _, method = details.method.lstrip("/").rpartition("/")
    span = None
    if not details.method.startswith(UNTRACED_GRPC):
        span = tracing.start(
            details.method.lstrip("/"), tracing.extract(metadata), request_id=request_id,
        )
        span.set_attributes({"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
    return calls.Call(request_id, method, tracing.within(span) if span is not None else None), span


class CallInterceptor(grpc.aio.ServerInterceptor):
    """The outermost interceptor: the call's scope around the rest of the chain and its handler."""

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        call, span = _grpc_call(details)
        with calls.serving(call):  # the access checks run here, and log their refusals
            handler = await continuation(details)
        if handler is None:
            tracing.end(span)
            return None
        return _scoped(handler, call, span)


def _scoped(handler: grpc.RpcMethodHandler, call: calls.Call, span) -> grpc.RpcMethodHandler:
    """The same handler, run as `call`: the request id sent first, the span ended with its status."""
    header = ((tracing.REQUEST_ID, call.request_id),)

    def finish(context, error: BaseException | None) -> None:
        if span is None:
            return
        code = context.code() or (
            grpc.StatusCode.OK if error is None
            else grpc.StatusCode.CANCELLED if isinstance(error, asyncio.CancelledError) else grpc.StatusCode.UNKNOWN
        )
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        tracing.end(span, CallFailed(f"{code.name}: {context.details()}") if code in SERVER_FAULTS else None)

    if handler.response_streaming:
        inner = handler.unary_stream or handler.stream_stream

        async def behaviour(request, context):
            error = None
            with calls.serving(call):
                try:
                    await context.send_initial_metadata(header)
                    async for item in inner(request, context):
                        yield item
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, error)
    else:
        inner = handler.unary_unary or handler.stream_unary

        async def behaviour(request, context):
            error = None
            with calls.serving(call):
                try:
                    await context.send_initial_metadata(header)
                    return await inner(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, error)

    kind = _HANDLERS[(handler.request_streaming, handler.response_streaming)]
    return kind(behaviour, handler.request_deserializer, handler.response_serializer)


class CallMiddleware:
    """ASGI middleware, the app's outermost: the call's scope, and `x-request-id` on its reply.
    `routes()`: the app's paths; a span is named by its route only on one of them, else by its
    method alone, so that a stranger's made-up paths do not each make a span name."""

    def __init__(self, app, routes: Callable[[], set[str]]):
        self.app = app
        self._routes = routes
        self._known: set[str] | None = None  # read at the first call, once every router is mounted

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        request_id = calls.request_id(headers.get(tracing.REQUEST_ID))
        route = f"{scope['method']} {scope['path']}"
        span = None
        if scope["path"] not in UNTRACED_HTTP:
            if self._known is None:
                self._known = self._routes()
            name = route if scope["path"] in self._known else scope["method"]
            span = tracing.start(name, tracing.extract(headers), request_id=request_id)
            span.set_attributes({"http.request.method": scope["method"], "url.path": scope["path"]})
        status: list[int] = []
        header = (b"x-request-id", request_id.encode("latin-1"))

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        call = calls.Call(request_id, route, tracing.within(span) if span is not None else None)
        try:
            with calls.serving(call):
                await self.app(scope, receive, send_with_id)
        except BaseException as exc:
            tracing.end(span, exc)
            if not status and isinstance(exc, Exception):
                # Starlette's outermost middleware would answer this 500 itself, without the id;
                # the same answer, with it (that middleware sees it sent, and logs the exception).
                await send({"type": "http.response.start", "status": 500, "headers": [(b"content-type", b"text/plain; charset=utf-8"), header]})
                await send({"type": "http.response.body", "body": b"Internal Server Error"})
            raise
        if span is not None:
            code = status[0] if status else 500  # a reply never started is the server's failure
            span.set_attribute("http.response.status_code", code)
            tracing.end(span, CallFailed(f"HTTP {code}") if code >= 500 else None)
