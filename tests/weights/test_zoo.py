"""Every model family RL starts from takes a push of the trainer's own `model.state_dict()`: in the
trainer's naming (tied LM head, fused MoE experts, a wrapper prefix), a float32 server then gives
transformers' logprobs on the pushed weights.

One engine per family, one at a time (module-scoped, parametrized: pytest finishes a family's
tests before starting the next server). Families named in SLOW run in `make test-all`; every dense
family's int8 push runs in `make test`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rollout_service.models.tiny import ARCHS, TinyModelSpec, make_tiny_model
from tests.engine.reference import hf_token_logprobs
from tests.weights.conftest import engine_weights, start_server

pytestmark = pytest.mark.engine

# Namings another family covers (plain: every family's layers; tied: qwen3), for `make test-all`.
SLOW = {"qwen2", "qwen2-tied", "llama", "mistral"}
FAMILIES = [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in ARCHS]
# int8 (one engine each, about a minute): qwen3 in `make test`, the rest in `make test-all`. A
# family's naming is checked by its bf16 push above, and an int8 push requantizes the same linear
# layers in every dense family; INT8 MoE is not served yet (README).
INT8_FAMILIES = [a if a == "qwen3" else pytest.param(a, marks=pytest.mark.slow) for a in ARCHS if a != "qwen3-moe"]
PROMPTS = [[(7 * i + 5 * j) % 1900 + 40 for j in range(9)] for i in range(2)]
TOLERANCE = 1e-3


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(arch, checkpoint, float32 server started from it)."""
    arch = request.param
    model = make_tiny_model(tmp_path_factory.mktemp(f"zoo-{arch}"), TinyModelSpec(arch=arch, layers=2))
    server = start_server(request, model, tmp_path_factory, f"zoo-{arch}", "--dtype", "float32", "--no-http",
                          max_model_len=128)
    return arch, model, server


def trained(model_dir, seed: int):
    """The checkpoint as a trainer holds it after a step: transformers model, float32, perturbed."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def greedy(client) -> list:
    return [client.generate(prompt_token_ids=[p], max_tokens=8, temperature=0.0, ignore_eos=True)[0].samples[0] for p in PROMPTS]


def errors_against(model, samples) -> list[float]:
    return [
        float(np.abs(np.asarray(s.logprobs) - hf_token_logprobs(model, p, s.token_ids, temperature=0.0).numpy()).max())
        for p, s in zip(PROMPTS, samples)
    ]


@pytest.mark.parametrize("prefix", ["", "module._orig_mod."])  # as held, and DDP around torch.compile
def test_a_trainers_state_dict_pushes_and_serves_transformers_logprobs(family, prefix):
    from rollout_client import RolloutClient

    arch, model_dir, server = family
    model = trained(model_dir, seed=len(prefix))
    state = model.state_dict()
    if ARCHS[arch].tied:
        assert "lm_head.weight" in state  # the name the checkpoint on disk lacks
    if arch == "qwen3-moe":
        assert "model.layers.0.mlp.experts.gate_up_proj" in state  # transformers 5 keeps experts fused
    with RolloutClient(server.grpc_address, timeout=120) as client:
        before = greedy(client)
        result = client.push_weights({prefix + k: v for k, v in state.items()})
        assert result.tensors_applied == len(state)
        after = greedy(client)
    errors = errors_against(model, after)
    # The comparison can tell the models apart: the served outputs before the push are far off.
    assert min(errors_against(model, before)) > 100 * TOLERANCE, errors_against(model, before)
    print(f"{arch} {prefix or '(as held)'}: max |logprob - transformers| {max(errors):.2e}")  # for `pytest -s`
    assert max(errors) <= TOLERANCE, (arch, errors)


@pytest.mark.parametrize("arch", INT8_FAMILIES)
def test_an_int8_server_pushed_a_trainers_state_dict_holds_a_fresh_int8_servers_weights(arch, request, tmp_path_factory):
    """Engine vs engine, bitwise: a server started from the trainer's weights W1 (quantized at
    load) is snapshotted, pushed the initial weights W0 (every tensor must change: the last push
    then has to rewrite each one), then pushed W1 from the trainer's `state_dict()` in its naming;
    its tensors (and its linear layers' outputs on a fixed input) must be the snapshot's again.
    One engine per family: the fresh server is the pushed one before its pushes."""
    from transformers import AutoModelForCausalLM

    from rollout_client import RolloutClient

    tmp = tmp_path_factory.mktemp(f"zoo-int8-{arch}")
    model_dir = make_tiny_model(tmp / "w0", TinyModelSpec(arch=arch, layers=2))
    initial = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    trainer = trained(model_dir, seed=3).to(torch.bfloat16)  # a bf16 trainer pushes bf16
    pushed_dir = tmp / "w1"
    trainer.save_pretrained(pushed_dir)  # in checkpoint naming (tied head left out)
    for f in model_dir.glob("tokenizer*"):
        (pushed_dir / f.name).write_bytes(f.read_bytes())
    (pushed_dir / "generation_config.json").unlink(missing_ok=True)
    server = start_server(request, pushed_dir, tmp_path_factory, f"zoo-int8-{arch}", "--quantization", "int8",
                          "--cache-dir", str(tmp / "cache"), max_model_len=128)
    fresh = engine_weights(server)
    assert any(k.endswith(".probe") for k in fresh) and any(k.endswith("weight_scale") for k in fresh)
    with RolloutClient(server.grpc_address, timeout=120) as client:
        client.push_weights({"module." + k: v for k, v in initial.state_dict().items()})
        moved = engine_weights(server)
        assert moved.keys() == fresh.keys()
        assert [k for k in fresh if torch.equal(moved[k], fresh[k])] == []
        client.push_weights({"module." + k: v for k, v in trainer.state_dict().items()})
    pushed = engine_weights(server)
    assert pushed.keys() == fresh.keys()
    assert [k for k in pushed if not torch.equal(pushed[k], fresh[k])] == []
