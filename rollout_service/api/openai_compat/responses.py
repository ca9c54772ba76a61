"""Completions into OpenAI's response and stream-chunk shapes (as vLLM's server writes them), plus
the service's fields on each choice:

  weight_version          the version of the sample's last token (Sample.weight_version)
  first_weight_version    the version of its first token (differs only when a push landed mid-sample)
  token_weight_versions   when asked for: runs [version, count] over its tokens

and `usage.prompt_tokens_details.cached_tokens`: prompt tokens served from the prefix cache.

Plain dicts, not pydantic models: a batch of RL samples carries a logprob entry per token, and
validating each would cost more than sampling it.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from rollout_service.errors import InvalidArgument, RolloutError, grpc_status, http_status, public_message
from rollout_service.types import Completion, Sample

if TYPE_CHECKING:
    from rollout_service.api.openai_compat.chat import ModelText

_FINISH = {"stop": "stop", "length": "length", "aborted": "abort"}

# OpenAI's error types by HTTP status (what its clients raise: BadRequestError, ...).
_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
    409: "conflict_error", 412: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
}


def error_body(exc: BaseException, chat: bool = False) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}; `code` is the
    service's gRPC code name, `param` the offending field in the OpenAI request's terms."""
    status = http_status(exc)
    param, message = None, public_message(exc)
    if isinstance(exc, InvalidArgument):
        # The core names fields of the GenerateRequest this call became: say them as OpenAI does.
        param = exc.field.removeprefix("sampling.")
        if param.startswith("prompts"):  # a chat's one prompt is its rendered messages
            param = "messages" if chat else "prompt" + param.removeprefix("prompts")
        message = param + message.removeprefix(exc.field)
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "server_error" if status >= 500 or not isinstance(exc, RolloutError) else "invalid_request_error"),
            "param": param,
            "code": grpc_status(exc).name,
        }
    }


class Usage:
    """Token counts of a call, added up over its completions (or, streamed, their pieces)."""

    def __init__(self, completions: list[Completion] = ()):
        self.prompt = self.generated = self.cached = 0
        for c in completions:
            self.add(c)

    def add(self, c: Completion) -> None:
        self.prompt += len(c.prompt_token_ids)  # a piece after a prompt's first has none
        self.generated += sum(len(s.token_ids) for s in c.samples)
        self.cached += c.cached_prompt_tokens

    def as_json(self) -> dict:
        return {
            "prompt_tokens": self.prompt,
            "completion_tokens": self.generated,
            "total_tokens": self.prompt + self.generated,
            "prompt_tokens_details": {"cached_tokens": self.cached},
        }


def usage(completions: list[Completion]) -> dict:
    return Usage(completions).as_json()


def _versions(sample: Sample, body) -> dict:
    if sample.finish_reason is None:  # a streamed piece: versions come with the sample's last one
        return {}
    out = {"weight_version": sample.weight_version, "first_weight_version": sample.first_weight_version}
    if body.token_weight_versions:
        out["token_weight_versions"] = sample.token_weight_versions
    return out


def _common(body, c: Completion, sample: Sample) -> dict:
    finish = None if sample.finish_reason is None else _FINISH[sample.finish_reason]
    out = {"finish_reason": finish, "stop_reason": sample.stop_reason or None}
    if body.return_token_ids:
        out["token_ids"] = sample.token_ids
    return out | _versions(sample, body)


# ---- /v1/completions --------------------------------------------------------------------------


def _completion_logprobs(sample: Sample, text: ModelText, offset: int = 0) -> dict:
    """`offset`: the characters of the choice's text already sent (a streamed piece's first
    text_offset)."""
    tokens = [text.token_text(t) for t in sample.token_ids]
    top = [
        {text.token_text(t): lp for t, lp in zip(alt.token_ids, alt.logprobs)} for alt in sample.top_logprobs
    ] or [None] * len(tokens)
    return {
        "tokens": tokens,
        "token_logprobs": sample.logprobs,
        "top_logprobs": top,
        "text_offset": list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset)) if tokens else [],
    }


