"""GRPO through the service: a plain-PyTorch trainer that learns a toy task from the service's
rollouts, pushing its weights after every step, with bf16 or INT8 rollouts, with or without TIS.

    python examples/grpo_toy.py                      # four runs, starts a bf16 and an int8 server
    python examples/grpo_toy.py --address HOST:PORT --runs bf16 --steps 8 --json

The policy is the project's tiny Qwen2 (random init) in transformers, float32, on CPU. The task:
emit tokens from a target set (ids divisible by 8, an eighth of the vocabulary); reward = share
of the completion's tokens in the set. The random-init policy scores about 0.12; the trainer
learns to raise it to 1 within minutes.

Each step: Generate (P prompts x G samples, T=1, seed=step) -> reward -> group-normalized
advantages (GRPO) -> the trainer rescores the sampled tokens (its logprobs) -> one policy-gradient
step -> push the weights (bf16 on the wire; the int8 server requantizes them on arrival).
Loss per token: -A * exp(logp - logp.detach()) [x w with TIS], where the TIS weight is
w = min(exp(logp_trainer - logp_rollout), cap) (FlashRL): it corrects for sampling from the
rollout engine's (quantized) distribution rather than the trainer's.

Writes grpo_toy.csv (one row per run and step) and grpo_toy.png (reward vs step per run) to
--out; with --json, one JSON object (each run's first/last rewards) as the last line of stdout.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from rollout_client import RolloutClient, mismatch_report, tis_weights

RUNS = ("bf16", "bf16+tis", "int8", "int8+tis")
TARGET_MOD = 8


@dataclass
class Settings:
    steps: int = 30
    prompts: int = 8  # P
    group: int = 8  # G samples per prompt
    prompt_len: int = 8
    max_tokens: int = 16
    lr: float = 3e-5
    tis_cap: float = 2.0
    seed: int = 0
    delta: bool | None = None  # push each step as its changes since the last push: None is the client's default (deltas when streamed)


@dataclass
class StepRecord:
    run: str
    step: int
    reward: float
    weight_version: int
    mean_abs_dlogprob: float  # trainer vs rollout, on the sampled tokens
    kl: float
    tis_clipped: float
    push_s: float
    step_s: float
    wire_ratio: float  # bytes the push sent / the model's bf16 bytes (1.0 for a whole push)


def reward(token_ids: list[int]) -> float:
    """Share of the completion's tokens whose id is divisible by TARGET_MOD (0 for an empty one)."""
    return sum(t % TARGET_MOD == 0 for t in token_ids) / len(token_ids) if token_ids else 0.0


def bf16_weights(policy: torch.nn.Module):
    """The trainer's float32 parameters as bf16, one tensor at a time (no second model copy)."""
    for name, tensor in policy.state_dict().items():
        yield name, tensor.detach().to(torch.bfloat16)


def token_logprobs(policy, prompts: list[list[int]], completions: list[list[int]]) -> list[torch.Tensor]:
    """The trainer's logprob of each completion token given its prompt and the tokens before it,
    for a batch in one forward pass (right-padded; padding sits after every scored position)."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    width = max(map(len, seqs))
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    logprobs = torch.log_softmax(policy(ids, attention_mask=mask).logits.float(), -1)
    out = []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        positions = torch.arange(len(p) - 1, len(p) + len(c) - 1)
        out.append(logprobs[i, positions, torch.tensor(c)])
    return out


def train(client: RolloutClient, model_dir: Path, run: str, s: Settings, log=print) -> list[StepRecord]:
    """One GRPO run from the base checkpoint; the server is first synced to the trainer's weights."""
    from transformers import AutoModelForCausalLM

    use_tis = run.endswith("+tis")
    torch.manual_seed(s.seed)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(policy.parameters(), lr=s.lr)
    vocab = policy.config.vocab_size
    g = torch.Generator().manual_seed(s.seed)
    prompts = torch.randint(10, vocab, (s.prompts, s.prompt_len), generator=g).tolist()
    # Step 0 of every run: the server serves exactly the trainer's starting weights.
    version = client.push_weights(bf16_weights(policy), label=f"{run} start", progress=False, delta=s.delta).version
    records = []
    for step in range(s.steps):
        t0 = time.perf_counter()
        completions = client.generate(
            prompt_token_ids=prompts, n=s.group, max_tokens=s.max_tokens, temperature=1.0, seed=s.seed * 1000 + step
        )
        rewards = torch.tensor([[reward(x.token_ids) for x in c.samples] for c in completions])  # [P, G]
        advantages = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-4)
        batch = [(c.prompt_token_ids, x, a) for c, adv in zip(completions, advantages) for x, a in zip(c.samples, adv)]
        batch = [(p, x, a) for p, x, a in batch if x.token_ids]
        trainer_lp = token_logprobs(policy, [p for p, _, _ in batch], [x.token_ids for _, x, _ in batch])
        rollout_lp = [torch.from_numpy(x.logprobs) for _, x, _ in batch]
        n_tokens = sum(len(lp) for lp in trainer_lp)
        loss = torch.zeros(())
        for logp, rollout, (_, _, a) in zip(trainer_lp, rollout_lp, batch):
            ratio = torch.exp(logp - logp.detach())  # 1, with the policy gradient's derivative
            weight = tis_weights(logp, rollout, s.tis_cap) if use_tis else 1.0
            loss = loss - (a * ratio * weight).sum() / n_tokens
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        report = mismatch_report(torch.cat([lp.detach() for lp in trainer_lp]), torch.cat(rollout_lp), cap=s.tis_cap)
        t1 = time.perf_counter()
        result = client.push_weights(bf16_weights(policy), label=f"{run} step {step + 1}", progress=False, delta=s.delta)
        version = result.version
        records.append(StepRecord(
            run=run, step=step, reward=float(rewards.mean()),
            weight_version=completions[0].samples[0].weight_version,
            mean_abs_dlogprob=report.mean_abs_diff, kl=report.kl, tis_clipped=report.fraction_clipped,
            push_s=time.perf_counter() - t1, step_s=time.perf_counter() - t0, wire_ratio=result.wire_ratio,
        ))
        r = records[-1]
        log(f"[{run}] step {step:3d} reward {r.reward:.3f}  |Δlogprob| {r.mean_abs_dlogprob:.4f}  "
            f"KL {r.kl:.1e}  clipped {r.tis_clipped:.1%}  served v{r.weight_version} -> pushed v{version} "
            f"({r.push_s:.2f} s{f', {r.wire_ratio:.3f} of its bytes' if r.wire_ratio < 1 else ''})  step {r.step_s:.1f} s")
    return records


