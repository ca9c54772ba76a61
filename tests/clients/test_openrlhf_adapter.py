"""The OpenRLHF adapter with the real OpenRLHF 0.11.2 package (installed --no-deps, see
clients/python/trainer-adapters.txt) against a real server: OpenRLHF's own SingleTurnAgentExecutor
drives the engine, with vLLM's real SamplingParams."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.trainers import require_trainer

require_trainer("openrlhf")  # skipped where not installed; in CI a failure
from vllm import SamplingParams  # noqa: E402

from rollout_client.integrations.connection import Connection  # noqa: E402
from rollout_client.integrations.openrlhf import RolloutServiceEngine, push_model, sampling_kwargs  # noqa: E402
from rollout_client.integrations.openrlhf_train import main, service_engines  # noqa: E402

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


async def test_the_engines_pushes_are_fenced_on_its_previous_push(trainer_server, tiny_model):
    from rollout_client import FailedPreconditionError, RolloutClient

    weights = load_file(tiny_model / "model.safetensors")
    own = RolloutServiceEngine(trainer_server.grpc_address, timeout=120, executor=object())
    first = await own.push_weights(weights.items())
    assert (await own.push_weights(weights.items())).version == first.version + 1
    with RolloutClient(trainer_server.grpc_address, timeout=120) as foreign:
        foreign.push_weights(weights, label="someone else", progress=False)
    with pytest.raises(FailedPreconditionError, match=f"expected_version: {first.version + 1} is stale"):
        await own.push_weights(weights.items())


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


async def test_unfinished_sequences_are_this_engines_own_and_pausing_holds_new_calls(engine):
    import asyncio

    params = SamplingParams(n=3, max_tokens=4, temperature=1.0)
    calls_before = engine.client.status().counters.requests_total
    await engine.pause_generation()
    held = asyncio.ensure_future(engine.generate([5, 6, 7], params))
    await asyncio.sleep(0)  # one turn of the loop: the call runs up to the pause
    assert engine.get_num_unfinished_requests() == 3  # a held call is load, as in a paused vLLM
    assert not held.done() and engine.client.status().counters.requests_total == calls_before  # not sent
    await engine.resume_generation()
    call = asyncio.ensure_future(engine.generate([5, 6, 7], params))
    await asyncio.sleep(0)
    assert engine.get_num_unfinished_requests() == 6  # both calls' samples, counted without a call to the service
    assert len((await held).outputs) == len((await call).outputs) == 3
    assert engine.get_num_unfinished_requests() == 0


REWARD = """
import torch

def reward_func(queries, prompts, labels):
    return {"rewards": torch.tensor([float(len(q) % 7) for q in queries]), "scores": torch.tensor([1.0] * len(queries)), "extra_logs": {}}
