"""OpenAI request bodies into the service's GenerateRequest.

The bodies are vLLM's own request models (so every OpenAI and vLLM field parses as vLLM's server
parses it) plus the service's extension fields. A field that changes what vLLM's server would do
but that the service does not do (beam search, structured outputs, echo, ...) is refused naming
it, never silently ignored; fields neither OpenAI's nor vLLM's are ignored, as vLLM does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, ValidationError
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.exceptions import VLLMValidationError

from rollout_service.config import ServerConfig
from rollout_service.errors import InvalidArgument, NotFound
from rollout_service.types import UINT32_MAX, UINT64_MAX, GenerateRequest, SamplingOptions, invalid_argument_from


class _Extensions(BaseModel):
    """The service's fields (the `openai` package sends them in `extra_body`)."""

    token_weight_versions: bool = Field(
        False, description="Each choice carries `token_weight_versions`: the version of every token as runs "
        "[version, count] (more than one run only when a push landed mid-sample)."
    )
    min_weight_version: int = Field(0, ge=0, le=UINT64_MAX, description="As GenerateRequest.min_weight_version.")
    max_staleness: int | None = Field(None, ge=0, le=UINT32_MAX, description="As GenerateRequest.max_staleness.")


class CompletionBody(CompletionRequest, _Extensions):
    pass


class ChatBody(ChatCompletionRequest, _Extensions):
    pass


# What the service does with each field it reads; any other field that vLLM knows must be left at
# its default. (`user`, `stream_options` and `parallel_tool_calls` change nothing here.)
_SAMPLING = {
    "n", "max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids", "seed", "ignore_eos",
    "logprobs", "min_tokens", "repetition_penalty", "presence_penalty", "frequency_penalty",
    "logit_bias", "allowed_token_ids",
}
_COMMON = _SAMPLING | {
    "model", "stream", "stream_options", "user", "request_id", "session_id", "return_token_ids", *_Extensions.model_fields,
}
COMPLETION_FIELDS = _COMMON | {"prompt"}
CHAT_FIELDS = _COMMON | {
    "messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls",
    "add_generation_prompt", "continue_final_message", "chat_template_kwargs", "documents", "include_reasoning",
}


def parse(model: type[CompletionBody] | type[ChatBody], data: Any) -> CompletionBody | ChatBody:
    """Validate a JSON body, raising InvalidArgument that names the first offending field."""
    if not isinstance(data, dict):
        raise InvalidArgument("body", f"expected a JSON object, got {type(data).__name__}")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise invalid_argument_from(exc.errors(include_url=False)) from None
    except VLLMValidationError as exc:  # vLLM's own checks, which pydantic passes through
        raise InvalidArgument(getattr(exc, "parameter", None) or "body", str(exc)) from None
    handled = CHAT_FIELDS if isinstance(body, ChatBody) else COMPLETION_FIELDS
    for name in sorted(body.model_fields_set - handled):
        field = type(body).model_fields.get(name)
        if field is not None and getattr(body, name) != field.get_default(call_default_factory=True):
            raise InvalidArgument(name, f"is not supported by rollout-service (got {getattr(body, name)!r}); leave it unset")
    if isinstance(body, ChatBody):
        if body.tools and body.tool_choice not in (None, "auto", "none"):
            # "required" and a named function force a call through structured outputs, which the service does not run.
            raise InvalidArgument("tool_choice", f"{body.tool_choice!r} is not supported: use \"auto\" or \"none\"")
        _text_only(data.get("messages"))
    return body


def _text_only(messages) -> None:
    """Refuse image, audio, video and file parts: the models served are text models, and vLLM's
    renderer would fetch a part's URL (from the front end) before anything else looked at it."""
    for i, message in enumerate(messages or []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise InvalidArgument(f"messages[{i}].content[{j}]", f"a {kind!r} part: only text parts are served")


def check_model(name: str | None, config: ServerConfig) -> None:
    """A request may name the served model or its checkpoint path, or no model at all."""
    if name and name not in (config.model_name, str(config.model)):
        raise NotFound(f"model {name!r} is not served here; this server serves {config.model_name!r} (see /v1/models)")


def sampling(
    body: CompletionBody | ChatBody, max_tokens: int, logprobs: int, skip_special_tokens: bool = True
) -> SamplingOptions:
    """The request's sampling options, in the service's terms (OpenAI's defaults where unset)."""
    try:
        return SamplingOptions(
            n=body.n or 1,
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k or 0, 0),  # vLLM and some clients say "off" with -1
            min_p=body.min_p or 0.0,
            stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []),
            seed=body.seed,
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            min_tokens=body.min_tokens,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            logit_bias=_logit_bias(body.logit_bias),
            allowed_token_ids=list(body.allowed_token_ids or []),
            skip_special_tokens=skip_special_tokens,
        )
    except ValidationError as exc:
        raise invalid_argument_from(exc.errors(include_url=False)) from None


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float]:
    out = {}
    for key, value in (bias or {}).items():
        shown = key if len(key) <= 40 else f"{key[:40]}..."
        try:
            out[int(key)] = value
        except ValueError:  # not an integer, or one of more than 4,300 digits
            raise InvalidArgument(f"logit_bias[{shown}]", f"keys are token ids; {shown!r} is not one") from None
    return out


def _generate_request(body: CompletionBody | ChatBody, prompts: list[dict], options: SamplingOptions) -> GenerateRequest:
    """The GenerateRequest of a body: its prompts ({"text"} or {"token_ids"}) and options, with
    the same checks and field names as /v1/generate's ("prompts[1].token_ids", said as OpenAI says
    them by responses.error_body)."""
    try:
        return GenerateRequest.model_validate({
            "prompts": prompts,
            "sampling": options,
            "request_id": body.request_id if "request_id" in body.model_fields_set else "",
            "session_id": body.session_id or "",
            "min_weight_version": body.min_weight_version,
            "max_staleness": body.max_staleness,
        })
    except ValidationError as exc:
        raise invalid_argument_from(exc.errors(include_url=False)) from None


def completion_request(body: CompletionBody) -> GenerateRequest:
    """A /v1/completions body as a GenerateRequest (max_tokens: vLLM's request model makes an
    unset or null one 16, as OpenAI's default)."""
    prompt = body.prompt
    if prompt is None or prompt == [] or prompt == "":
        raise InvalidArgument("prompt", "is required: a string, a list of strings, token ids or lists of token ids")
    if isinstance(prompt, str):
        prompts = [{"text": prompt}]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [{"token_ids": prompt}]
    else:
        prompts = []
        for i, p in enumerate(prompt):
            if not p:
                raise InvalidArgument(f"prompt[{i}]", "is empty")
            prompts.append({"text": p} if isinstance(p, str) else {"token_ids": p})
    return _generate_request(body, prompts, sampling(body, body.max_tokens or 16, body.logprobs or 0))


def chat_request(
    body: ChatBody, prompt_token_ids: list[int], context: int, limit: int | None = None, keep_special_tokens: bool = False
) -> GenerateRequest:
    """A /v1/chat/completions body whose messages rendered to `prompt_token_ids`. Without
    max_completion_tokens or max_tokens a chat may use the rest of the `context`, up to the
    server's max_tokens_per_sample (`limit`). `keep_special_tokens`: for a tool-call parser that
    reads them (ModelText.keeps_special_tokens)."""
    asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = asked if asked is not None else min(max(context - len(prompt_token_ids), 1), limit or context)
    options = sampling(body, max_tokens, body.top_logprobs or 0, skip_special_tokens=not keep_special_tokens)
    return _generate_request(body, [{"token_ids": prompt_token_ids}], options)
