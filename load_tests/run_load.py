"""`make load`: the locust load (load_tests/locustfile.py) on a fresh server, without and with pushes.

Makes the tiny model (cached), starts `rollout-service serve` on it (on this machine, free ports, a
temporary weight store), then runs two bounded headless locust phases with the same users (2
trainers, 1 gRPC and 1 HTTP evaluator): one without weight pushes, one with a push every
--push-every seconds. Prints p50/p99 latency per call and tokens/s of both side by side; fails if
a request failed or a sample carried a weight version that was never committed.

    python load_tests/run_load.py [--quick] [--json]

--quick: 20 s phases instead of 60 s. --json: the last stdout line is one JSON object with both
phases' summaries (the locustfile's summary JSON). Locust's own output goes to a log file per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rollout_client import RolloutClient
from rollout_service.launcher import ServerProcess
from rollout_service.models.tiny import make_tiny_model

HERE = Path(__file__).resolve().parent
USERS = 4  # by the user classes' weights: 2 trainers, 1 gRPC evaluator, 1 HTTP evaluator


def run_phase(server: ServerProcess, model: Path, work: Path, name: str, seconds: int, push_every: float, max_requests: int) -> tuple[int, dict]:
    """One headless locust run; (its exit code, its summary)."""
    summary, log = work / f"{name}.json", work / f"{name}.locust.log"
    env = dict(
        os.environ, ROLLOUT_GRPC_ADDRESS=server.grpc_address, ROLLOUT_HTTP_URL=server.http_url,
        LOAD_PUSH_EVERY_S=str(push_every), LOAD_WEIGHTS=str(model / "model.safetensors"),
        LOAD_MAX_REQUESTS=str(max_requests), LOAD_SUMMARY_JSON=str(summary),
    )
    cmd = [
        sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "--only-summary",
        "-u", str(USERS), "-r", str(USERS), "--run-time", f"{seconds}s", "--stop-timeout", "30",
    ]
    print(f"phase {name!r}: {seconds} s, pushes {'every %g s' % push_every if push_every else 'off'} (locust log: {log})", file=sys.stderr)
    with open(log, "w") as out:
        code = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=seconds + 300).returncode
    if not summary.exists():
        raise SystemExit(f"locust wrote no summary (exit code {code}):\n{log.read_text()[-3000:]}")
    return code, json.loads(summary.read_text())


def table(phases: dict[str, dict]) -> str:
    """Calls as rows, phases as column groups: p50 / p99 ms and tokens/s."""
    names = sorted({n for p in phases.values() for n in p["by_name"]})
    head = f"{'call':<32}" + "".join(f"{ph + ': p50 / p99 ms, tok/s':>36}" for ph in phases)
    rows = [head, "-" * len(head)]
    for n in names:
        cells = []
        for p in phases.values():
            s = p["by_name"].get(n)
            tokens = f"{s['tokens_per_s']:>9.1f}" if s and s["tokens"] else f"{'-':>9}"
            cells.append(f"{s['p50_ms']:>9.0f} / {s['p99_ms']:>7.0f} {tokens}" if s else "-")
        rows.append(f"{n:<32}" + "".join(f"{c:>36}" for c in cells))
    rows.append(f"{'all (tokens/s)':<32}" + "".join(f"{p['tokens_per_s']:>36.1f}" for p in phases.values()))
    rows.append(f"{'requests / failed':<32}" + "".join(f"{'%d / %d' % (p['requests'], p['failures']):>36}" for p in phases.values()))
    rows.append(f"{'pushes / versions seen':<32}" + "".join(
        f"{'%d / %s' % (p['pushes']['count'], ','.join(p['versions_seen'])):>36}" for p in phases.values()))
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path(".cache/tiny-model"), help="checkpoint (the tiny model is made if missing)")
    parser.add_argument("--quick", action="store_true", help="20 s phases (default 60 s)")
    parser.add_argument("--seconds", type=int, help="seconds per phase (overrides --quick)")
    parser.add_argument("--push-every", type=float, default=5.0, help="seconds between pushes in the second phase")
    parser.add_argument("--max-requests", type=int, default=5000, help="per phase")
    parser.add_argument("--backend", choices=("local", "ray"), default="local", help="server backend (default: local, one engine)")
    parser.add_argument("--json", action="store_true", help="last stdout line: both summaries as one JSON object")
    args = parser.parse_args()
    seconds = args.seconds or (20 if args.quick else 60)

    if not (args.model / "config.json").exists():
        print(f"making the tiny model in {args.model}", file=sys.stderr)
        make_tiny_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="rollout-load-"))
    print(f"starting the server (backend {args.backend}; log: {work / 'server.log'})", file=sys.stderr)
    t0 = time.perf_counter()
    server = ServerProcess.start(args.model, work / "server.log", "--backend", args.backend, "--max-model-len", "256")
    print(f"server ready in {time.perf_counter() - t0:.0f} s: gRPC {server.grpc_address}, HTTP {server.http_url}", file=sys.stderr)
    try:
        with RolloutClient(server.grpc_address, timeout=300) as client:  # the first call compiles: not in the figures
            client.generate(prompt_token_ids=[[1, 2, 3]], n=2, max_tokens=4, temperature=1.0)
        phases, codes = {}, {}
        for name, push_every in (("no pushes", 0.0), ("pushes", args.push_every)):
            codes[name], phases[name] = run_phase(server, args.model, work, name.replace(" ", "-"), seconds, push_every, args.max_requests)
    finally:
        server.stop()
    print(table(phases))
    failed = {n: c for n, c in codes.items() if c != 0}
    if args.json:
        print(json.dumps({"ok": not failed, "seconds_per_phase": seconds, "phases": phases}))
    if failed:
        raise SystemExit(f"locust failed in {failed} (exit codes; logs in {work})")


if __name__ == "__main__":
    main()