def write_outputs(records: list[StepRecord], out: Path) -> tuple[Path, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "grpo_toy.csv", out / "grpo_toy.png"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(records[0])))
        writer.writeheader()
        writer.writerows(asdict(r) for r in records)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"bf16": ("tab:blue", "-"), "bf16+tis": ("tab:blue", "--"), "int8": ("tab:red", "-"), "int8+tis": ("tab:red", "--")}
    for run in dict.fromkeys(r.run for r in records):
        rows = [r for r in records if r.run == run]
        color, style = styles.get(run, (None, "-"))
        ax.plot([r.step for r in rows], [r.reward for r in rows], style, color=color, label=run)
    ax.set_xlabel("GRPO step (one weight push each)")
    ax.set_ylabel("mean reward (share of target tokens)")
    ax.set_title("Toy GRPO through rollout-service: bf16 vs INT8 rollouts, ± TIS")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    return csv_path, png_path


def summary(records: list[StepRecord]) -> dict:
    """Per run: first step's reward, mean of the last three, and the mean |Δlogprob|."""
    out = {}
    for run in dict.fromkeys(r.run for r in records):
        rows = [r for r in records if r.run == run]
        tail = rows[-3:]
        out[run] = {
            "first_reward": round(rows[0].reward, 4),
            "final_reward": round(sum(r.reward for r in tail) / len(tail), 4),
            "mean_abs_dlogprob": round(sum(r.mean_abs_dlogprob for r in rows) / len(rows), 5),
            "steps": len(rows),
        }
    return out


def start_server(model: Path, quant: str):
    """`rollout-service serve` for one run kind (single-process backend), logging under .cache/."""
    from rollout_service.launcher import ServerProcess

    work = Path(".cache") / f"grpo-toy-{quant}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    extra = ["--quantization", "int8", "--cache-dir", str(work / "cache")] if quant == "int8" else []
    return ServerProcess.start(model, work / "server.log", "--backend", "local", "--max-model-len", "256", "--no-http", *extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".cache/tiny-model"), help="tiny checkpoint (made if missing)")
    parser.add_argument("--address", help="use this running server for every run instead of starting servers")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {RUNS}")
    parser.add_argument("--steps", type=int, default=Settings.steps)
    parser.add_argument("--lr", type=float, default=Settings.lr)
    parser.add_argument("--seed", type=int, default=Settings.seed)
    parser.add_argument("--delta", action=argparse.BooleanOptionalAction, default=None,
                        help="push each step as its changes since the last push (default: the client's choice, deltas when not through shared memory)")
    parser.add_argument("--out", type=Path, default=Path("docs"), help="where grpo_toy.csv and grpo_toy.png go")
    parser.add_argument("--json", action="store_true", help="print one JSON summary as the last line")
    args = parser.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {RUNS}")
    settings = Settings(steps=args.steps, lr=args.lr, seed=args.seed, delta=args.delta)
    log = (lambda msg: print(msg, file=sys.stderr)) if args.json else print

    from rollout_service.launcher import start_side_by_side
    from rollout_service.models.tiny import make_tiny_model

    if not (args.model / "config.json").exists():
        make_tiny_model(args.model)
    records: list[StepRecord] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the servers on SIGTERM too
    with ExitStack() as stack:
        servers: dict[str, str] = {}
        quants = list(dict.fromkeys(r.split("+")[0] for r in runs))
        if args.address:
            servers = dict.fromkeys(quants, args.address)
        else:
            log(f"starting {' and '.join(quants)} server(s) side by side (1-2 minutes)")
            started = start_side_by_side(stack, {q: functools.partial(start_server, args.model, q) for q in quants})
            servers = {q: server.grpc_address for q, server in started.items()}
        for run in runs:
            with RolloutClient(servers[run.split("+")[0]], timeout=300) as client:
                records += train(client, args.model, run, settings, log)
    csv_path, png_path = write_outputs(records, args.out)
    result = summary(records)
    log(f"wrote {csv_path} and {png_path}")
    for run, figures in result.items():
        log(f"{run:9s} reward {figures['first_reward']:.3f} -> {figures['final_reward']:.3f} "
            f"(mean |Δlogprob| trainer vs rollout {figures['mean_abs_dlogprob']:.4f})")
    if args.json:
        print(json.dumps({"runs": result, "csv": str(csv_path), "plot": str(png_path)}))


if __name__ == "__main__":
    main()
