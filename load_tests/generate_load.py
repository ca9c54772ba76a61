"""Closed-loop load on a running rollout-service: C concurrent callers for T seconds.

Reports calls/s, tokens/s, latency percentiles and every error by gRPC code. Bounded in time and
count, and only for servers on this machine (loopback), as this project's rules require.

    python load_tests/generate_load.py --address 127.0.0.1:50051 --concurrency 8 --seconds 30

A server started with --api-keys needs a key (`--api-key`, or ROLLOUT_API_KEY); one with TLS
needs `--root-certificates CA.pem` (and, for mutual TLS, `--client-certificate` / `--client-key`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections import Counter

from loopback import loopback_host  # this folder's; run as a script: python load_tests/generate_load.py
from rollout_client import AsyncRolloutClient, RolloutClientError


async def caller(client: AsyncRolloutClient, args, stop_at: float, latencies: list, errors: Counter, tokens: list):
    prompt = [[(11 * i) % 1500 + 20 for i in range(args.prompt_len)]] * args.batch
    while time.monotonic() < stop_at and len(latencies) + sum(errors.values()) < args.max_calls:
        t0 = time.perf_counter()
        try:
            out = await client.generate(prompt_token_ids=prompt, n=args.n, max_tokens=args.max_tokens, temperature=1.0)
        except RolloutClientError as err:
            errors[err.code.name] += 1
            continue
        latencies.append(time.perf_counter() - t0)
        tokens.append(sum(len(s.token_ids) for c in out for s in c.samples))


async def run(args) -> dict:
    loopback_host(args.address, "--address")
    latencies: list[float] = []
    tokens: list[int] = []
    errors: Counter = Counter()
    tls = {
        "root_certificates": args.root_certificates, "client_certificate": args.client_certificate,
        "client_key": args.client_key,
    }
    async with AsyncRolloutClient(
        args.address, timeout=args.call_timeout, api_key=args.api_key, **{k: v for k, v in tls.items() if v}
    ) as client:
        t0 = time.monotonic()
        stop_at = t0 + args.seconds
        await asyncio.gather(*(caller(client, args, stop_at, latencies, errors, tokens) for _ in range(args.concurrency)))
        elapsed = time.monotonic() - t0
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3) if latencies else float("nan")

    return {
        "calls": len(latencies),
        "errors": dict(errors),
        "calls_per_s": round(len(latencies) / elapsed, 2),
        "tokens_per_s": round(sum(tokens) / elapsed, 1),
        "latency_s": {"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1.0)},
        "concurrency": args.concurrency,
        "seconds": round(elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", default="127.0.0.1:50051")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0, help="stop starting calls after this long")
    parser.add_argument("--max-calls", type=int, default=10_000, help="stop after this many calls in all")
    parser.add_argument("--batch", type=int, default=4, help="prompts per call")
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--call-timeout", type=float, default=120.0)
    parser.add_argument("--api-key", default=os.environ.get("ROLLOUT_API_KEY"), help="a trainer or eval key")
    parser.add_argument("--root-certificates", help="CA (PEM) of a TLS server")
    parser.add_argument("--client-certificate", help="this client's certificate (PEM), for mutual TLS")
    parser.add_argument("--client-key", help="its private key (PEM)")
    print(json.dumps(asyncio.run(run(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
