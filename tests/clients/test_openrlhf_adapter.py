"""The OpenRLHF adapter with the real OpenRLHF 0.11.2 package (installed --no-deps, see
clients/python/trainer-adapters.txt) against a real server: OpenRLHF's own SingleTurnAgentExecutor
drives the engine, with vLLM's real SamplingParams."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("openrlhf", reason="make install puts openrlhf in .venv (clients/python/trainer-adapters.txt)")
from vllm import SamplingParams  # noqa: E402

from rollout_client.integrations.openrlhf import RolloutServiceEngine, push_model, sampling_kwargs  # noqa: E402

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def engine(trainer_server, tiny_model):
    e = RolloutServiceEngine(trainer_server.grpc_address, timeout=120)
    e.client.push_weights(load_file(tiny_model / "model.safetensors"), progress=False)
    return e


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


async def test_generate_returns_a_vllm_shaped_request_output_with_logprobs(engine):
    out = await engine.generate([5, 6, 7, 8], SamplingParams(n=2, max_tokens=6, temperature=1.0, seed=3, logprobs=0, ignore_eos=True))
    assert out.prompt_token_ids == [5, 6, 7, 8] and len(out.outputs) == 2
    for o in out.outputs:
        assert len(o.token_ids) == 6 and o.finish_reason == "length"
        lps = [entry[tok].logprob for tok, entry in zip(o.token_ids, o.logprobs)]
        assert o.cumulative_logprob == pytest.approx(sum(lps), abs=1e-4)


async def test_openrlhfs_single_turn_executor_runs_on_the_engine(engine, tokenizer):
    params = SamplingParams(max_tokens=8, temperature=1.0, logprobs=0, ignore_eos=True)
    results = await engine.generate_responses(
        prompt="The trainer computes", label="x", sampling_params=params, max_length=64, hf_tokenizer=tokenizer, num_samples=3
    )
    prompt_ids = tokenizer("The trainer computes", add_special_tokens=False)["input_ids"]
    assert len(results) == 3
    for r in results:
        start, end = r["action_ranges"][0]
        assert r["observation_tokens"][:start] == prompt_ids and end - start == 8 and r["truncated"] is True
        lps = r["rollout_log_probs"]
        assert len(lps) == end and lps[:start] == [0.0] * start and all(lp < 0 for lp in lps[start:])


def test_push_model_streams_a_torch_model_and_the_service_serves_it(engine, tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.bfloat16)
    greedy = dict(prompt_token_ids=[[9, 8, 7, 6]], max_tokens=6, temperature=0.0, ignore_eos=True)
    before = engine.client.generate(**greedy)[0].samples[0].token_ids
    with torch.no_grad():
        model.model.norm.weight.neg_()
    result = push_model(model, engine.client, label="openrlhf step")
    after = engine.client.generate(**greedy)[0].samples[0]
    assert result.tensors_applied == len(list(model.parameters())) and after.weight_version == result.version
    assert after.token_ids != before
    with torch.no_grad():
        model.model.norm.weight.neg_()
    push_model(model, engine.client)
    assert engine.client.generate(**greedy)[0].samples[0].token_ids == before


def test_unfinished_requests_are_read_from_the_service(engine):
    assert engine.get_num_unfinished_requests() == 0


def test_a_sampling_setting_the_service_lacks_is_refused_by_name():
    with pytest.raises(ValueError, match="SamplingParams.include_stop_str_in_output=True"):
        sampling_kwargs(SamplingParams(include_stop_str_in_output=True))


def test_vllm_defaults_map_onto_the_service_defaults():
    assert sampling_kwargs(SamplingParams(max_tokens=7)) == {
        "n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_tokens": 7, "stop": [],
        "stop_token_ids": [], "ignore_eos": False, "repetition_penalty": 1.0, "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }


def test_openrlhf_s_own_sampling_settings_pass_through(engine):
    """OpenRLHF always sends min_tokens=1; penalties, logit bias and allowed ids are served as set."""
    params = SamplingParams(max_tokens=6, temperature=1.0, min_tokens=1, repetition_penalty=1.2, presence_penalty=0.3,
                            frequency_penalty=0.2, logit_bias={5: 1.5}, allowed_token_ids=[5, 6, 7, 8], seed=1)
    kwargs = sampling_kwargs(params)
    assert kwargs | {"min_tokens": 1, "repetition_penalty": 1.2, "logit_bias": {5: 1.5}, "allowed_token_ids": [5, 6, 7, 8]} == kwargs
    sample = engine.client.generate(prompt_token_ids=[[11, 12, 13]], **kwargs)[0].samples[0]
    assert len(sample.token_ids) >= 1 and set(sample.token_ids) <= {5, 6, 7, 8}


def test_joining_an_nccl_group_explains_what_to_call_instead(engine):
    with pytest.raises(RuntimeError, match="push_model"):
        engine.init_process_group("localhost", 1234, 1, 2, "g", "nccl")


def test_the_adapters_can_be_built_where_no_event_loop_runs():
    """As in a Ray actor's constructor: the asyncio channel is made on first use, in its loop."""
    import subprocess
    import sys

    code = (
        "from rollout_client.integrations.openrlhf import RolloutServiceEngine\n"
        "from verl.workers.config import RolloutConfig\n"
        "from rollout_client.integrations.verl import Connection, RolloutServiceServer\n"
        "RolloutServiceEngine('127.0.0.1:1', executor=object())\n"
        "RolloutServiceServer(RolloutConfig(name='rollout_service'), 0, Connection('127.0.0.1:1')); print('built')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "built", out.stderr[-2000:]
