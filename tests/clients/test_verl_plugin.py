"""The verl plugin driven by verl 0.9.1's own classes, unpatched, against a real server.

Test A: verl's `ppo_trainer` config composed with `rollout.name=rollout_service`, verl's
`LLMServerManager` and `AgentLoopManager` built as verl's standalone-rollout test builds them, and
`generate_sequences` on a DataProto of chat prompts: verl's agent loop workers (Ray actors) call
the plugin's server actors turn by turn. Test B: two gloo ranks sync weights through the plugin
exactly as verl's engine workers do. The model is the tiny Llama of the zoo: verl's agent loop
picks a token builder by model type, and its Qwen builder needs Qwen's chat tokens, which the tiny
tokenizer lacks.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.trainers import require_trainer

require_trainer("verl.experimental.agent_loop")  # skipped where not installed; in CI a failure
import ray  # noqa: E402
import verl  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.workers.config import RolloutConfig  # noqa: E402

from rollout_client import RolloutClient  # noqa: E402
from rollout_client.integrations.verl import NAME, RolloutServiceRollout  # noqa: E402
from rollout_service.launcher import ServerProcess  # noqa: E402
from rollout_service.serve.runner import start_ray  # noqa: E402
from tests.conftest import MAX_MODEL_LEN  # noqa: E402

pytestmark = pytest.mark.engine

PLUGIN = "rollout_client.integrations.verl"
PROMPT_LENGTH, RESPONSE_LENGTH = 64, 32  # the service's default max_tokens is 16: a full 32 proves the fill
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
PROMPTS = ["The trainer", "Every replica loads", "A policy", "Samples carry versions"]
REGISTERED = (
    "import verl\n"
    "from verl.workers.rollout.base import get_rollout_class\n"
    "from verl.workers.rollout.replica import get_rollout_replica_class\n"
    f"print(get_rollout_class({NAME!r}).__name__, get_rollout_replica_class({NAME!r}, False).__name__)\n"
)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VERL_USE_EXTERNAL")}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=300)


def test_the_env_var_alone_registers_the_rollout_on_both_sides():
    done = _python(REGISTERED, VERL_USE_EXTERNAL_MODULES=PLUGIN, VERL_USE_EXTERNAL_PLUGINS="none")
    assert done.stdout.split() == ["RolloutServiceRollout", "RolloutServiceReplica"], done.stderr[-2000:]


def test_the_entry_point_alone_registers_the_rollout_on_both_sides():
    done = _python(REGISTERED)  # VERL_USE_EXTERNAL_PLUGINS defaults to "auto": entry points load
    assert done.stdout.split() == ["RolloutServiceRollout", "RolloutServiceReplica"], done.stderr[-2000:]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    from rollout_service.models.tiny import TinyModelSpec, make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("llama"), TinyModelSpec(arch="llama"))


@pytest.fixture(scope="module")
def llama_server(request, llama, tmp_path_factory) -> ServerProcess:
    log = tmp_path_factory.mktemp("logs") / "verl-llama.log"
    server = ServerProcess.start(llama, log, "--backend", "local", "--max-model-len", str(MAX_MODEL_LEN), "--no-http")
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="module")
def client(llama_server):
    with RolloutClient(llama_server.grpc_address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def agent_loop(llama, llama_server):
    """verl's LLMServerManager (two plugin replicas) and AgentLoopManager on a CPU-only Ray node."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(verl.__file__).parent / "trainer/config"), version_base=None):
        config = compose("ppo_trainer", overrides=[
            f"actor_rollout_ref.rollout.name={NAME}",
            f"+actor_rollout_ref.rollout.custom={{address: '{llama_server.grpc_address}'}}",
            "trainer.n_gpus_per_node=2", "trainer.nnodes=1",  # two replicas of tensor parallel size 1
            "actor_rollout_ref.rollout.nnodes=1", "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
            f"actor_rollout_ref.rollout.prompt_length={PROMPT_LENGTH}",
            f"actor_rollout_ref.rollout.response_length={RESPONSE_LENGTH}",
            "actor_rollout_ref.rollout.agent.num_workers=1", "actor_rollout_ref.rollout.ignore_eos=True",
            f"actor_rollout_ref.model.path={llama}",
            f"actor_rollout_ref.model.custom_chat_template={json.dumps(TEMPLATE)}",
        ])
    env = {"VERL_USE_EXTERNAL_MODULES": PLUGIN, "TOKENIZERS_PARALLELISM": "false"}
    # No Ray memory monitor: it kills workers at 95% of the machine's memory, which the suite's
    # engines can reach on a 24 GB machine; the kernel's limit is the one that counts here.
    start_ray(
        num_cpus=2, num_gpus=0, include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": env},
        _system_config={"memory_monitor_refresh_ms": 0},
    )
    try:
        from verl.experimental.agent_loop import AgentLoopManager
        from verl.workers.rollout.llm_server import LLMServerManager

        servers = LLMServerManager.create(config=config, worker_group=None, rollout_resource_pool=None)
        agents = AgentLoopManager.create(config=config, llm_client=servers.get_client())
        yield servers, agents
    finally:
        ray.shutdown()


