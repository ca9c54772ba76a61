"""The OpenAI layer without an engine: request bodies into GenerateRequests, Completions into
OpenAI's shapes (parsed back by the `openai` package's own types), errors in OpenAI's terms, chat
rendering and tool-call parsing by vLLM's own renderer and parser on the tiny model's template."""

from __future__ import annotations

from array import array
import json

import openai.types
import openai.types.chat
import pytest

from rollout_service.api.openai_compat import bodies, responses
from rollout_service.api.openai_compat.chat import ModelText, check_tool_call_parser
from rollout_service.config import ServerConfig
from rollout_service.errors import ConfigError, InvalidArgument, NotFound, Overloaded
from rollout_service.types import Completion, Sample, TopLogprobs

TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers.",
                                            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}}}}]


@pytest.fixture(scope="module")
def config(tiny_model) -> ServerConfig:
    return ServerConfig(model=tiny_model, served_model_name="tiny", tool_call_parser="hermes", max_model_len=256)


def test_the_openai_layer_loads_vllm_only_when_first_called():
    import subprocess
    import sys

    code = "import sys, rollout_service.api.http_app; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # a Serve ingress that serves no OpenAI call never imports it


@pytest.fixture(scope="module")
def text(config) -> ModelText:
    return ModelText(config)


def completion(*, n: int = 1, tokens=(5, 6, 7), text: str = "abc", runs=((3, 3),)) -> Completion:
    runs = runs if sum(c for _, c in runs) == len(tokens) else ((runs[-1][0], len(tokens)),)
    samples = [
        Sample(token_ids=list(tokens), text=text, logprobs=[-0.5] * len(tokens), finish_reason="stop", weight_version=runs[-1][0],
               first_weight_version=runs[0][0], top_logprobs=[TopLogprobs([9, 10], [-0.1, -2.0])] * len(tokens),
               token_weight_versions=[list(r) for r in runs], index=j)
        for j in range(n)
    ]
    return Completion(prompt_index=0, prompt_token_ids=array("i", [1, 2, 3, 4]), samples=samples, cached_prompt_tokens=2)


@pytest.mark.parametrize("field, value", [
    ("echo", True), ("use_beam_search", True), ("suffix", "x"), ("prompt_logprobs", 1), ("bad_words", ["no"]),
    ("response_format", {"type": "json_object"}), ("include_stop_str_in_output", True), ("add_special_tokens", False),
])
def test_a_field_the_service_does_not_do_is_refused_by_name(field, value):
    with pytest.raises(InvalidArgument, match="is not supported") as err:
        bodies.parse(bodies.CompletionBody, {"prompt": "x", field: value})
    assert err.value.field == field


def test_fields_neither_openai_nor_vllm_know_are_ignored_and_defaults_are_openais():
    body = bodies.parse(bodies.CompletionBody, {"prompt": "hello", "metadata": {"run": 1}, "store": False})
    req = bodies.completion_request(body)
    s = req.sampling
    assert (s.n, s.max_tokens, s.temperature, s.top_p, s.top_k, s.logprobs) == (1, 16, 1.0, 1.0, 0, 0)
    assert req.prompts[0].text == "hello"


def test_every_prompt_form_becomes_the_same_prompts():
    def prompts(prompt):
        body = bodies.parse(bodies.CompletionBody, {"prompt": prompt})
        return [(p.text, p.token_ids and p.token_ids.tolist()) for p in bodies.completion_request(body).prompts]

    assert prompts("a") == [("a", None)]
    assert prompts(["a", "b"]) == [("a", None), ("b", None)]
    assert prompts([1, 2]) == [(None, [1, 2])]
    assert prompts([[1, 2], [3]]) == [(None, [1, 2]), (None, [3])]
    with pytest.raises(InvalidArgument, match="prompt: is required"):
        prompts([])


