"""A verl-sized batch in one Generate call through the Ray Serve deployment, 1 replica then 2.

  seq_s_1_replica / seq_s_2_replicas   sequences/s of one call of P prompts x n=8 (median of rounds)
  split_ratio                          2 replicas / 1 replica (the batch is split across replicas,
                                       serve/split.py)
On this 2-core machine the replicas, the ingress and the client share the cores, so the ratio
shows what splitting costs or gains here, not how it scales on a machine with a core set (or a
GPU) per replica.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CACHE, emit, machine, tiny_model  # noqa: E402


def one_call(client, prompts: list[list[int]], n: int, max_tokens: int) -> float:
    start = time.perf_counter()
    out = client.generate(prompt_token_ids=prompts, n=n, max_tokens=max_tokens, temperature=1.0, ignore_eos=True)
    elapsed = time.perf_counter() - start
    assert sum(len(c.samples) for c in out) == len(prompts) * n
    return len(prompts) * n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="128 prompts x 8 (1,024 sequences), 2 rounds; full: 512 x 8, 3 rounds")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    prompts_n, rounds, max_tokens = (128, 2, 8) if args.quick else (512, 3, 16)

    import ray
    from rollout_client import RolloutClient

    from rollout_service.config import ServerConfig
    from rollout_service.serve.runner import deploy, start_ray

    model = tiny_model()
    prompts = [[10 + (i * 7 + j) % 2000 for j in range(16)] for i in range(prompts_n)]
    store = Path(tempfile.mkdtemp(prefix="large-batch-", dir=CACHE))
    config = ServerConfig(model=model, port=0, http_port=None, max_model_len=256, replicas=1, replica_cpus=1,
                          weights_dir=store / "weights", cache_dir=CACHE / "rollout")
    results: dict = {"prompts": prompts_n, "n": 8, "max_tokens": max_tokens, "rounds": rounds, "machine": machine()}
    print(f"{prompts_n} prompts x 8 x {max_tokens} tokens; {machine()}", file=sys.stderr)
    # start_ray: loopback, Ray's token, and room for the GCS to start beside the bench's other processes.
    start_ray(num_cpus=2, private_dir=config.cache_dir, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        address = deploy(config).endpoints.remote().result()["grpc"]
        with RolloutClient(address, timeout=1800) as client:
            for replicas in (1, 2):
                if replicas == 2:
                    deploy(config.model_copy(update={"replicas": 2}))
                one_call(client, prompts[:4], 8, 2)  # first calls compile; keep them out
                rates = [one_call(client, prompts, 8, max_tokens) for _ in range(rounds)]
                print(f"{replicas} replica(s): {[round(r) for r in rates]} sequences/s", file=sys.stderr)
                results[f"seq_s_{replicas}_replica{'s' if replicas > 1 else ''}"] = statistics.median(rates)
        results["split_ratio"] = results["seq_s_2_replicas"] / results["seq_s_1_replica"]
    finally:
        ray.shutdown()
    print(f"sequences/s: 1 replica {results['seq_s_1_replica']:.0f}, 2 replicas {results['seq_s_2_replicas']:.0f} "
          f"(ratio {results['split_ratio']:.2f})")
    if args.json:
        emit(results)


if __name__ == "__main__":
    main()
