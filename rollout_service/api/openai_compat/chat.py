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

    def _parser_for(self, body):
        """vLLM's tool-call parser for this call, or None: none configured, no tools, or
        tool_choice "none"."""
        if self._parser is None or not body.tools or body.tool_choice == "none":
            return None
        return self._parser(self.tokenizer, body.tools)

    def keeps_special_tokens(self, body) -> bool:
        """Whether the call's text must keep special tokens for its parser (many models' tool-call
        markers are special tokens): vLLM's server asks the engine for that text, and so does the
        chat route (SamplingOptions.skip_special_tokens)."""
        parser = self._parser_for(body)
        return parser is not None and not parser.adjust_request(body.model_copy()).skip_special_tokens

    def tool_calls(self, body, sample) -> tuple[str | None, list[Any]]:
        """(content, tool calls) of a sample: with a tool-call parser configured and tools in the
        request (tool_choice not "none"), what vLLM's parser finds in its text (special tokens kept
        where the parser wants them: keeps_special_tokens); otherwise (its text, [])."""
        parser = self._parser_for(body)
        if parser is None:
            return sample.text, []
        found = parser.extract_tool_calls(sample.text, parser.adjust_request(body.model_copy()))
        return (found.content, list(found.tool_calls)) if found.tools_called else (sample.text, [])

    def tool_stream(self, body) -> ToolCallStream | None:
        """A streaming tool-call parse of one choice, when tool_calls() would parse it whole."""
        parser = self._parser_for(body)
        return None if parser is None else ToolCallStream(parser, parser.adjust_request(body.model_copy()))

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one instance per server, kept for its life)
    def token_text(self, token_id: int) -> str:
        """One token's text, as vLLM's server shows it in logprobs (a partial UTF-8 character: U+FFFD)."""
        return self.tokenizer.decode([token_id])


class ToolCallStream:
    """vLLM's streaming tool-call parser over one streamed choice: what each piece adds to the
    message (content, or tool-call deltas once the parser sees a call begin). It reads the engine's
    incremental text, as vLLM's server feeds it (special tokens kept where the parser wants them)."""

    def __init__(self, parser, request):
        self._parser, self._request = parser, request
        self._text, self._ids = "", []
        self.called = False  # a tool-call delta was sent

    def delta(self, sample) -> dict:
        text, ids = self._text + sample.text, self._ids + sample.token_ids
        found = self._parser.extract_tool_calls_streaming(
            self._text, text, sample.text, self._ids, ids, sample.token_ids, self._request
        )
        self._text, self._ids = text, ids
        if sample.finish_reason is not None and found is not None and found.tool_calls and found.tool_calls[-1].function:
            # What the parser parsed but held back, with the last piece (vLLM's finalize_generation).
            last = found.tool_calls[-1].function
            last.arguments = (last.arguments or "") + self._parser.get_remaining_unstreamed_args()
        if found is None:  # the parser holds these tokens back (a call may be starting)
            return {}
        self.called |= bool(found.tool_calls)
        return found.model_dump(exclude_none=True)