def rollout(agents, n: int = 1) -> DataProto:
    """verl's batch for PROMPTS, each repeated n times (one uid per prompt, as verl's trainer)."""
    batch = DataProto(non_tensor_batch={
        "raw_prompt": np.array([[{"role": "user", "content": p}] for p in PROMPTS], dtype=object),
        "agent_name": np.array(["single_turn_agent"] * len(PROMPTS), dtype=object),
        "uid": np.array([f"prompt-{i}" for i in range(len(PROMPTS))], dtype=object),
    })
    return agents.generate_sequences(prompts=batch.repeat(n, interleave=True))


def reference_errors(model_dir: Path, weights: dict[str, torch.Tensor], out: DataProto) -> tuple[float, float]:
    """(max |rollout_log_probs - float32 transformers logprobs on `weights`|, the tolerance: how
    far transformers' own bf16 is from its float32, x1.5, + 0.01; the server computes in bf16)."""
    from transformers import AutoModelForCausalLM

    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        m.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
        m.tie_weights()
        models[dtype] = m.eval()
    error = bf16_gap = 0.0
    b = out.batch
    for i in range(len(out)):
        prompt = b["prompts"][i][b["attention_mask"][i, :PROMPT_LENGTH].bool()].tolist()
        n = int(b["response_mask"][i].sum())
        response = b["responses"][i, :n].tolist()
        ids = torch.tensor([prompt + response])
        chosen = torch.tensor(response)[:, None]
        with torch.no_grad():
            ref, hf16 = (
                torch.log_softmax(models[d](ids).logits[0, len(prompt) - 1 : -1].float(), -1).gather(-1, chosen)[:, 0]
                for d in (torch.float32, torch.bfloat16)
            )
        error = max(error, float((b["rollout_log_probs"][i, :n] - ref).abs().max()))
        bf16_gap = max(bf16_gap, float((hf16 - ref).abs().max()))
        assert b["rollout_log_probs"][i, n:].abs().sum() == 0  # padding carries no logprob
    return error, 1.5 * bf16_gap + 0.01


def test_a_verls_agent_loop_rolls_out_through_the_service_with_exact_logprobs_and_versions(agent_loop, llama, client):
    servers, agents = agent_loop
    assert servers.server_addresses == [f"rollout-service://{client.address}/replica-{r}" for r in range(2)]
    weights = load_file(llama / "model.safetensors")
    trainer = RolloutServiceRollout(RolloutConfig(name=NAME, custom={"address": client.address}), None, None)
    pushed = asyncio.run(trainer.update_weights(iter(weights.items()), global_steps=1))
    out = rollout(agents)
    b, extra = out.batch, out.non_tensor_batch
    assert b["responses"].shape == b["rollout_log_probs"].shape == (len(PROMPTS), RESPONSE_LENGTH)
    assert b["response_mask"].sum(-1).tolist() == [RESPONSE_LENGTH] * len(PROMPTS)  # max_tokens filled as verl's vLLM server does
    assert list(extra["weight_version"]) == [pushed.version] * len(PROMPTS)
    assert list(extra["global_steps"]) == list(extra["min_global_steps"]) == list(extra["max_global_steps"]) == [1] * len(PROMPTS)
    assert list(extra["__num_turns__"]) == [2] * len(PROMPTS)
    error, tolerance = reference_errors(llama, weights, out)
    assert error <= tolerance, (error, tolerance)
    print(f"verl agent loop, 4 x {RESPONSE_LENGTH} tokens: rollout_log_probs vs float32 transformers {error:.2e} (tolerance {tolerance:.2e})")


def sync_on_two_ranks(client, weights: Path, global_steps: int, out: Path, bucket_mb: int = 2048) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "tests.clients.verl_ranks", client.address, str(weights), str(global_steps), str(out), str(bucket_mb)],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


