"""The OpenAI-compatible routes of the HTTP front end (api/http_app.py adds them).

POST /v1/completions        prompt(s) as text or token ids; choice i*n + j is sample j of prompt i
POST /v1/chat/completions   messages rendered with the model's chat template; tool calls parsed
                            when the server has --tool-call-parser
GET  /v1/models             the served model (its name: --served-model-name)

`stream: true` sends server-sent events, one chunk per prompt as its samples finish (whole choices,
not token by token: the engine returns a sample once it is complete), then a usage chunk when
`stream_options.include_usage`, then `data: [DONE]`. An error found before the first chunk is an
HTTP error; one after it is sent as a last `data: {"error": ...}` event, as vLLM's server does.
Access is the same as /v1/generate's (api/access.py); X-Request-Timeout applies to calls that do
not stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Header, Request
from fastapi.responses import StreamingResponse

from rollout_service.api.cancel import run_cancellable
from rollout_service.api.limits import check_generate
from rollout_service.api.openai_compat import requests, responses
from rollout_service.api.openai_compat.chat import ModelText
from rollout_service.config import ServerConfig
from rollout_service.errors import InvalidArgument
from rollout_service.types import Completion, GenerateRequest

PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})


def error_body(exc: BaseException, path: str) -> dict:
    """The OpenAI error body for a call to `path` (the HTTP app's error handler uses it)."""
    return responses.error_body(exc, chat=path == "/v1/chat/completions")


class _Lazy:
    """The ModelText of `config`, built on the first OpenAI call (off the event loop)."""

    def __init__(self, config: ServerConfig):
        self._config = config
        self._text: ModelText | None = None
        self._lock = asyncio.Lock()

    async def get(self) -> ModelText:
        async with self._lock:
            if self._text is None:
                self._text = await asyncio.to_thread(ModelText, self._config)
        return self._text


async def _json(request: Request):
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidArgument("body", f"invalid JSON: {exc}") from None


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _streamed(backend, req: GenerateRequest, chunk: Callable[[Completion], dict], final: Callable | None, path: str):
    """A StreamingResponse of one chunk per finished prompt; errors before the first chunk raise."""
    stream = backend.generate(req)
    try:
        first = await anext(stream)
    except BaseException:
        await stream.aclose()
        raise

    async def events() -> AsyncIterator[str]:
        done = [first]
        try:
            async with contextlib.aclosing(stream):
                yield _sse(chunk(first))
                async for c in stream:
                    done.append(c)
                    yield _sse(chunk(c))
            if final is not None:
                yield _sse(final(done))
        except Exception as exc:  # the 200 went out with the first chunk: the error is the last event
            yield _sse(error_body(exc, path))
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


def add_routes(app: FastAPI, backend) -> None:
    config = backend.config
    model_text = _Lazy(config)
    started = int(time.time())

    def head(prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}

    async def collected(request: Request, req: GenerateRequest, timeout: float | None) -> list[Completion]:
        async def work():
            async with contextlib.aclosing(backend.generate(req)) as stream:
                done = [c async for c in stream]
            return sorted(done, key=lambda c: c.prompt_index)

        return await run_cancellable(request, work(), timeout)

    def include_usage(body) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": config.model_name, "object": "model", "created": started, "owned_by": "rollout-service",
                      "root": str(config.model)}],
        }

    @app.post("/v1/completions")
    async def completions(
        request: Request, x_request_timeout: float | None = Header(None, gt=0, description="Deadline in seconds.")
    ):
        body = requests.parse(requests.CompletionBody, await _json(request))
        requests.check_model(body.model, config)
        text = await model_text.get()
        req = requests.completion_request(body, text.context)
        check_generate(req, config)
        top = head("cmpl")
        if body.stream:
            final = (lambda done: top | {"object": "text_completion", "choices": [], "usage": responses.usage(done)}) \
                if include_usage(body) else None
            return await _streamed(
                backend, req, lambda c: responses.completion_chunk(body, c, text, top), final, request.url.path
            )
        return responses.completion_response(body, await collected(request, req, x_request_timeout), text, top)

    @app.post("/v1/chat/completions")
    async def chat_completions(
        request: Request, x_request_timeout: float | None = Header(None, gt=0, description="Deadline in seconds.")
    ):
        body = requests.parse(requests.ChatBody, await _json(request))
        requests.check_model(body.model, config)
        text = await model_text.get()
        req = requests.chat_request(body, await text.render(body), text.context)
        check_generate(req, config)
        top = head("chatcmpl")
        if body.stream:
            final = (lambda done: top | {"object": "chat.completion.chunk", "choices": [], "usage": responses.usage(done)}) \
                if include_usage(body) else None
            return await _streamed(backend, req, lambda c: responses.chat_chunk(body, c, text, top), final, request.url.path)
        (completion,) = await collected(request, req, x_request_timeout)
        return responses.chat_response(body, completion, text, top)
