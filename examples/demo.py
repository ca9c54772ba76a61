"""`make demo`: a short real rollout against the service on its embedded defaults.

Makes the tiny model (cached), starts `rollout-service serve` as users would, runs a batch of
rollouts through the Python client, prints a table, and shuts the server down cleanly.
"""

from __future__ import annotations

import argparse
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
    args = parser.parse_args()
    console = Console()

    if not (args.model / "config.json").exists():
        with console.status(f"making the tiny model in {args.model}"):
            make_tiny_model(args.model)
    log = args.model.parent / "demo-server.log"
    with console.status(f"starting the server (the engine takes about a minute; log: {log})"):
        t0 = time.perf_counter()
        server = ServerProcess.start(args.model, log, "--max-model-len", "512")
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
            console.print(f"status: model={status.model} dtype={status.dtype} weight_version={status.weight_version} "
                          f"requests={status.counters.requests_total} tokens={status.counters.tokens_generated}")
    finally:
        with console.status("stopping the server"):
            code = server.stop()
    console.print(f"server stopped (exit code {code})")
    if code != 0:
        raise SystemExit(f"the server exited with {code}; see {log}")


if __name__ == "__main__":
    main()
