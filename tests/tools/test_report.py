"""`rollout-service report` on the tiny model in int8, its figures checked against an independent
computation: numpy over the per-token data, transformers for the bf16 logprobs, and the int8
server's own scoring of the sampled tokens."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def report(bf16_server, int8_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    (out / "prompts.txt").write_text("The trainer computes\n\nA weight push streams\nEvery replica reports\n")
    done = subprocess.run(
        [sys.executable, "-m", "rollout_service.cli", "report", "--quantization", "int8", "--prompts", str(out / "prompts.txt"),
         "-n", "3", "--max-tokens", "8", "-o", str(out), "--bf16-address", bf16_server.grpc_address,
         "--quant-address", int8_server.grpc_address],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_the_report_has_its_figures_and_plots(report):
    md = (report / "report.md").read_text()
    for needle in ("mean \\|Δlogprob\\|", "KL(quant ‖ bf16)", "greedy: identical", "tokens/s bf16", "dlogprob_hist.png"):
        assert needle in md
    assert (report / "dlogprob_hist.png").stat().st_size > 5000 and (report / "tis_hist.png").stat().st_size > 5000


def test_the_figures_follow_from_the_per_token_data(report):
    data = json.loads((report / "report.json").read_text())
    f = data["figures"]
    q = np.concatenate([np.asarray(x) for x in data["quant_logprobs"]])
    b = np.concatenate([np.asarray(x) for x in data["bf16_logprobs"]])
    d = b - q
    assert f["prompts"] == 3 and f["samples"] == 9 and f["tokens"] == q.size == b.size
    assert f["mean_abs_dlogprob"] == pytest.approx(np.abs(d).mean())
    assert f["max_abs_dlogprob"] == pytest.approx(np.abs(d).max())
    assert f["kl"] == pytest.approx(np.mean(np.exp(d) - 1 - d))
    assert f["tis_mean"] == pytest.approx(np.minimum(np.exp(d), 2.0).mean(), rel=1e-5)
    assert f["tis_clipped"] == pytest.approx(np.mean(np.exp(d) > 2.0))
    assert 0 <= f["greedy_token_agreement"] <= 1 and f["tokens_per_s_ratio"] > 0


def test_the_bf16_logprobs_are_those_transformers_computes(report, tiny_model):
    from transformers import AutoModelForCausalLM

    data = json.loads((report / "report.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    for sample, served in zip(data["samples"], data["bf16_logprobs"]):
        prompt, completion = sample["prompt"], sample["completion"]
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
        np.testing.assert_allclose(served, ref.detach().numpy(), atol=0.1)  # bf16 engine vs fp32 reference


def test_the_quantized_logprobs_are_the_int8_servers_own(report, int8_server):
    from rollout_client import RolloutClient

    data = json.loads((report / "report.json").read_text())
    with RolloutClient(int8_server.grpc_address, timeout=120) as client:
        sample, sampled = data["samples"][0], np.asarray(data["quant_logprobs"][0])
        c = client.generate(prompt_token_ids=[sample["prompt"] + sample["completion"]], max_tokens=1, prompt_logprobs=0)[0]
        np.testing.assert_allclose(c.prompt_logprobs[len(sample["prompt"]) - 1 :], sampled, atol=2e-2)


def test_bad_report_inputs_are_clear_errors(tmp_path):
    cli = [sys.executable, "-m", "rollout_service.cli", "report"]
    done = subprocess.run([*cli, "--model", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and "is not a checkpoint directory" in done.stderr
    done = subprocess.run([*cli, "--quantization", "int4", "--bf16-address", "x", "--quant-address", "y"], capture_output=True, text=True)
    assert done.returncode == 2 and "--quantization 'int4'" in done.stderr
