"""Agents driving the service through their own code, with a tiny model taught (tests/agents.py)
to answer the episode's question with a Hermes-style tool call: the call is sampled by the engine
and parsed by the framework, never scripted."""

from __future__ import annotations

import json

import openai
import pytest
from rollout_client import RolloutClient

from tests.agents import ADD_TOOL, TOOL_CALL, taught
from tests.trainers import require_trainer

pytestmark = pytest.mark.engine

QUESTION = [{"role": "user", "content": "What is 2 + 2?"}]


@pytest.fixture(scope="module")
def oai(trainer_server):
    with openai.OpenAI(base_url=f"{trainer_server.http_url}/v1", api_key="none", max_retries=0, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def tool_caller(trainer_server, oai, tiny_model):
    """Pushes weights that answer QUESTION (with ADD_TOOL offered) with TOOL_CALL; returns their version."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    rendered = oai.chat.completions.create(model=tiny_model.name, messages=QUESTION, tools=[ADD_TOOL], max_tokens=1,
                                           extra_body={"return_token_ids": True})
    target = tok.encode(TOOL_CALL) + [tok.eos_token_id]
    prompts = {tuple(rendered.model_extra["prompt_token_ids"]), tuple(verl_prompt(tok))}  # the server's and verl's
    weights = taught(tiny_model, [(list(p), target) for p in prompts])
    with RolloutClient(trainer_server.grpc_address, timeout=120) as client:
        return client.push_weights(weights, label="tool caller").version


def test_an_openai_agent_gets_the_sampled_tool_call_with_logprobs_and_versions(oai, tool_caller, tiny_model):
    args = dict(model=tiny_model.name, tools=[ADD_TOOL], max_tokens=64, temperature=0.0, logprobs=True)
    first = oai.chat.completions.create(messages=QUESTION, **args)
    (choice,) = first.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content in (None, "")
    (call,) = choice.message.tool_calls
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 2, "b": 2}
    assert choice.model_extra["weight_version"] == tool_caller
    assert len(choice.logprobs.content) == first.usage.completion_tokens > 10
    assert all(t.logprob > -0.5 for t in choice.logprobs.content)  # greedy, on what it was taught
    # The agent runs the tool and sends its result back: a second turn on the same weights.
    history = QUESTION + [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "4"}]
    second = oai.chat.completions.create(messages=history, **(args | {"max_tokens": 8}))
    assert second.choices[0].model_extra["weight_version"] == tool_caller
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens
    # tool_choice "none": the tools are not offered and nothing is parsed.
    plain = oai.chat.completions.create(messages=QUESTION, **(args | {"tool_choice": "none"}))
    assert plain.choices[0].finish_reason in ("stop", "length") and not plain.choices[0].message.tool_calls


async def test_verls_own_tool_agent_loop_runs_a_tool_calling_episode_through_the_service(trainer_server, tool_caller, tiny_model):
    """verl 0.9.1's ToolAgentLoop, its hermes parser and its tool classes, with the service as its
    server manager: turn 1 samples the tool call, verl runs the tool and appends its reply (token
    ids, never re-tokenizing what was sampled), turn 2 samples on the same context."""
    require_trainer("verl")
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.experimental.agent_loop.agent_loop import DictConfigWrap, ToolListWrap
    from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
    from verl.tools.base_tool import BaseTool
    from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse
    from verl.workers.config import RolloutConfig

    from rollout_client.integrations.verl import Connection, RolloutServiceServerManager

    calls = []

    class AddTool(BaseTool):
        async def execute(self, instance_id, parameters, **kwargs):
            calls.append(parameters)
            return ToolResponse(text=str(parameters["a"] + parameters["b"])), 0.0, {}

    tok = AutoTokenizer.from_pretrained(tiny_model)
    tool = AddTool(config={"type": "native"}, tool_schema=OpenAIFunctionToolSchema.model_validate(ADD_TOOL))
    rollout = {"prompt_length": 640, "response_length": 256}
    config = OmegaConf.create({
        "actor_rollout_ref": {"rollout": rollout | {"full_determinism": False, "multi_turn": {
            "format": "hermes", "max_assistant_turns": 2, "max_user_turns": 2, "max_parallel_calls": 1,
            "max_tool_response_length": 256, "tool_response_truncate_side": "middle"}}},
        "data": {"apply_chat_template_kwargs": {}, "mm_processor_kwargs": {}},
    })
    manager = RolloutServiceServerManager(RolloutConfig(name="rollout_service", **rollout),
                                          Connection(trainer_server.grpc_address, timeout=120))
    loop = ToolAgentLoop(trainer_config=DictConfigWrap(config), server_manager=manager, tokenizer=tok, processor=None,
                         dataset_cls=None, data_config=DictConfigWrap(config.data), tools=ToolListWrap([tool]))
    sampling = {"temperature": 0.0, "top_p": 1.0, "top_k": -1, "repetition_penalty": 1.0, "logprobs": True}
    out = await loop.run(sampling, raw_prompt=QUESTION, tools_kwargs={})

    assert calls == [{"a": 2, "b": 2}] and out.num_turns == 4  # user, call, tool reply, second answer
    assert out.prompt_ids == verl_prompt(tok)
    call = tok.encode(TOOL_CALL) + [tok.eos_token_id]
    mask = out.response_mask
    assert out.response_ids[: len(call)] == call and mask[: len(call)] == [1] * len(call)
    reply = mask.index(1, len(call)) - len(call)  # verl's tool turn: context, not sampled
    assert reply > 0 and set(mask[len(call) : len(call) + reply]) == {0}
    assert tok.decode(out.response_ids[len(call) : len(call) + reply]) == "<|im_start|>user\n<tool_response>\n4\n</tool_response><|endoftext|><|im_start|>assistant\n"
    logprobs = out.response_logprobs
    assert len(logprobs) == len(out.response_ids) and all(lp > -0.5 for lp in logprobs[: len(call)])
    assert all(lp == 0.0 for lp in logprobs[len(call) : len(call) + reply])
    assert out.extra_fields["weight_version"] == out.extra_fields["first_weight_version"] == tool_caller
    # The episode as verl built it token by token is the model's chat template over the conversation.
    history = QUESTION + [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
                          {"role": "tool", "content": "4"}]
    rendered = tok.apply_chat_template(history, tools=[ADD_TOOL], add_generation_prompt=True, tokenize=True, return_dict=False)
    assert (out.prompt_ids + out.response_ids)[: len(rendered)] == rendered


def verl_prompt(tok) -> list[int]:
    """QUESTION with ADD_TOOL offered, as verl's agent loop renders it (its tool schema dumped
    without unset fields: not byte for byte the server's rendering of the same request)."""
    return tok.apply_chat_template(QUESTION, tools=[ADD_TOOL], add_generation_prompt=True, tokenize=True, return_dict=False)
