"""The model's side of the OpenAI layer, done by vLLM's own code: chat messages rendered into prompt
token ids by vLLM's renderer (the checkpoint's chat template, content parts, tool definitions),
tool calls parsed out of sampled text by vLLM's tool-call parsers, token ids decoded to the strings
OpenAI's logprobs carry.

Built once per front end (the server process, or the Serve ingress: it has no engine to borrow a
renderer from), on the first OpenAI call (routes.py): a vLLM ModelConfig reads the checkpoint's
config and tokenizer, about 2 s.
"""

from __future__ import annotations

import functools
from typing import Any

from rollout_service.config import ServerConfig
from rollout_service.errors import ConfigError, FailedPrecondition, InvalidArgument


def check_tool_call_parser(name: str) -> None:
    """Raise ConfigError unless vLLM has a tool-call parser of this name (checked at start)."""
    from vllm.tool_parsers import ToolParserManager

    known = ToolParserManager.list_registered()
    if name not in known:
        raise ConfigError(f"tool_call_parser={name!r} is not one of vLLM's tool-call parsers: {', '.join(known)}")


class ModelText:
    """Rendering, tool-call parsing and token strings for one checkpoint."""

    def __init__(self, config: ServerConfig):
        from vllm.config import ModelConfig, VllmConfig
        from vllm.renderers import renderer_from_config

        model_config = ModelConfig(
            model=str(config.model), max_model_len=config.max_model_len, generation_config="vllm", dtype=config.dtype
        )
        self.context = model_config.max_model_len
        self._renderer = renderer_from_config(VllmConfig(model_config=model_config))
        self.tokenizer = self._renderer.get_tokenizer()
        self._parser = None
        if config.tool_call_parser:
            from vllm.tool_parsers import ToolParserManager

            self._parser = ToolParserManager.get_tool_parser(config.tool_call_parser)

    async def render(self, body) -> list[int]:
        """The prompt token ids of a chat body's messages (its tools in the template unless
        tool_choice is "none"), as vLLM's server renders them."""
        from vllm.exceptions import VLLMValidationError
        from vllm.renderers.chat_utils import ChatTemplateResolutionError

        tools = None if not body.tools or body.tool_choice == "none" else [t.model_dump() for t in body.tools]
        params = body.build_chat_params(None, "auto").with_defaults({"tools": tools} if tools else None)
        try:
            _, prompt = await self._renderer.render_messages_async(body.messages, params)
        except ChatTemplateResolutionError as exc:
            raise FailedPrecondition(f"the model has no chat template: {exc}") from None
        except (VLLMValidationError, ValueError, TypeError, KeyError) as exc:
            raise InvalidArgument("messages", f"the chat template could not render them: {exc}") from None
        if "prompt_token_ids" in prompt:
            return list(prompt["prompt_token_ids"])
        return self.tokenizer.encode(prompt["prompt"], add_special_tokens=False)

    def tool_calls(self, body, sample) -> tuple[str | None, list[Any]]:
        """(content, tool calls) of a sample: with a tool-call parser configured and tools in the
        request (tool_choice not "none"), what vLLM's parser finds; otherwise (its text, [])."""
        if self._parser is None or not body.tools or body.tool_choice == "none":
            return sample.text, []
        parser = self._parser(self.tokenizer, body.tools)
        # A parser may need the text with special tokens kept (its markers are special tokens in
        # many models); vLLM's server asks the engine for that text, here the ids are decoded again.
        wanted = parser.adjust_request(body.model_copy())
        text = sample.text
        if not wanted.skip_special_tokens:
            text = self.tokenizer.decode(sample.token_ids, skip_special_tokens=False)
        found = parser.extract_tool_calls(text, wanted)
        return (found.content, list(found.tool_calls)) if found.tools_called else (sample.text, [])

    def tool_stream(self, body) -> ToolCallStream | None:
        """A streaming tool-call parse of one choice, when tool_calls() would parse it whole."""
        if self._parser is None or not body.tools or body.tool_choice == "none":
            return None
        parser = self._parser(self.tokenizer, body.tools)
        return ToolCallStream(parser, self.tokenizer, parser.adjust_request(body.model_copy()))

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one instance per server, kept for its life)
    def token_text(self, token_id: int) -> str:
        """One token's text, as vLLM's server shows it in logprobs (a partial UTF-8 character: U+FFFD)."""
        return self.tokenizer.decode([token_id])


class ToolCallStream:
    """vLLM's streaming tool-call parser over one streamed choice: what each piece adds to the
    message (content, or tool-call deltas once the parser sees a call begin)."""

    def __init__(self, parser, tokenizer, request):
        self._parser, self._tokenizer, self._request = parser, tokenizer, request
        self._text, self._ids = "", []
        self.called = False  # a tool-call delta was sent

    def delta(self, sample) -> dict:
        ids = self._ids + sample.token_ids
        if self._request.skip_special_tokens:
            text = self._text + sample.text
        else:  # the parser's markers are special tokens: decoded again with them, as in tool_calls()
            text = self._tokenizer.decode(ids, skip_special_tokens=False)
        found = self._parser.extract_tool_calls_streaming(
            self._text, text, text[len(self._text):], self._ids, ids, sample.token_ids, self._request
        )
        self._text, self._ids = text, ids
        if found is None:  # the parser holds these tokens back (a call may be starting)
            return {}
        self.called |= bool(found.tool_calls)
        return found.model_dump(exclude_none=True)
