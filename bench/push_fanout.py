"""How pushed tensors reach Ray Serve replicas, measured side by side in one run (issue 33).

  one node   PushWeights of the bench model (587 MB bf16; --quick: ~50 MB) into 2 replicas on this
             node: the replicas taking each part as a Ray object (serve/fanout.py) / the filesystem
             path before it (a checkout of --baseline-commit: the ingress writes the parts, each
             replica hard-links or reads them). Target: not slower beyond the noise.
  two nodes  (--two-nodes) the same push into 2 replicas on a worker node that sees none of the
             head's files (tests/two_nodes.py, the store in a moto S3 bucket) / into 2 replicas on
             the head: what crossing nodes through Ray costs.

Each side is a real `rollout-service serve` on Ray Serve; one warm-up push, then --rounds pushes,
the sides one after the other (two deployments of this model do not fit beside each other here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import emit, machine  # noqa: E402
from bench.push import bench_model  # noqa: E402

# The last commit whose replicas took pushes through the filesystem.
BASELINE = "df4df71"
HEAD_RESOURCE = "rollout_head_engine"


def pushes(address: str, weights: dict, rounds: int) -> dict:
    from rollout_client import RolloutClient

    seconds, prepare, apply = [], [], []
    with RolloutClient(address, timeout=1200) as client:
        client.push_weights(weights)  # warm-up: first-touch of every page on each side
        for _ in range(rounds):
            start = time.perf_counter()
            result = client.push_weights(weights)
            seconds.append(time.perf_counter() - start)
            prepare.append(result.requantize_s)
            apply.append(result.apply_s)
    return {"push_s": statistics.median(seconds), "all_s": seconds, "prepare_s": statistics.median(prepare),
            "apply_s": statistics.median(apply)}


def serve(model: Path, log: Path, args: list[str], cwd: Path | None = None, env: dict | None = None):
    from rollout_service.launcher import ServerProcess

    return ServerProcess.start(model, log, "--replicas", "2", "--replica-cpus", "1", "--max-model-len", "128",
                               "--kv-cache-gib", "1", *args, cwd=cwd, env=env)


def side(name: str, model: Path, weights: dict, rounds: int, log: Path, args: list[str], **where) -> dict:
    """One side of a comparison: a deployment started (`where`: its code's cwd / env), pushed
    into, stopped."""
    server = serve(model, log, args, **where)
    try:
        measured = pushes(server.grpc_address, weights, rounds)
    finally:
        server.stop()
    print(f"{name}: {measured}", flush=True)
    return measured


def one_node(model: Path, weights: dict, rounds: int, work: Path, baseline: str) -> dict:
    checkout = work / "baseline"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(checkout), baseline], check=True, capture_output=True)
    out = {}
    try:
        # The baseline's code first on the path of the server and of every Ray process it starts.
        old = {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), str(checkout / "clients" / "python")])}
        for name, cwd, env in (("filesystem", checkout, old), ("ray_objects", None, None)):
            args = ["--weights-dir", str(work / f"{name}-store"), "--cache-dir", str(work / f"{name}-cache")]
            out[name] = side(f"one node, {name}", model, weights, rounds, work / f"{name}.log", args, cwd=cwd, env=env)
    finally:
        subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(checkout)], check=False)
    out["ratio_ray_vs_filesystem"] = out["ray_objects"]["push_s"] / out["filesystem"]["push_s"]
    return out


def two_nodes(model: Path, weights: dict, rounds: int, work: Path) -> dict:
    from tests.s3 import start_s3
    from tests.two_nodes import RESOURCE, start_two_nodes

    s3 = start_s3()
    nodes = start_two_nodes([work / "hidden"], work / "ray-logs", env=s3.env(), head_resources={HEAD_RESOURCE: 2})
    out = {}
    try:
        env = {**os.environ, **nodes.env()}
        env.pop("RAY_AUTH_TOKEN_PATH", None)
        for name, resource in (("head", HEAD_RESOURCE), ("worker", RESOURCE)):
            args = ["--ray-address", nodes.address, "--replica-resource", resource,
                    "--weights-dir", f"s3://{s3.new_bucket()}/store", "--cache-dir", str(work / "hidden" / name)]
            out[name] = side(f"two nodes, replicas on the {name}", model, weights, rounds, work / f"two-{name}.log", args, env=env)
    finally:
        nodes.stop()
        s3.stop()
    out["ratio_worker_vs_head"] = out["worker"]["push_s"] / out["head"]["push_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the ~50 MB model, 1 round (about 8 minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--rounds", type=int, help="measured pushes per side (default 3; quick 1)")
    parser.add_argument("--baseline-commit", default=BASELINE, help="the filesystem path's code (default %(default)s)")
    parser.add_argument("--two-nodes", action="store_true", help="also the two-node comparison (needs root: unshare)")
    parser.add_argument("--no-one-node", action="store_true", help="skip the one-node comparison")
    args = parser.parse_args()
    from safetensors.torch import load_file

    model = bench_model(args.quick)
    weights = {k: v for f in sorted(model.glob("*.safetensors")) for k, v in load_file(f).items()}
    rounds = args.rounds or (1 if args.quick else 3)
    result = {"machine": machine(), "model_mb": round(sum(v.nbytes for v in weights.values()) / 1e6), "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="push-fanout-") as tmp:
        work = Path(tmp)
        (work / "hidden").mkdir()
        if not args.no_one_node:
            result["one_node"] = one_node(model, weights, rounds, work, args.baseline_commit)
        if args.two_nodes:
            result["two_nodes"] = two_nodes(model, weights, rounds, work)
    if args.json:
        emit(result)
    else:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