def test_sampling_options_map_to_the_services():
    body = bodies.parse(bodies.ChatBody, {
        "messages": [{"role": "user", "content": "x"}], "n": 3, "max_completion_tokens": 9, "temperature": 0.7,
        "top_p": 0.9, "top_k": -1, "min_p": 0.1, "stop": "END", "seed": 5, "logprobs": True, "top_logprobs": 4,
        "logit_bias": {"17": -5.0}, "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.1,
        "session_id": "episode-7", "ignore_eos": True, "min_tokens": 2,
    })
    req = bodies.chat_request(body, [1, 2, 3], context=256)
    s = req.sampling
    assert (s.n, s.max_tokens, s.temperature, s.top_p, s.top_k, s.min_p, s.stop, s.seed, s.logprobs) == (3, 9, 0.7, 0.9, 0, 0.1, ["END"], 5, 4)
    assert (s.logit_bias, s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == ({17: -5.0}, 0.5, 0.25, 1.1)
    assert (s.ignore_eos, s.min_tokens, req.session_id, req.prompts[0].token_ids.tolist()) == (True, 2, "episode-7", [1, 2, 3])


def test_a_chat_without_max_tokens_may_use_the_rest_of_the_context_up_to_the_servers_limit():
    body = bodies.parse(bodies.ChatBody, {"messages": [{"role": "user", "content": "x"}]})
    assert bodies.chat_request(body, [1] * 200, context=256).sampling.max_tokens == 56
    assert bodies.chat_request(body, [1] * 200, context=256, limit=32).sampling.max_tokens == 32
    asked = bodies.parse(bodies.ChatBody, {"messages": [{"role": "user", "content": "x"}], "max_tokens": 7})
    assert bodies.chat_request(asked, [1] * 200, context=256, limit=32).sampling.max_tokens == 7


def test_version_requirements_reach_the_generate_request():
    body = bodies.parse(bodies.CompletionBody, {"prompt": "x", "min_weight_version": 3, "max_staleness": 1})
    req = bodies.completion_request(body)
    assert (req.min_weight_version, req.max_staleness) == (3, 1)


@pytest.mark.parametrize("part", [
    {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}},
    {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}},
])
def test_media_parts_are_refused_before_anything_reads_them(part):
    messages = [{"role": "user", "content": [{"type": "text", "text": "look"}, part]}]
    with pytest.raises(InvalidArgument, match=r"only text parts are served") as err:
        bodies.parse(bodies.ChatBody, {"messages": messages})
    assert err.value.field == "messages[0].content[1]"


def test_bad_values_are_named_as_openai_names_them():
    with pytest.raises(InvalidArgument) as err:
        bodies.completion_request(bodies.parse(bodies.CompletionBody, {"prompt": "x", "top_p": 0}))
    assert responses.error_body(err.value)["error"]["param"] == "top_p"
    with pytest.raises(InvalidArgument, match=r"logit_bias\[tok\]"):
        bodies.completion_request(bodies.parse(bodies.CompletionBody, {"prompt": "x", "logit_bias": {"tok": 1}}))
    with pytest.raises(InvalidArgument, match="tool_choice: 'required' is not supported"):
        bodies.parse(bodies.ChatBody, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "required"})
    with pytest.raises(InvalidArgument, match="body: expected a JSON object"):
        bodies.parse(bodies.ChatBody, [1, 2])


def test_errors_take_openais_shape_with_fields_in_its_terms():
    vocab = InvalidArgument("prompts[1].token_ids[0]", "token id 99999 is outside the vocabulary [0, 2048)")
    assert responses.error_body(vocab)["error"] == {
        "message": "prompt[1].token_ids[0]: token id 99999 is outside the vocabulary [0, 2048)",
        "type": "invalid_request_error", "param": "prompt[1].token_ids[0]", "code": "INVALID_ARGUMENT",
    }
    assert responses.error_body(InvalidArgument("prompts[0]", "too long"), chat=True)["error"]["param"] == "messages"
    assert responses.error_body(InvalidArgument("sampling.n", "too many"))["error"]["message"] == "n: too many"
    assert responses.error_body(NotFound("no such model"))["error"]["type"] == "not_found_error"
    assert responses.error_body(Overloaded("full"))["error"]["type"] == "rate_limit_error"
    assert responses.error_body(RuntimeError("secret detail"))["error"] == {
        "message": "internal error (RuntimeError); see the server log", "type": "server_error", "param": None, "code": "INTERNAL"}


def test_the_served_name_or_the_checkpoint_path_may_be_named(config):
    bodies.check_model(None, config)
    bodies.check_model("tiny", config)
    bodies.check_model(str(config.model), config)
    with pytest.raises(NotFound, match="this server serves 'tiny'"):
        bodies.check_model("gpt-4o", config)


def test_an_unknown_tool_call_parser_is_a_config_error():
    check_tool_call_parser("hermes")
    with pytest.raises(ConfigError, match="'nope' is not one of vLLM's tool-call parsers: .*hermes"):
        check_tool_call_parser("nope")


