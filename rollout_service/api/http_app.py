"""The HTTP front end (FastAPI): the same operations and JSON shapes as the proto.

POST /v1/generate   GenerateRequest JSON -> {"completions": [...]}
POST /v1/weights    a safetensors body (streamed) -> PushWeightsResponse JSON; query parameters
                    expected_version, label, inflight as in PushHeader; CRC-32s optional in the
                    safetensors metadata as {"crc32": "<JSON name -> crc>"}
GET  /v1/status     GetStatus as JSON
GET  /healthz       200 when the engine is alive, 503 otherwise
GET  /metrics       Prometheus metrics (api/metrics.py)
GET  /v1/events     weight version events after ?after=<id> (serve backend; see serve/coordinator.py)
GET  /v1/debug/engine-weights   with --debug-endpoints: the engine's weights as it computes with
                    them (safetensors; see RolloutWorkerExtension.rollout_snapshot)
POST /v1/debug/pause?mode=      with --debug-endpoints: hold generation on every engine until
POST /v1/debug/resume           resume; running samples finish (drain), are aborted (abort) or stay
                    frozen (continue, the default); new requests are admitted and wait. A push
                    ends the hold (it pauses and resumes by its own policy); replicas started
                    later are not held. &stepped=true: generation runs (resumed if held)
                    until every request in the engine has a token (so it is running, not
                    queued), then is held

Errors come back as {"error": {"code": "INVALID_ARGUMENT", "message": "...", "field": "..."}}
with the HTTP status from `errors.http_status`. An optional `X-Request-Timeout` header (seconds)
is the HTTP counterpart of a gRPC deadline; a client that disconnects has its requests aborted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import asdict

from fastapi import FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from rollout_service.api.metrics import CONTENT_TYPE, Metered
from rollout_service.config import InflightPolicy
from rollout_service.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    RolloutError,
    grpc_status,
    http_status,
    public_message,
)
from rollout_service.types import GenerateRequest, invalid_argument_from
from rollout_service.weights.safetensors_stream import SafetensorsStream

log = logging.getLogger(__name__)


def _error_response(exc: BaseException) -> JSONResponse:
    if not isinstance(exc, RolloutError):
        log.exception("internal error in an HTTP call", exc_info=exc)
    body = {"code": grpc_status(exc).name, "message": public_message(exc)}
    if isinstance(exc, InvalidArgument):
        body["field"] = exc.field
    return JSONResponse({"error": body}, status_code=http_status(exc))


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _run_cancellable(request: Request, work, timeout: float | None):
    """Run `work` until it finishes, the client disconnects, or `timeout` passes."""
    task = asyncio.create_task(work)
    watcher = asyncio.create_task(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if watcher in done:
        raise Cancelled("the client disconnected; its engine requests were aborted")
    raise DeadlineExceeded(f"X-Request-Timeout ({timeout} s) passed; its engine requests were aborted")


def create_app(backend: Metered, events=None) -> FastAPI:
    """The app over `backend`; `events(after, count)` serves /v1/events when given."""
    app = FastAPI(title="rollout-service", version="1", summary="Rollouts with exact per-token logprobs (rollout.v1).")

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        return _error_response(invalid_argument_from(list(exc.errors())))

    @app.exception_handler(RolloutError)
    async def _rollout_error(_, exc: RolloutError):
        return _error_response(exc)

    @app.post("/v1/generate")
    async def generate(
        body: GenerateRequest,
        request: Request,
        x_request_timeout: float | None = Header(None, gt=0, description="Deadline in seconds."),
    ):
        async def work():
            async with contextlib.aclosing(backend.generate(body)) as stream:
                done = [c async for c in stream]
            done.sort(key=lambda c: c.prompt_index)
            return {"completions": [asdict(c) for c in done]}

        return await _run_cancellable(request, work(), x_request_timeout)

    @app.post("/v1/weights")
    async def push_weights(
        request: Request,
        expected_version: int | None = Query(None, ge=0, description="Reject unless this version is served."),
        label: str = Query("", description="Stored with the version and echoed."),
        inflight: str = Query("", description="drain | abort | continue; default: the server's."),
    ):
        body = SafetensorsStream(request.stream())
        try:
            header = await body.header(expected_version, label, inflight)
            async with backend.begin_push(header) as session:
                async for index, offset, data in body.chunks():
                    await session.add_chunk(index, offset, data)
                return asdict(await backend.commit_push(session))
        except ClientDisconnect:
            raise Cancelled("the client disconnected before the body was complete; nothing was applied") from None

    @app.get("/v1/status")
    async def status():
        return asdict(await backend.status())

    @app.get("/metrics")
    async def metrics():
        return Response(await backend.exposition(), media_type=CONTENT_TYPE)

    if events is not None:

        @app.get("/v1/events")
        async def version_events(
            after: str = Query("0", description="Return events after this id ('0': from the oldest kept)."),
            count: int = Query(100, ge=1, le=1000),
        ):
            return {"events": [{"id": i, **e} for i, e in await events(after, count)]}

    if backend.config.debug_endpoints:

        @app.get("/v1/debug/engine-weights")
        async def engine_weights():
            return Response(await backend.snapshot(), media_type="application/octet-stream")

        @app.post("/v1/debug/pause")
        async def pause(
            mode: InflightPolicy = Query("continue", description="What running samples do meanwhile."),
            stepped: bool = Query(False, description="Run (resumed if held) until every request in the engine has a token, then hold."),
        ):
            await backend.pause(mode, stepped)
            return {"paused": mode}

        @app.post("/v1/debug/resume")
        async def resume():
            await backend.resume()
            return {"paused": None}

    @app.get("/healthz")
    async def healthz():
        await backend.check_health()
        return {"status": "SERVING"}

    return app
