"""The OpenAI-compatible routes of the HTTP front end (api/http_app.py adds them).

POST /v1/completions        prompt(s) as text or token ids; choice i*n + j is sample j of prompt i
POST /v1/chat/completions   messages rendered with the model's chat template; tool calls parsed
                            when the server has --tool-call-parser
GET  /v1/models             the served model (its name: --served-model-name)

`stream: true` sends server-sent events as vLLM's server does: a chunk per engine step and prompt
with the new tokens of its choices (text or chat delta, their logprobs, token ids when asked for;
tool-call deltas from vLLM's streaming parser when the server has one and the call has tools), a
choice's finish reason and weight versions with its last chunk, then a usage chunk when
`stream_options.include_usage`, then `data: [DONE]`. An error found before the first chunk is an
HTTP error; one after it is sent as a last `data: {"error": ...}` event, as vLLM's server does.
Access is the same as /v1/generate's (api/access.py). X-Request-Timeout bounds a call until its
response (a stream: until its first chunk, its first token), and a client that disconnects has its engine requests
aborted, as for /v1/generate.

vLLM (its request models, renderer and parsers) is imported on the first OpenAI call, not when the
front end starts: a Serve ingress that never serves one never loads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI, Header, Request
from fastapi.responses import StreamingResponse

from rollout_service.api.cancel import generate_all, run_cancellable
from rollout_service.api.limits import check_generate
from rollout_service.api.openai_compat import responses
from rollout_service.config import ServerConfig
from rollout_service.errors import InvalidArgument, RolloutError
from rollout_service.types import Completion, GenerateRequest

log = logging.getLogger(__name__)

PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models"})
LARGE_BODY = 1 << 20  # bodies beyond are parsed in a thread


def error_body(exc: BaseException, path: str) -> dict:
    """The OpenAI error body for a call to `path` (the HTTP app's error handler uses it)."""
    return responses.error_body(exc, chat=path == "/v1/chat/completions")


class _Lazy:
    """The ModelText of `config` and the body models, built and imported on the first OpenAI call
    (off the event loop: importing vLLM and reading the tokenizer take seconds)."""

    def __init__(self, config: ServerConfig):
        self._config = config
        self._loaded = None
        self._lock = asyncio.Lock()

    def _load(self):
        from rollout_service.api.openai_compat import bodies
        from rollout_service.api.openai_compat.chat import ModelText

        return bodies, ModelText(self._config)

    async def get(self):
        """(the bodies module, the ModelText)."""
        async with self._lock:
            if self._loaded is None:
                self._loaded = await asyncio.to_thread(self._load)
        return self._loaded


def _loads(raw: bytes):
    try:
        return json.loads(raw)
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of more than 4,300 digits
        raise InvalidArgument("body", f"invalid JSON: {str(exc)[:200]}") from None
    except RecursionError:  # json's C parser recurses once per level of nesting
        raise InvalidArgument("body", "invalid JSON: nested too deeply") from None


async def _parsed(request: Request, bodies, model):
    """The request's body as `model` (vLLM's request model and ours): a large one is parsed off the
    event loop, where megabytes of JSON would stall every other call for seconds."""
    raw = await request.body()
    parse = lambda: bodies.parse(model, _loads(raw))  # noqa: E731
    return await asyncio.to_thread(parse) if len(raw) > LARGE_BODY else parse()


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


async def _streamed(
    request: Request, backend, req: GenerateRequest, chunk: Callable[[Completion], dict],
    final: Callable[[responses.Usage], dict] | None, timeout: float | None,
):
    """A StreamingResponse of a chunk per piece of the call's completions (their tokens as they
    are sampled). Until the first piece the call is an ordinary one (its errors raise; a
    disconnect or the timeout aborts it); after it, Starlette closes the stream when the client
    goes, which aborts what is left."""
    stream = backend.generate(req.model_copy(update={"stream_tokens": True}))

    async def first_piece() -> Completion:
        return await anext(stream)

    try:
        first = await run_cancellable(request, first_piece(), timeout)
    except BaseException:
        await stream.aclose()
        raise

    async def events() -> AsyncIterator[str]:
        tally = responses.Usage([first])
        try:
            async with contextlib.aclosing(stream):
                yield _sse(chunk(first))
                async for c in stream:
                    tally.add(c)
                    yield _sse(chunk(c))
            if final is not None:
                yield _sse(final(tally))
        except Exception as exc:  # the 200 went out with the first chunk: the error is the last event
            if not isinstance(exc, RolloutError):
                log.exception("internal error in a streamed OpenAI call", exc_info=exc)
            yield _sse(error_body(exc, request.url.path))
        yield _sse("[DONE]")

    return StreamingResponse(events(), media_type="text/event-stream")


def add_routes(app: FastAPI, backend) -> None:
    config = backend.config
    model_text = _Lazy(config)
    started = int(time.time())

    def head(prefix: str) -> dict:
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": config.model_name}

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
        bodies, text = await model_text.get()
        body = await _parsed(request, bodies, bodies.CompletionBody)
        bodies.check_model(body.model, config)
        req = bodies.completion_request(body)
        check_generate(req, config)
        top = head("cmpl")
        if body.stream:
            final = (lambda tally: top | {"object": "text_completion", "choices": [], "usage": tally.as_json()}) \
                if include_usage(body) else None
            return await _streamed(
                request, backend, req, responses.CompletionStream(body, text, top).chunk, final, x_request_timeout
            )
        return responses.completion_response(body, await generate_all(request, backend, req, x_request_timeout), text, top)

    @app.post("/v1/chat/completions")
    async def chat_completions(
        request: Request, x_request_timeout: float | None = Header(None, gt=0, description="Deadline in seconds.")
    ):
        bodies, text = await model_text.get()
        body = await _parsed(request, bodies, bodies.ChatBody)
        bodies.check_model(body.model, config)
        req = bodies.chat_request(
            body, await text.render(body), text.context, config.max_tokens_per_sample, text.keeps_special_tokens(body)
        )
        check_generate(req, config)
        top = head("chatcmpl")
        if body.stream:
            final = (lambda tally: top | {"object": "chat.completion.chunk", "choices": [], "usage": tally.as_json()}) \
                if include_usage(body) else None
            return await _streamed(
                request, backend, req, responses.ChatStream(body, text, top).chunk, final, x_request_timeout
            )
        (completion,) = await generate_all(request, backend, req, x_request_timeout)
        return responses.chat_response(body, completion, text, top)
