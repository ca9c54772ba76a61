"""The HTTP front end (FastAPI): the same operations and JSON shapes as the proto.

POST /v1/generate   GenerateRequest JSON -> {"completions": [...]}
POST /v1/weights    a safetensors body (streamed) -> PushWeightsResponse JSON; query parameters
                    expected_version, label, inflight as in PushHeader; CRC-32s optional in the
                    safetensors metadata as {"crc32": "<JSON name -> crc>"}
POST /v1/weights:load  LoadWeights: ?url=s3://bucket/step-120/ (under load_urls, or a path under load_dirs), and
                    expected_version, label, inflight; no body -> PushWeightsResponse JSON
POST /v1/weights:rollback  Rollback (admin): ?to_version=3, and expected_version; no body ->
                    PushWeightsResponse JSON
GET  /v1/status     GetStatus as JSON
GET  /healthz       200 when the engine is alive, 503 otherwise
POST /v1/completions, POST /v1/chat/completions, GET /v1/models
                    OpenAI-compatible, over the same engine calls (api/openai_compat/), with
                    errors in OpenAI's shape
GET  /metrics       Prometheus metrics (observe/metrics.py)
GET  /v1/events     weight version events after ?after=<id> (see serve/coordinator.py)
/v1/debug/...       with --debug-endpoints (serve/debug_routes.py)

Errors come back as {"error": {"code": "INVALID_ARGUMENT", "message": "...", "field": "..."}}
with the HTTP status from `errors.http_status`. `AccessMiddleware` checks the API key and role of
every request but /healthz (api/access.py) and bounds its body (max_request_mib; a push body,
max_push_mib) before the app reads it: 401 / 403 / 413 / 429. An optional `X-Request-Timeout` header (seconds)
is the HTTP counterpart of a gRPC deadline; a client that disconnects has its requests aborted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict

from fastapi import APIRouter, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from rollout_service.api.access import UNCAPPED, Access, Operation, Slot, http_operation
from rollout_service.api.cancel import generate_all
from rollout_service.api.idle import Pace, enforce_pace
from rollout_service.api.limits import MIB, PushBudget, check_generate, check_whole, max_push_bytes, max_push_header_bytes
from rollout_service.api.openai_compat import routes as openai_routes
from rollout_service.errors import (
    Cancelled,
    InvalidArgument,
    Overloaded,
    RolloutError,
    TooLarge,
    Unauthenticated,
    grpc_status,
    http_status,
    public_message,
)
from rollout_service.observe.call_scope import CallMiddleware
from rollout_service.observe.metrics import CONTENT_TYPE, Metered
from rollout_service.serve.load import load_weights
from rollout_service.types import GenerateRequest, invalid_argument_from
from rollout_service.weights.manifest import PushHeader
from rollout_service.weights.safetensors_stream import SafetensorsStream

log = logging.getLogger(__name__)

# The body of a call that is neither a Generate nor a push (status, events, health, admin): none of
# them reads one, and without this bound each would be buffered up to max_request_mib.
SMALL_BODY = 64 * 1024
# HTTP requests handled at once, health probes aside (429 beyond). Counted here, not with uvicorn's
# limit_concurrency, which counts open connections too: 8,192 idle ones from a stranger would
# then turn every request away, /healthz included.
MAX_HTTP_REQUESTS = 8192
# Bodies beyond this are parsed in a thread: tens of MiB of JSON take seconds, which would stall
# every other call on the event loop.
LARGE_BODY = 1 << 20
# An event id as the events stream writes them (a Redis stream id): MILLISECONDS-SEQUENCE, or one number.
EVENT_ID = r"^[0-9]{1,20}(-[0-9]{1,20})?$"


def _error_response(exc: BaseException, path: str) -> JSONResponse:
    """The error in the service's shape, or in OpenAI's on the OpenAI-compatible paths."""
    if not isinstance(exc, RolloutError):
        log.exception("internal error in an HTTP call", exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthenticated) else None
    if path in openai_routes.PATHS:
        return JSONResponse(openai_routes.error_body(exc, path), status_code=http_status(exc), headers=headers)
    body = {"code": grpc_status(exc).name, "message": public_message(exc)}
    if isinstance(exc, InvalidArgument):
        body["field"] = exc.field
    return JSONResponse({"error": body}, status_code=http_status(exc), headers=headers)


class AccessMiddleware:
    """ASGI middleware: the caller's key and role, its per-key concurrency slot, and the body limit,
    all before the app runs. A body is read here in full (bounded) except a push's, which streams
    through a counter that fails the push with TooLarge once it passes its limit."""

    def __init__(self, app, access: Access, max_body: int, max_push: int, body_idle_s: float):
        self.app = app
        self.running = 0  # requests past this middleware, health probes aside
        self.access = access
        self.max_body = max_body
        self.max_push = max_push
        self.body_idle_s = body_idle_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        operation = http_operation(scope["method"], scope["path"])
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = {Operation.PUSH: self.max_push, Operation.GENERATE: self.max_body}.get(operation, SMALL_BODY)
        slot = UNCAPPED
        counted = False
        try:
            try:
                if operation is not Operation.HEALTH:  # a probe answers however busy the server is
                    if self.running >= MAX_HTTP_REQUESTS:
                        raise Overloaded(f"the server is handling {self.running} HTTP requests, its most; retry shortly")
                    self.running += 1
                    counted = True
                caller = self.access.authorize(headers.get("authorization"), operation)
                length = headers.get("content-length", "")
                if length.isdigit() and int(length) > limit:
                    raise TooLarge(f"the body of {int(length)} bytes is over the limit of {limit} bytes for {scope['path']}")
                slot = self.access.acquire(caller, operation)  # before buffering: a capped key holds no memory
                if operation is Operation.PUSH:
                    receive = _bounded(receive, limit)
                else:
                    receive = await _buffered(receive, limit, self.body_idle_s, slot, int(length) if length.isdigit() else None)
            except RolloutError as exc:
                if not isinstance(exc, TooLarge):
                    log.info("refused %s %s: %s", scope["method"], scope["path"], exc)
                return await _error_response(exc, scope["path"])(scope, receive, send)
            await self.app(scope, receive, send)
        finally:  # however the call ends (a cancelled task at shutdown included)
            slot.release()
            if counted:
                self.running -= 1


def _too_large(limit: int) -> TooLarge:
    return TooLarge(f"the body is over the limit of {limit / MIB:g} MiB" if limit >= MIB else f"the body is over the limit of {limit} bytes")


def _bounded(receive, limit: int):
    seen = 0

    async def counting():
        nonlocal seen
        message = await receive()
        seen += len(message.get("body", b""))
        if seen > limit:
            raise _too_large(limit)
        return message

    return counting


async def _buffered(receive, limit: int, idle_s: float, slot: Slot, length: int | None = None):
    """The whole body read now (at most `limit` bytes, each piece counted against the caller's bytes
    in flight as it arrives, within `idle_s` of the last and the body within its pace: idle.py),
    replayed to the app as one message."""
    pace = Pace(idle_s, "the request body")
    pace.expect(length if length is not None else limit)
    parts, size = [], 0
    while True:
        message = await pace.wait(receive())
        if message["type"] != "http.request":
            pending = [message]
            break
        parts.append(message.get("body", b""))
        size += len(parts[-1])
        if size > limit:
            raise _too_large(limit)
        slot.grow(len(parts[-1]))
        if not message.get("more_body", False):
            pending = [{"type": "http.request", "body": b"".join(parts), "more_body": False}]
            break

    async def replay():
        return pending.pop(0) if pending else await receive()

    return replay


def create_app(backend: Metered, access: Access, events=None, debug: APIRouter | None = None) -> FastAPI:
    """The app over `backend` behind `access`; `events(after, count)` serves /v1/events, and
    `debug` (serve/debug_routes.py) is mounted, when given."""
    app = FastAPI(title="rollout-service", version="1", summary="Rollouts with exact per-token logprobs (rollout.v1).")
    config = backend.config
    app.add_middleware(
        AccessMiddleware, access=access, max_body=config.max_request_mib * MIB, max_push=max_push_bytes(config),
        body_idle_s=config.push_idle_timeout_s,
    )
    # Added last, so outermost: refusals carry the request id too.
    app.add_middleware(CallMiddleware, routes=lambda: {getattr(r, "path", None) for r in app.routes})

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _error_response(invalid_argument_from(list(exc.errors())), request.url.path)

    @app.exception_handler(RolloutError)
    async def _rollout_error(request: Request, exc: RolloutError):
        return _error_response(exc, request.url.path)

    @app.post(
        "/v1/generate",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": GenerateRequest.model_json_schema()}}}},
    )
    async def generate(
        request: Request,
        x_request_timeout: float | None = Header(None, gt=0, description="Deadline in seconds."),
    ):
        # Parsed from the bytes straight into the request (token ids into int32 arrays), not into a
        # dict of Python lists first as FastAPI's body parameter would: a tenth of the memory.
        raw = await request.body()
        body = await asyncio.to_thread(GenerateRequest.parse, raw) if len(raw) > LARGE_BODY else GenerateRequest.parse(raw)
        check_generate(body, config)
        check_whole(body)
        return {"completions": [c.as_json() for c in await generate_all(request, backend, body, x_request_timeout)]}

    @app.post("/v1/weights")
    async def push_weights(
        request: Request,
        expected_version: int | None = Query(None, ge=0, description="Reject unless this version is served."),
        label: str = Query("", description="Stored with the version and echoed."),
        inflight: str = Query("", description="drain | abort | continue; default: the server's."),
    ):
        pace = Pace(config.push_idle_timeout_s, "the push body")
        max_header = max_push_header_bytes(config)
        pace.expect(max_header)  # the header is read under the push lock: a trickled one would hold it
        body = SafetensorsStream(enforce_pace(request.stream(), pace), max_header=max_header)

        async def read_header() -> PushHeader:  # once the push lock is held: one header parsed at a time
            header = await body.header(expected_version, label, inflight)
            budget = PushBudget(config)
            budget.add(header.tensors)
            pace.expect(max_header + budget.declared)
            return header

        try:
            async with backend.begin_push(read_header) as session:
                async for index, offset, data in body.chunks():
                    await session.add_chunk(index, offset, data)
                return asdict(await backend.commit_push(session))
        except ClientDisconnect:
            raise Cancelled("the client disconnected before the body was complete; nothing was applied") from None

    @app.post("/v1/weights:load")
    async def load_checkpoint(
        url: str = Query(..., description="s3://bucket/step-120/ under the server's load_urls, or a path under its load_dirs (LoadWeightsRequest.url)."),
        expected_version: int | None = Query(None, ge=0, description="Reject unless this version is served."),
        label: str = Query("", description="Stored with the version and echoed."),
        inflight: str = Query("", description="drain | abort | continue; default: the server's."),
    ):
        return asdict(await load_weights(backend, url, expected_version, label, inflight))

    @app.post("/v1/weights:rollback")
    async def rollback(
        to_version: int = Query(..., ge=1, description="The kept version to serve again (RollbackRequest.to_version)."),
        expected_version: int | None = Query(None, ge=0, description="Reject unless this is the last committed version."),
    ):
        return asdict(await backend.rollback(to_version, expected_version))

    openai_routes.add_routes(app, backend)

    @app.get("/v1/status")
    async def status():
        return asdict(await backend.status())

    @app.get("/metrics")
    async def metrics():
        return Response(await backend.exposition(), media_type=CONTENT_TYPE)

    if events is not None:

        @app.get("/v1/events")
        async def version_events(
            after: str = Query("0", description="Return events after this id ('0': from the oldest kept).", pattern=EVENT_ID),
            count: int = Query(100, ge=1, le=1000),
        ):
            if any(int(part) >= 2**64 for part in after.split("-")):
                raise InvalidArgument("after", f"{after!r}: each part of an event id is below 2**64")
            return {"events": [{"id": i, **e} for i, e in await events(after, count)]}

    if debug is not None:
        app.include_router(debug)

    @app.get("/healthz")
    async def healthz():
        await backend.check_health()
        return {"status": "SERVING"}

    return app