"""


def test_openrlhfs_samples_generator_drives_the_launchers_engine_actors_with_its_own_sampling_params(trainer_server, tiny_model, tokenizer, tmp_path):
    """OpenRLHF's SamplesGenerator, unchanged: it balances prompts over two engine actors by their
    unfinished counts and sends its own vllm.SamplingParams (min_tokens=1, top_k=-1, logprobs=1
    for rollout correction) through OpenRLHF's SingleTurnAgentExecutor, with a reward function.
    The actors come from the launcher's `service_engines`, called as OpenRLHF's `train()` calls
    `create_vllm_engines`."""
    from types import SimpleNamespace as NS

    import ray
    from openrlhf.trainer.ppo_utils.samples_generator import SamplesGenerator

    from rollout_service.serve.runner import start_ray

    (tmp_path / "reward.py").write_text(REWARD)
    args = NS(
        vllm=NS(enable_sleep=False),
        rollout=NS(batch_size=4, n_samples_per_prompt=2, vllm_generate_batch_size=None),
        algo=NS(dynamic_filtering_enable=False, advantage=NS(is_correction_level="seq")),
    )
    prompts = ["The trainer", "Every replica", "A policy", "Samples"]
    loader = [(0, prompts[:2], ["a", "b"], [None, None]), (1, prompts[2:], ["c", "d"], [None, None])]
    # Ray's memory monitor kills workers at 95% of the machine's memory, which the suite's engines
    # can reach on a 24 GB machine; the kernel's limit is the one that counts here.
    start_ray(num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING", _system_config={"memory_monitor_refresh_ms": 0})
    try:
        engines = service_engines(
            2, 1, str(tiny_model), 42, False, False, True, 64, None, 0.9, False, "processed_logprobs",
            agent_func_path=None, remote_rm_url=str(tmp_path / "reward.py"), max_images_per_prompt=0,
            connection=Connection(trainer_server.grpc_address, timeout=120),
        )
        generator = SamplesGenerator(NS(args=args), loader, None, tokenizer, engines)
        samples, _, consumed, _ = generator.generate_samples(max_new_tokens=8, max_len=64, temperature=1.0)
    finally:
        ray.shutdown()
    assert (len(samples), consumed) == (8, 4)
    assert sorted(e.prompts[0] for e in samples) == sorted(prompts * 2)
    for e in samples:
        n = int(e.action_mask.sum())
        assert 1 <= n <= 8 and e.rewards is not None and e.scores.item() == 1.0
        assert e.rollout_log_probs.shape == e.action_mask.shape
        assert (e.rollout_log_probs[e.action_mask.bool()] < 0).all() and (e.rollout_log_probs[~e.action_mask.bool()] == 0).all()


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


def test_the_launchers_syncs_from_two_actor_ranks_make_one_version_each_the_second_a_delta(engine, tiny_model, tmp_path):
    """push_actor, as the launcher's actor calls it on every actor rank (two gloo processes,
    tests/clients/openrlhf_ranks.py): one new service version per sync, the second sent as a delta
    against the first, serving the pushed model."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    greedy = dict(prompt_token_ids=[[9, 8, 7, 6]], max_tokens=6, temperature=0.0, ignore_eos=True)
    engine.client.push_weights(load_file(tiny_model / "model.safetensors"), progress=False)
    before = engine.client.generate(**greedy)[0].samples[0]
    done = subprocess.run(
        [sys.executable, "-m", "tests.clients.openrlhf_ranks", engine.address, str(tiny_model), str(tmp_path / "ranks.json")],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    v, tensors = before.weight_version, len(load_file(tiny_model / "model.safetensors"))
    report = {"versions": [v + 1, v + 2], "tensors": tensors, "deltas": tensors}  # unchanged ones as empty deltas
    assert ranks == {"0": report, "1": report}
    after = engine.client.generate(**greedy)[0].samples[0]
    assert after.weight_version == v + 2 and after.token_ids == before.token_ids  # the norm negated twice: the model as loaded


@pytest.mark.parametrize("argv, message", [
    (["--actor.model_name_or_path", "m"], "--vllm.num_engines N .N >= 1. is required"),
    (["--vllm.num_engines=0"], "--vllm.num_engines N .N >= 1. is required"),
    (["--vllm.num_engines", "2", "--train.colocate_all"], "not on the trainer's GPUs"),
    (["--vllm.num_engines=2", "--ds.tensor_parallel_size", "2"], "ZeRO-3 shards only"),
    (["--vllm.num_engines=2", "--ds.lora.rank", "8"], "adapters the service cannot load"),
    (["--vllm.num_engines=2", "--ds.load_in_4bit"], "a 4-bit actor"),
])
def test_the_launcher_refuses_flags_that_cannot_work_with_remote_engines(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_the_launcher_needs_the_services_address_before_it_starts_anything(monkeypatch):
    monkeypatch.delenv("ROLLOUT_SERVICE_ADDRESS", raising=False)
    with pytest.raises(ValueError, match="set the ROLLOUT_SERVICE_ADDRESS environment variable"):
        main(["--vllm.num_engines", "2"])