def test_b_a_push_refused_part_way_fails_on_both_ranks_without_a_hang(llama, client, tmp_path):
    """The service refuses an unknown tensor after some 1 MB buckets have gone out: rank 0 must
    still step its generator to the end (rank 1 waits in each gather), and both ranks raise."""
    weights = load_file(llama / "model.safetensors")
    names = list(weights)
    bad = {**{k: weights[k] for k in names[:3]}, "model.layers.0.mlp.not_a_layer.weight": weights[names[3]].clone()}
    save_file({**bad, **{k: weights[k] for k in names[3:]}}, tmp_path / "bad.safetensors")
    before = client.status().weight_version
    ranks = sync_on_two_ranks(client, tmp_path / "bad.safetensors", 3, tmp_path / "ranks.json", bucket_mb=1)
    assert ranks["0"]["yielded"] == ranks["1"]["yielded"] == len(weights) + 1
    assert "not_a_layer" in ranks["0"]["error"] and ranks["1"]["error"].startswith("RuntimeError: rank 0's push failed:")
    assert client.status().weight_version == before  # nothing applied


def test_b_two_ranks_sync_in_lockstep_one_version_and_the_next_rollout_uses_it(agent_loop, llama, client, tmp_path):
    _, agents = agent_loop
    g = torch.Generator().manual_seed(7)
    base = load_file(llama / "model.safetensors")
    new = {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
    save_file(new, tmp_path / "step2.safetensors")
    before = client.status().weight_version
    ranks = sync_on_two_ranks(client, tmp_path / "step2.safetensors", 2, tmp_path / "ranks.json")
    assert ranks == {"0": {"version": before + 1, "yielded": len(new)}, "1": {"version": before + 1, "yielded": len(new)}}
    assert client.status().weight_version == before + 1  # one version for the sync, not one per rank
    out = rollout(agents)
    assert list(out.non_tensor_batch["weight_version"]) == [before + 1] * len(PROMPTS)
    assert list(out.non_tensor_batch["global_steps"]) == [2] * len(PROMPTS)
    error, tolerance = reference_errors(llama, new, out)
    assert error <= tolerance, (error, tolerance)
    stale, _ = reference_errors(llama, base, out)
    assert stale > 10 * tolerance, stale  # the outputs are the new policy's, far from the old one's


def test_a_grpo_loop_with_verls_advantages_and_the_plugins_sync_trains_the_served_policy(agent_loop, llama, client):
    """Two GRPO steps on verl's pieces: the agent loop's rollouts (4 prompts x n=4), verl's
    `compute_grpo_outcome_advantage`, a plain torch policy-gradient step on the float32 policy,
    and the plugin's `update_weights` (rank 0 alone here; Test B covers two ranks). The reward is
    the share of response tokens divisible by 8. Each rollout must come from the previous sync."""
    from transformers import AutoModelForCausalLM
    from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

    _, agents = agent_loop
    policy = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    trainer = RolloutServiceRollout(RolloutConfig(name=NAME, custom={"address": client.address}), None, None)
    synced = asyncio.run(trainer.update_weights(iter(policy.state_dict().items()), global_steps=10))  # as verl's update_weights(0)
    for step in (11, 12):
        out = rollout(agents, n=4)
        b, extra = out.batch, out.non_tensor_batch
        assert list(extra["weight_version"]) == [synced.version] * 16 and list(extra["global_steps"]) == [step - 1] * 16
        mask = b["response_mask"].float()
        reward = ((b["responses"] % 8 == 0).float() * mask).sum(-1) / mask.sum(-1)
        token_rewards = torch.zeros_like(mask)
        token_rewards[torch.arange(len(out)), mask.sum(-1).long() - 1] = reward
        advantages, _ = compute_grpo_outcome_advantage(token_rewards, b["response_mask"], extra["uid"])
        logits = policy(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
        logp = torch.log_softmax(logits[:, PROMPT_LENGTH - 1 : -1].float(), -1).gather(-1, b["responses"][..., None])[..., 0]
        mismatch = float(((logp.detach() - b["rollout_log_probs"]).abs() * mask).sum() / mask.sum())
        assert mismatch < 0.02, mismatch  # the trainer's float32 logprobs vs the service's bf16 ones
        loss = -(advantages * logp * mask).sum() / mask.sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pushed = asyncio.run(trainer.update_weights(iter(policy.state_dict().items()), global_steps=step))
        assert pushed.version == synced.version + 1
        synced = pushed
        print(f"verl GRPO step {step}: reward {float(reward.mean()):.3f}, |trainer - rollout logprob| {mismatch:.2e}, "
              f"loss {float(loss):.4f}, pushed version {pushed.version}")
    final = rollout(agents)
    assert list(final.non_tensor_batch["global_steps"]) == [12] * len(PROMPTS)
