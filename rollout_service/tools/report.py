"""`rollout-service report`: is a quantized rollout safe for this model?

The same prompts go through a bf16 server and a quantized one:
- sampling: the quantized server samples n completions per prompt at T=1 (its logprobs are then
  those of the full distribution); the bf16 server scores exactly those tokens (prompt logprobs),
  giving per-token Δ = logp_bf16 - logp_quant on the tokens a quantized rollout produces;
- from Δ: the |Δ| distribution, KL(quant ‖ bf16) (k3 estimator over the sampled tokens), and the
  TIS weights min(exp(Δ), cap) a trainer would apply (mean, spread, share clipped);
- greedy agreement: both servers decode greedily; the share of prompts with identical
  continuations and of tokens before the first divergence;
- throughput: the same sampling request timed on each server (tokens/s ratio, measured side by
  side in one run).
It writes report.md (with histograms in PNG) and report.json (figures + per-token data).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from rollout_client import RolloutClient, tis_weights
from rollout_service.tools.machine import cpu

DEFAULT_PROMPTS = [
    "The trainer computes the advantage of each sample",
    "A weight push streams new weights into the engine",
    "Every replica reports the version it serves",
    "The reward model checks the answer",
    "Quantized rollouts are fast because",
    "In reinforcement learning the policy",
    "The gradient of the loss with respect to",
    "A language model predicts the next token",
]


@dataclass
class ReportFigures:
    prompts: int
    samples: int
    tokens: int
    mean_abs_dlogprob: float
    p50_abs_dlogprob: float
    p90_abs_dlogprob: float
    p99_abs_dlogprob: float
    max_abs_dlogprob: float
    kl: float
    tis_cap: float
    tis_mean: float
    tis_min: float
    tis_clipped: float
    greedy_identical: float  # share of prompts with identical greedy continuations
    greedy_token_agreement: float  # share of greedy tokens before the first divergence
    tokens_per_s_bf16: float
    tokens_per_s_quant: float
    tokens_per_s_ratio: float


def _scored_by(client: RolloutClient, prompt: list[int], completion: list[int]) -> np.ndarray:
    """The server's logprob of each completion token after the prompt (raw distribution)."""
    c = client.generate(prompt_token_ids=[prompt + completion], max_tokens=1, prompt_logprobs=0)[0]
    return np.asarray(c.prompt_logprobs[len(prompt) - 1 :], dtype=np.float64)


def _tokens_per_s(client: RolloutClient, prompts: list[str], n: int, max_tokens: int, seed: int) -> float:
    client.generate(prompts[:1], max_tokens=2)  # warm
    t0 = time.perf_counter()
    out = client.generate(prompts, n=n, max_tokens=max_tokens, temperature=1.0, seed=seed, ignore_eos=True)
    return sum(len(s.token_ids) for c in out for s in c.samples) / (time.perf_counter() - t0)