def completion_choices(body, c: Completion, text: ModelText, stream: CompletionStream | None = None) -> list[dict]:
    """The n choices of one prompt; choice i*n + j is sample j of prompt i (as vLLM numbers them).
    Streamed pieces (`stream`: the call's state): the choices that advanced."""
    n = body.n or 1
    choices = []
    for sample in c.samples:
        index = c.prompt_index * n + sample.index
        offset = 0 if stream is None else stream.offsets.get(index, 0)
        choice = {
            "index": index,
            "text": sample.text,
            "logprobs": _completion_logprobs(sample, text, offset) if body.logprobs is not None else None,
        } | _common(body, c, sample)
        if stream is None:
            if body.return_token_ids:
                choice["prompt_token_ids"] = c.prompt_token_ids.tolist()
        else:
            if index not in stream.offsets and body.return_token_ids:  # a choice's first chunk, as vLLM's
                choice["prompt_token_ids"] = stream.prompts[c.prompt_index]
            stream.offsets[index] = offset + sum(len(text.token_text(t)) for t in sample.token_ids)
        choices.append(choice)
    return choices


class CompletionStream:
    """The chunks of one streamed /v1/completions call: per choice the characters sent (its next
    logprobs' text_offset), per prompt its token ids (a prompt's first piece has them; each of its
    choices' first chunk shows them)."""

    def __init__(self, body, text: ModelText, head: dict):
        self._body, self._text, self._head = body, text, head
        self.offsets: dict[int, int] = {}
        self.prompts: dict[int, list[int]] = {}

    def chunk(self, c: Completion) -> dict:
        if len(c.prompt_token_ids):
            self.prompts[c.prompt_index] = c.prompt_token_ids.tolist()
        return self._head | {"object": "text_completion", "choices": completion_choices(self._body, c, self._text, self)}


def completion_response(body, completions: list[Completion], text: ModelText, head: dict) -> dict:
    choices = [choice for c in completions for choice in completion_choices(body, c, text)]
    return head | {"object": "text_completion", "choices": choices, "usage": usage(completions)}


# ---- /v1/chat/completions ---------------------------------------------------------------------


def _chat_logprobs(sample: Sample, text: ModelText) -> dict:
    def entry(token_id: int, logprob: float) -> dict:
        token = text.token_text(token_id)
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = []
    for i, (token_id, logprob) in enumerate(zip(sample.token_ids, sample.logprobs)):
        alt = sample.top_logprobs[i] if sample.top_logprobs else None
        top = [entry(t, lp) for t, lp in zip(alt.token_ids, alt.logprobs)] if alt else []
        content.append(entry(token_id, logprob) | {"top_logprobs": top})
    return {"content": content}


def _message(body, sample: Sample, text: ModelText) -> tuple[dict, bool]:
    content, calls = text.tool_calls(body, sample)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [call.model_dump() for call in calls]
    return message, bool(calls)


def chat_response(body, c: Completion, text: ModelText, head: dict) -> dict:
    choices = []
    for sample in c.samples:
        message, called = _message(body, sample, text)
        choice = {
            "index": sample.index,
            "message": message,
            "logprobs": _chat_logprobs(sample, text) if body.logprobs else None,
        } | _common(body, c, sample)
        if called and sample.finish_reason == "stop":
            choice["finish_reason"] = "tool_calls"
        choices.append(choice)
    out = head | {"object": "chat.completion", "choices": choices, "usage": usage([c])}
    if body.return_token_ids:
        out["prompt_token_ids"] = c.prompt_token_ids.tolist()
    return out


class ChatStream:
    """The chunks of one streamed chat call, a chunk per piece of its completion (as vLLM's server
    streams them): a choice's first delta carries the role, each its new content, or, with a
    tool-call parser and tools, what vLLM's streaming parser makes of its new tokens."""

    def __init__(self, body, text: ModelText, head: dict):
        self._body, self._text, self._head = body, text, head
        self._tools: dict = {}  # choice index -> its ToolCallStream, or None (no parsing)

    def chunk(self, c: Completion) -> dict:
        body, text = self._body, self._text
        choices = []
        for sample in c.samples:
            first = sample.index not in self._tools
            if first:
                self._tools[sample.index] = text.tool_stream(body)
            tools = self._tools[sample.index]
            delta = tools.delta(sample) if tools else {"content": sample.text}
            choice = {
                "index": sample.index,
                "delta": {"role": "assistant"} | delta if first else delta,
                "logprobs": _chat_logprobs(sample, text) if body.logprobs else None,
            } | _common(body, c, sample)
            if tools and tools.called and sample.finish_reason == "stop":
                choice["finish_reason"] = "tool_calls"
            choices.append(choice)
        out = self._head | {"object": "chat.completion.chunk", "choices": choices}
        if body.return_token_ids and len(c.prompt_token_ids):  # the prompt's first piece
            out["prompt_token_ids"] = c.prompt_token_ids.tolist()
        return out