async def test_chat_renders_with_the_models_own_template_tools_included(text, tiny_model):
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "Answer with a tool."},
        {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{\"a\": 2}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "4"},
    ]
    body = bodies.parse(bodies.ChatBody, {"messages": messages, "tools": TOOLS})
    ids = await text.render(body)
    hf = AutoTokenizer.from_pretrained(tiny_model)
    plain = [dict(m, content="What is 2+2?") if m["role"] == "user" else m for m in messages]
    plain[2] = dict(plain[2], tool_calls=[{"id": "c1", "type": "function", "function": {"name": "add", "arguments": {"a": 2}}}])
    expected = hf.apply_chat_template(plain, tools=TOOLS, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == expected
    assert hf.decode(ids).endswith("<tool_response>\n4\n</tool_response><|endoftext|><|im_start|>assistant\n")
    no_tools = await text.render(bodies.parse(bodies.ChatBody, {"messages": messages, "tools": TOOLS, "tool_choice": "none"}))
    assert "# Tools" not in hf.decode(no_tools)


def test_a_client_chat_template_is_refused():  # templates run code in the server's Jinja sandbox: the model's only
    with pytest.raises(InvalidArgument, match="chat_template: is not supported"):
        bodies.parse(bodies.ChatBody, {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"})


def test_sampled_tool_calls_are_parsed_by_vllms_parser(text):
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>'
    ids = text.tokenizer.encode(call) + [text.tokenizer.eos_token_id]  # as sampled: the parser reads them again
    body = bodies.parse(bodies.ChatBody, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
    reply = responses.chat_response(body, completion(text=call, tokens=ids), text, {"id": "chatcmpl-1", "created": 0, "model": "tiny"})
    parsed = openai.types.chat.ChatCompletion.model_validate(reply)
    (choice,) = parsed.choices
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "add"
    assert json.loads(choice.message.tool_calls[0].function.arguments) == {"a": 2}
    none = bodies.parse(bodies.ChatBody, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "tool_choice": "none"})
    kept = responses.chat_response(none, completion(text=call, tokens=ids), text, {"id": "c", "created": 0, "model": "tiny"})
    assert kept["choices"][0]["message"] == {"role": "assistant", "content": call}


def test_completion_choices_carry_logprobs_token_ids_and_versions_in_openais_shape(text):
    body = bodies.parse(bodies.CompletionBody, {"prompt": [1, 2, 3, 4], "n": 2, "logprobs": 2, "return_token_ids": True,
                                                    "token_weight_versions": True})
    c = completion(n=2, runs=((3, 1), (4, 2)))
    reply = responses.completion_response(body, [c], text, {"id": "cmpl-1", "created": 0, "model": "tiny"})
    parsed = openai.types.Completion.model_validate(reply)
    assert [ch.index for ch in parsed.choices] == [0, 1]
    choice = parsed.choices[0]
    assert choice.logprobs.token_logprobs == [-0.5] * 3
    assert choice.logprobs.tokens == [text.token_text(t) for t in (5, 6, 7)]
    assert choice.logprobs.top_logprobs[0] == {text.token_text(9): -0.1, text.token_text(10): -2.0}
    extra = choice.model_extra
    assert (extra["token_ids"], extra["prompt_token_ids"]) == ([5, 6, 7], [1, 2, 3, 4])
    assert (extra["first_weight_version"], extra["weight_version"], extra["token_weight_versions"]) == (3, 4, [[3, 1], [4, 2]])
    assert parsed.usage.prompt_tokens == 4 and parsed.usage.completion_tokens == 6
    assert parsed.usage.prompt_tokens_details.cached_tokens == 2


def pieces(ids: list[int], text: ModelText, n: int = 1) -> list[Completion]:
    """A completion of `ids` streamed one token a piece (stream_tokens), as the engine gives it:
    the prompt in the first piece, finish reason and versions in the last."""
    out = []
    for k, token in enumerate(ids):
        last = k == len(ids) - 1
        samples = [
            Sample(token_ids=[token], text=text.tokenizer.decode([token]), logprobs=[-0.5], finish_reason="stop" if last else None,
                   weight_version=4 if last else 0, first_weight_version=4 if last else 0,
                   token_weight_versions=[[4, len(ids)]] if last else [], index=j)
            for j in range(n)
        ]
        out.append(Completion(prompt_index=0, prompt_token_ids=array("i", [1, 2, 3, 4] if k == 0 else []), samples=samples,
                              cached_prompt_tokens=2 if k == 0 else 0))
    return out


def test_a_streamed_chat_sends_the_role_first_then_each_pieces_content(text):
    body = bodies.parse(bodies.ChatBody, {"messages": [{"role": "user", "content": "x"}], "n": 2, "stream": True, "logprobs": True})
    ids = text.tokenizer.encode("one two three")
    stream = responses.ChatStream(body, text, {"id": "c", "created": 0, "model": "tiny"})
    chunks = [openai.types.chat.ChatCompletionChunk.model_validate(stream.chunk(p)) for p in pieces(ids, text, n=2)]
    assert [c.delta.role for c in chunks[0].choices] == ["assistant", "assistant"]
    assert {c.delta.role for chunk in chunks[1:] for c in chunk.choices} == {None}
    for j in (0, 1):
        assert "".join(chunk.choices[j].delta.content for chunk in chunks) == "one two three"
        assert [chunk.choices[j].finish_reason for chunk in chunks] == [None] * (len(ids) - 1) + ["stop"]
    assert [len(chunk.choices[1].logprobs.content) for chunk in chunks] == [1] * len(ids)
    assert "weight_version" not in chunks[0].choices[0].model_extra  # versions come with the last piece
    assert chunks[-1].choices[0].model_extra["weight_version"] == 4


def test_a_streamed_tool_call_is_parsed_piece_by_piece_by_vllms_streaming_parser(text):
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 2}}\n</tool_call>'
    ids = text.tokenizer.encode(call) + [text.tokenizer.eos_token_id]
    body = bodies.parse(bodies.ChatBody, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "stream": True})
    stream = responses.ChatStream(body, text, {"id": "c", "created": 0, "model": "tiny"})
    chunks = [openai.types.chat.ChatCompletionChunk.model_validate(stream.chunk(p)) for p in pieces(ids, text)]
    calls = [call for chunk in chunks for call in chunk.choices[0].delta.tool_calls or ()]
    assert len(calls) > 1  # deltas, not the whole call at the end
    assert {c.function.name for c in calls if c.function and c.function.name} == {"add"}
    assert json.loads("".join(c.function.arguments or "" for c in calls if c.function)) == {"a": 2}
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks).strip()
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_streamed_completion_pieces_continue_their_choices_offsets_and_carry_the_prompt_once(text):
    body = bodies.parse(bodies.CompletionBody, {"prompt": [1, 2, 3, 4], "n": 2, "logprobs": 0, "return_token_ids": True,
                                                    "stream": True})
    ids = text.tokenizer.encode("one two three")
    stream = responses.CompletionStream(body, text, {"id": "cmpl-1", "created": 0, "model": "tiny"})
    parts = pieces(ids, text, n=2)
    parts[0].samples.pop()  # sample 1's first tokens come a piece later (vLLM steps a prompt's n samples apart)
    # As JSON: OpenAI's client reads stream chunks without validating them (a piece's finish_reason is null).
    chunks = [json.loads(json.dumps(stream.chunk(p))) for p in parts]
    chunks[0]["choices"].append(None)  # keeps the columns below aligned
    for j in (0, 1):
        choices = [chunk["choices"][j] for chunk in chunks if chunk["choices"][j] is not None]
        if j == 1:
            ids_1 = ids[1:]
            assert [c["index"] for c in choices] == [1] * len(ids_1)
            assert choices[0]["prompt_token_ids"] == [1, 2, 3, 4] and all("prompt_token_ids" not in c for c in choices[1:])
            assert "".join(c["text"] for c in choices) == "".join(text.token_text(t) for t in ids_1)
            continue
        assert [c["index"] for c in choices] == [j] * len(ids)
        assert "".join(c["text"] for c in choices) == "".join(text.token_text(t) for t in ids)
        sent = [len("".join(text.token_text(t) for t in ids[:k])) for k in range(len(ids))]
        assert [c["logprobs"]["text_offset"][0] for c in choices] == sent
        assert [c.get("prompt_token_ids") for c in choices] == [[1, 2, 3, 4]] + [None] * (len(ids) - 1)
        assert [c["token_ids"] for c in choices] == [[t] for t in ids]
        assert [c["finish_reason"] for c in choices] == [None] * (len(ids) - 1) + ["stop"]


def test_a_plain_answer_with_tools_on_streams_as_its_content(text):
    ids = text.tokenizer.encode("The answer is 4.")
    body = bodies.parse(bodies.ChatBody, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS, "stream": True})
    stream = responses.ChatStream(body, text, {"id": "c", "created": 0, "model": "tiny"})
    chunks = [openai.types.chat.ChatCompletionChunk.model_validate(stream.chunk(p)) for p in pieces(ids, text)]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == "The answer is 4."
    assert chunks[-1].choices[0].finish_reason == "stop" and not any(c.choices[0].delta.tool_calls for c in chunks)


def test_the_chat_route_keeps_special_tokens_only_for_a_parser_that_reads_them(text):
    with_tools = bodies.parse(bodies.ChatBody, {"messages": [{"role": "user", "content": "x"}], "tools": TOOLS})
    without = bodies.parse(bodies.ChatBody, {"messages": [{"role": "user", "content": "x"}]})
    assert text.keeps_special_tokens(with_tools) and not text.keeps_special_tokens(without)  # hermes reads <tool_call>