def measure(
    bf16: RolloutClient, quant: RolloutClient, prompts: list[str], n: int = 4, max_tokens: int = 32,
    seed: int = 0, cap: float = 2.0,
) -> tuple[ReportFigures, dict]:
    """The figures, and the per-token data they come from."""
    sampled = quant.generate(prompts, n=n, max_tokens=max_tokens, temperature=1.0, seed=seed)
    q_lp, b_lp, tokens = [], [], []
    for c in sampled:
        for s in c.samples:
            if not s.token_ids:
                continue
            q_lp.append(s.logprobs.astype(np.float64))
            b_lp.append(_scored_by(bf16, c.prompt_token_ids, s.token_ids))
            tokens.append({"prompt": c.prompt_token_ids, "completion": s.token_ids})
    q, b = np.concatenate(q_lp), np.concatenate(b_lp)
    delta = b - q
    ratio = np.exp(delta)
    w = tis_weights(b, q, cap)
    greedy = dict(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    gb = [c.samples[0].token_ids for c in bf16.generate(prompts, **greedy)]
    gq = [c.samples[0].token_ids for c in quant.generate(prompts, **greedy)]
    same_prefix = [next((i for i, (x, y) in enumerate(zip(a, z)) if x != y), min(len(a), len(z))) for a, z in zip(gb, gq)]
    tps_b = _tokens_per_s(bf16, prompts, n, max_tokens, seed)
    tps_q = _tokens_per_s(quant, prompts, n, max_tokens, seed)
    absd = np.abs(delta)
    figures = ReportFigures(
        prompts=len(prompts), samples=len(q_lp), tokens=int(q.size),
        mean_abs_dlogprob=float(absd.mean()), p50_abs_dlogprob=float(np.percentile(absd, 50)),
        p90_abs_dlogprob=float(np.percentile(absd, 90)), p99_abs_dlogprob=float(np.percentile(absd, 99)),
        max_abs_dlogprob=float(absd.max()), kl=float((ratio - 1 - delta).mean()),
        tis_cap=cap, tis_mean=float(w.mean()), tis_min=float(w.min()), tis_clipped=float((ratio > cap).mean()),
        greedy_identical=float(np.mean([a == z for a, z in zip(gb, gq)])),
        greedy_token_agreement=float(sum(same_prefix) / sum(len(a) for a in gb)),
        tokens_per_s_bf16=tps_b, tokens_per_s_quant=tps_q, tokens_per_s_ratio=tps_q / tps_b,
    )
    data = {"samples": tokens, "quant_logprobs": [x.tolist() for x in q_lp], "bf16_logprobs": [x.tolist() for x in b_lp]}
    return figures, data


def _histograms(out: Path, delta: np.ndarray, w: np.ndarray, cap: float) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ("dlogprob_hist.png", "tis_hist.png")
    for name, values, xlabel in ((names[0], np.abs(delta), "|logp_bf16 - logp_quant| per sampled token"),
                                 (names[1], w, f"TIS weight min(exp(Δ), {cap:g})")):
        fig, ax = plt.subplots(figsize=(6, 3.4))
        ax.hist(values, bins=60, color="tab:red" if name == names[0] else "tab:blue")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens")
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return names


def write(out: Path, figures: ReportFigures, data: dict, title: str, command: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    q = np.concatenate([np.asarray(x) for x in data["quant_logprobs"]])
    b = np.concatenate([np.asarray(x) for x in data["bf16_logprobs"]])
    hist_d, hist_w = _histograms(out, b - q, tis_weights(b, q, figures.tis_cap), figures.tis_cap)
    (out / "report.json").write_text(json.dumps({"figures": asdict(figures), **data}))
    f = figures
    md = f"""# Quantized rollout report: {title}

`{command}`

{f.prompts} prompts × {f.samples // max(f.prompts, 1)} samples at T=1, {f.tokens} sampled tokens: the quantized
server samples, the bf16 server scores the same tokens (Δ = logp_bf16 − logp_quant).
Measured on: {cpu()} (on CPUs, vLLM's int8 and bf16 kernels differ by instruction set).

| figure | value |
|---|---|
| mean \\|Δlogprob\\| | {f.mean_abs_dlogprob:.4f} |
| p50 / p90 / p99 / max \\|Δlogprob\\| | {f.p50_abs_dlogprob:.4f} / {f.p90_abs_dlogprob:.4f} / {f.p99_abs_dlogprob:.4f} / {f.max_abs_dlogprob:.4f} |
| KL(quant ‖ bf16), k3 estimate per token | {f.kl:.2e} |
| TIS weight min(exp(Δ), {f.tis_cap:g}): mean / min | {f.tis_mean:.4f} / {f.tis_min:.4f} |
| tokens clipped by TIS (ratio > {f.tis_cap:g}) | {f.tis_clipped:.2%} |
| greedy: identical continuations | {f.greedy_identical:.1%} of prompts |
| greedy: tokens before the first divergence | {f.greedy_token_agreement:.1%} |
| tokens/s bf16 → quantized (side by side) | {f.tokens_per_s_bf16:.1f} → {f.tokens_per_s_quant:.1f} ({f.tokens_per_s_ratio:.2f}×) |

![|Δlogprob| histogram]({hist_d})

![TIS weight histogram]({hist_w})

Reading it: the trainer optimizes the bf16 policy while the quantized engine samples; TIS
(FlashRL) reweights each token by the ratio above, so a gap mostly inside the cap is corrected.
A large clipped share, or a KL approaching the per-step KL of training itself, says the quantized
engine samples a noticeably different distribution: try fp8_channel, `--lm-head-fp32`, or bf16.
"""
    path = out / "report.md"
    path.write_text(md)
    return path
