"""Tokens/s through the service (gRPC client) divided by tokens/s of vLLM in-process.

Both engines are built from the same vLLM engine arguments (`engine_args`) and run the same
batch with the same sampling parameters (per-token logprobs on). They are measured side by side
in one run, round-robin A/B/A/B; the ratio is the median over rounds of service/vLLM measured
back to back, so drift on the machine hits both alike. The in-process
baseline runs in a child process of its own (it is told "run" on stdin and answers with a JSON
line): sharing one event loop between the gRPC client and an AsyncLLM slowed the client side by
half, which measured the bench, not the service.

    python bench/generate_overhead.py [--quick] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine, tiny_model  # noqa: E402


# vLLM's worker keeps busy-polling its shared-memory queue for 1 s after its last message
# (MessageQueue busy_loop_s in vllm/distributed/device_communicators/shm_broadcast.py). Both
# engines' workers are bound to the same core here, so a side timed right after the other would
# share that core with a spinning worker: wait it out between sides.
SETTLE_S = 1.5
PROTOCOL = "@bench "  # marks the baseline child's protocol lines among vLLM's log lines


def batch(prompts: int, prompt_len: int) -> list[list[int]]:
    return [[(7 * i + j) % 2000 + 10 for j in range(prompt_len)] for i in range(prompts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batch, 2 rounds (under 3 minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--prompts", type=int, help="batch size (default 32; quick 16)")
    parser.add_argument("--max-tokens", type=int, help="tokens per sample (default 64; quick 32)")
    parser.add_argument("--rounds", type=int, help="measured rounds per side (default 8; quick 2)")
    parser.add_argument("--inprocess-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    prompts = args.prompts or (16 if args.quick else 32)
    max_tokens = args.max_tokens or (32 if args.quick else 64)
    rounds = args.rounds or (2 if args.quick else 8)
    if args.inprocess_worker:
        asyncio.run(inprocess_worker(prompts, max_tokens))
        return
    result = asyncio.run(run(prompts, max_tokens, rounds))
    print(f"service {result['service_tok_s']:.1f} tok/s, vLLM in-process {result['vllm_tok_s']:.1f} tok/s, "
          f"ratio {result['ratio']:.3f} ({prompts} prompts x {max_tokens} tokens, {rounds} rounds, {machine()})")
    if args.json:
        emit({**result, "machine": machine()})


def _settings(prompts: int, max_tokens: int):
    from rollout_service.config import ServerConfig
    from rollout_service.types import SamplingOptions

    config = ServerConfig(model=tiny_model(), max_model_len=512)
    opts = SamplingOptions(max_tokens=max_tokens, temperature=1.0, ignore_eos=True, seed=0)
    return config, opts, batch(prompts, 16)


async def inprocess_worker(prompts: int, max_tokens: int) -> None:
    """Child process: vLLM's AsyncLLM with the service's engine arguments; one round per 'run'."""
    from vllm.v1.engine.async_llm import AsyncLLM

    from rollout_service.engine import vllm_io
    from rollout_service.engine.engine import engine_args, resolve_model

    config, opts, ids = _settings(prompts, max_tokens)
    llm = AsyncLLM.from_engine_args(engine_args(config, resolve_model(config)))
    params = vllm_io.sampling_params(opts)

    async def one(i: int, p: list[int]) -> int:
        final = None
        async for final in llm.generate({"prompt_token_ids": p}, params, f"bench-{time.monotonic_ns()}-{i}"):
            pass
        return sum(len(o.token_ids) for o in final.outputs)

    print(f"{PROTOCOL}READY", flush=True)
    loop = asyncio.get_running_loop()
    while (await loop.run_in_executor(None, sys.stdin.readline)).strip() == "run":
        t0 = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i, p) for i, p in enumerate(ids))))
        print(PROTOCOL + json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0}), flush=True)
    llm.shutdown()


class InProcessBaseline:
    def __init__(self, prompts: int, max_tokens: int, log: Path):
        cmd = [sys.executable, __file__, "--inprocess-worker", "--prompts", str(prompts), "--max-tokens", str(max_tokens)]
        self._log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True)
        if self._reply() != "READY":
            raise RuntimeError(f"in-process baseline failed to start; see {log}")

    def _reply(self) -> str:
        """The next protocol line; vLLM logs to stdout too, so other lines are skipped."""
        while line := self.proc.stdout.readline():
            if line.startswith(PROTOCOL):
                return line[len(PROTOCOL):].strip()
        raise RuntimeError("in-process baseline exited")

    def round(self) -> tuple[int, float]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        reply = json.loads(self._reply())
        return reply["tokens"], reply["seconds"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(120)
        self._log.close()


async def run(prompts: int, max_tokens: int, rounds: int) -> dict:
    from rollout_client import AsyncRolloutClient

    from rollout_service.launcher import ServerProcess

    config, opts, ids = _settings(prompts, max_tokens)
    logs = Path(tempfile.mkdtemp())
    server = ServerProcess.start(config.model, logs / "server.log", "--backend", "local", "--max-model-len", str(config.max_model_len), "--no-http")
    baseline = InProcessBaseline(prompts, max_tokens, logs / "inprocess.log")
    client = AsyncRolloutClient(server.grpc_address, timeout=600)
    try:
        async def via_service() -> tuple[int, float]:
            t0 = time.perf_counter()
            out = await client.generate(
                prompt_token_ids=ids, max_tokens=opts.max_tokens, temperature=opts.temperature,
                ignore_eos=opts.ignore_eos, seed=opts.seed,
            )
            return sum(len(s.token_ids) for c in out for s in c.samples), time.perf_counter() - t0

        async def in_process() -> tuple[int, float]:
            return baseline.round()

        sides = {"service": via_service, "vllm": in_process}
        for fn in sides.values():  # warm-up: compile paths, caches
            await fn()
        rates: dict[str, list[float]] = {name: [] for name in sides}
        for _ in range(rounds):
            for name, fn in sides.items():
                await asyncio.sleep(SETTLE_S)
                tokens, seconds = await fn()
                rates[name].append(tokens / seconds)
    finally:
        await client.close()
        baseline.close()
        server.stop()
    # Each round's two sides ran back to back: their ratio cancels drift on the machine, and the
    # median of those paired ratios resists the odd disturbed round.
    paired = [s / v for s, v in zip(rates["service"], rates["vllm"])]
    return {
        "service_tok_s": round(statistics.median(rates["service"]), 1),
        "vllm_tok_s": round(statistics.median(rates["vllm"]), 1),
        "ratio": round(statistics.median(paired), 3),
        "paired_ratios": [round(r, 3) for r in paired],
        "prompts": prompts,
        "max_tokens": max_tokens,
        "rounds": rounds,
        "service_rounds": [round(r, 1) for r in rates["service"]],
        "vllm_rounds": [round(r, 1) for r in rates["vllm"]],
    }


if __name__ == "__main__":
    main()
