"""A push into this checkout's single-process server beside the same push into another checkout's
(--vs DIR, e.g. a worktree of main), round by round in one run: for a change to the push path, the
ratio of the two is the figure to read (the machine's drift hits both sides alike).

For each engine format (bf16, and int8: requantized on arrival) both servers run at once on the
bench model of bench/push.py, each from its own checkout (its own code; the same .venv); every
round pushes the same weights to one side and then the other (the order alternating), over
shared memory (the default on one host) and streamed, waiting for the engines to go idle between
pushes (bench/common.quiet). Reported: the median GB/s of each side and the median per-round
ratio this/other.

    python bench/push_paired.py --vs ../main [--quick] [--json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CACHE, emit, machine, quiet  # noqa: E402
from bench.push import CHUNK, bench_model  # noqa: E402
from rollout_service.launcher import READY, START_TIMEOUT_S  # noqa: E402

FORMATS = ("none", "int8")


def start(checkout: Path, model: Path, log: Path, quantization: str) -> tuple[subprocess.Popen, str]:
    """`rollout-service serve --backend local` from `checkout`'s code; (process, gRPC address)."""
    env = {**os.environ, "PYTHONPATH": f"{checkout}:{checkout / 'clients' / 'python'}"}
    cmd = [sys.executable, "-m", "rollout_service.cli", "serve", "--model", str(model), "--backend", "local",
           "--port", "0", "--no-http", "--max-model-len", "256", "--quantization", quantization,
           "--cache-dir", str(CACHE / f"paired-{checkout.name}")]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=checkout, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if m := READY.search(log.read_text()):
            return proc, f"{m.group(1)}:{m.group(2)}"
        if proc.poll() is not None:
            raise RuntimeError(f"{checkout}: the server exited before ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError(f"{checkout}: the server was not ready after {START_TIMEOUT_S} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vs", type=Path, required=True, help="the other checkout (its code runs the other server)")
    parser.add_argument("--quick", action="store_true", help="the ~50 MB bench model, 3 rounds (about 6 minutes)")
    parser.add_argument("--rounds", type=int, help="rounds per format and path (default 5; quick 3)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 5)
    sides = {"this": REPO, "other": args.vs.resolve()}

    import torch
    from safetensors.torch import load_file

    from rollout_client import RolloutClient

    model = bench_model(args.quick)
    weights = load_file(model / "model.safetensors")
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    g = torch.Generator().manual_seed(0)
    policies = [weights, {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in weights.items()}]
    results: dict = {"model_mb": round(nbytes / 1e6, 1), "rounds": rounds, "machine": machine(),
                     "this": str(REPO), "other": str(sides["other"])}
    print(f"bench model {model.name}: {nbytes / 1e6:.0f} MB; this={REPO}, other={sides['other']}", file=sys.stderr)
    for fmt in FORMATS:
        procs = {}
        try:
            clients = {}
            for side, checkout in sides.items():
                procs[side], address = start(checkout, model, CACHE / f"paired-{side}-{fmt}.log", fmt)
                clients[side] = RolloutClient(address, timeout=600)
                clients[side].push_weights(policies[1], chunk_bytes=CHUNK)  # warm
            for path, shared in (("shm", True), ("stream", False)):
                secs: dict[str, list[float]] = {side: [] for side in sides}
                for r in range(rounds):
                    order = list(sides) if r % 2 == 0 else list(sides)[::-1]
                    for side in order:
                        quiet()
                        pushed = clients[side].push_weights(policies[r % 2], chunk_bytes=CHUNK, shared_memory=shared, delta=False)
                        secs[side].append(pushed.seconds)
                key = f"{fmt}_{path}"
                results[f"{key}_gbps"] = {side: round(nbytes / statistics.median(s) / 1e9, 4) for side, s in secs.items()}
                results[f"{key}_ratio"] = round(statistics.median(o / t for t, o in zip(secs["this"], secs["other"])), 3)
                print(f"{key}: this {results[f'{key}_gbps']['this']} GB/s, other {results[f'{key}_gbps']['other']} GB/s, "
                      f"ratio this/other {results[f'{key}_ratio']} (per round: {[round(o / t, 3) for t, o in zip(secs['this'], secs['other'])]})",
                      file=sys.stderr)
            for c in clients.values():
                c.close()
        finally:
            for proc in procs.values():
                proc.terminate()
                proc.wait(60)
    if args.json:
        emit(results)


if __name__ == "__main__":
    main()
