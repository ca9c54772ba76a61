"""`make demo`: a short real RL loop against the service on its embedded defaults.

Makes the tiny model (cached), starts `rollout-service serve --quantization int8` as users would
(on Ray Serve: one engine replica, the embedded coordinator, a fresh weight store),
runs a batch of rollouts through the Python client and prints them; then a few rounds of
generate -> one REINFORCE step on a toy reward (a float32 copy of the policy in this process) ->
push the new weights (requantized to int8 on arrival) -> generate again, printing the served
version, the reward, and how far the push moved the logprobs. Shuts the server down cleanly.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from rollout_client import RolloutClient
from rollout_service.launcher import ServerProcess
from rollout_service.models.tiny import make_tiny_model

PROMPTS = [
    "The trainer computes",
    "A weight push streams new weights",
    "Every replica reports",
    "The reward model checks",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".cache/tiny-model"), help="checkpoint (made if missing)")
    parser.add_argument("--n", type=int, default=2, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=4, help="generate -> train step -> push rounds")
    args = parser.parse_args()
    console = Console()

    if not (args.model / "config.json").exists():
        with console.status(f"making the tiny model in {args.model}"):
            make_tiny_model(args.model)
    log = args.model.parent / "demo-server.log"
    # The weight store keeps pushed versions across restarts; the demo starts from the base weights.
    weights_dir = args.model.parent / "demo-weights"
    shutil.rmtree(weights_dir, ignore_errors=True)
    with console.status(f"starting the service on Ray Serve, 1 engine replica (about 1-2 minutes; log: {log})"):
        t0 = time.perf_counter()
        server = ServerProcess.start(
            args.model, log, "--max-model-len", "512", "--quantization", "int8", "--cache-dir", ".cache/rollout",
            "--weights-dir", str(weights_dir),
        )
    console.print(f"server ready in {time.perf_counter() - t0:.0f} s: gRPC {server.grpc_address}, HTTP {server.http_url}")
    try:
        with RolloutClient(server.grpc_address, timeout=300) as client:
            client.generate(PROMPTS[:1], max_tokens=4)  # the engine's first call compiles; keep it out of the timing
            t0 = time.perf_counter()
            completions = client.generate(PROMPTS, n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
            elapsed = time.perf_counter() - t0
            tokens = sum(len(s.token_ids) for c in completions for s in c.samples)
            table = Table(title=f"{len(PROMPTS)} prompts x {args.n} samples, T={args.temperature}")
            for col in ("prompt", "completion", "tokens", "mean logprob", "version", "finish"):
                table.add_column(col)
            for c in completions:
                for s in c.samples:
                    table.add_row(
                        PROMPTS[c.prompt_index], repr(s.text[:40]), str(len(s.token_ids)),
                        f"{s.logprobs.mean():.3f}", str(s.weight_version), s.finish_reason,
                    )
            console.print(table)
            console.print("(random-init weights: the text is noise; the logprobs are exactly those it was sampled with)")
            console.print(f"{tokens} tokens in {elapsed:.2f} s = {tokens / elapsed:.0f} tokens/s (engine on one CPU core)")
            status = client.status()
            console.print(f"status: model={status.model} quantization={status.quantization} weight_version="
                          f"{status.weight_version} requests={status.counters.requests_total} tokens={status.counters.tokens_generated}")
            rl_loop(client, args, console)
    finally:
        with console.status("stopping the server"):
            code = server.stop()
    console.print(f"server stopped (exit code {code})")
    if code != 0:
        raise SystemExit(f"the server exited with {code}; see {log}")


def reward(token_ids: list[int]) -> float:
    """A toy reward the policy can learn quickly: the share of even token ids."""
    return sum(t % 2 == 0 for t in token_ids) / max(len(token_ids), 1)


def rl_loop(client: RolloutClient, args, console: Console) -> None:
    """generate -> REINFORCE step (float32 policy here) -> push (int8 on the server) -> generate."""
    import torch
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.01)
    probe = client.generate(PROMPTS[:1], max_tokens=16, temperature=0.0)[0]  # a fixed sequence to rescore
    probe_ids = probe.prompt_token_ids + probe.samples[0].token_ids

    def probe_logprobs():
        c = client.generate(prompt_token_ids=[probe_ids], max_tokens=1, prompt_logprobs=0)[0]
        return c.prompt_logprobs[-len(probe.samples[0].token_ids):]

    table = Table(title="RL loop: generate -> train step -> push (int8 requantized on arrival) -> generate")
    for col in ("round", "version", "mean reward", "push", "mean |Δ logprob| (probe)"):
        table.add_column(col)
    before = probe_logprobs()
    for r in range(args.rounds):
        completions = client.generate(PROMPTS, n=4, max_tokens=args.max_tokens, temperature=1.0, seed=r)
        samples = [(c.prompt_token_ids, s) for c in completions for s in c.samples]
        rewards = torch.tensor([reward(s.token_ids) for _, s in samples])
        advantages = rewards - rewards.mean()
        optimizer.zero_grad()
        for (prompt, s), adv in zip(samples, advantages):
            ids = torch.tensor([prompt + s.token_ids])
            logits = policy(ids).logits[0, len(prompt) - 1 : -1].float()
            logp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(s.token_ids)[:, None]).sum()
            (-adv * logp / len(samples)).backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)  # small steps: the policy drifts, not jumps
        optimizer.step()
        result = client.push_weights(policy.state_dict(), label=f"round {r + 1}")
        after = probe_logprobs()
        table.add_row(
            str(r + 1), str(result.version), f"{rewards.mean():.3f}",
            f"{result.bytes_received / 1e6:.1f} MB, apply {result.apply_s * 1e3:.0f} ms, pause {result.pause_ms:.0f} ms",
            f"{abs(after - before).mean():.4f}",
        )
        before = after
    console.print(table)
    final = client.generate(PROMPTS, n=4, max_tokens=args.max_tokens, temperature=1.0, seed=99)
    mean = sum(reward(s.token_ids) for c in final for s in c.samples) / sum(len(c.samples) for c in final)
    console.print(f"after {args.rounds} pushes: every sample reports weight_version={final[0].samples[0].weight_version}, "
                  f"mean reward {mean:.3f}")


if __name__ == "__main__":
    main()
