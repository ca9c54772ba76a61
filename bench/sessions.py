"""Multi-turn sessions on 2 Ray Serve replicas, with and without session affinity, side by side.

Each session is an agentic episode, token in and token out: turn 1 sends a 64-token prompt of its
own; every later turn sends the previous prompt + the tokens sampled for it + a 16-token
observation (never re-tokenized). With `session_id` every turn of a session goes to one replica
(rendezvous hashing, serve/routing.py), whose prefix cache holds the previous turn; without it
Serve's power-of-two-choices router picks a replica per call. Both configurations run the same
workload, interleaved round by round.

  hit_rate_affinity / hit_rate_no_affinity
                     prompt tokens served from the prefix cache / prompt tokens, over turns 2..T
                     (Completion.cached_prompt_tokens; vLLM caches whole KV blocks of
                     `block_size` tokens: 128 on CPU unless set)
  tok_s_affinity / tok_s_no_affinity
                     generated tokens / wall time of the whole workload (all sessions at once)
  affinity_tok_ratio tok_s_affinity / tok_s_no_affinity (median over rounds)

On this 2-core machine the two replicas share the cores, so tokens/s shows what prefill saved,
not what a replica per GPU would.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CACHE, emit, machine, tiny_model  # noqa: E402

FIRST_PROMPT, OBSERVATION, SAMPLED = 64, 16, 16


async def episode(client, rng: random.Random, turns: int, session_id: str, vocab: int) -> tuple[int, int, int]:
    """(prompt tokens of turns 2.., of them cached, generated tokens) of one session."""
    ids = [rng.randrange(10, vocab) for _ in range(FIRST_PROMPT)]
    later = cached = generated = 0
    for turn in range(turns):
        (c,) = await client.generate(prompt_token_ids=[ids], max_tokens=SAMPLED, ignore_eos=True, temperature=1.0,
                                     seed=rng.randrange(1 << 30), session_id=session_id)
        if turn:
            later += len(c.prompt_token_ids)
            cached += c.cached_prompt_tokens
        sampled = c.samples[0].token_ids
        generated += len(sampled)
        ids = ids + sampled + [rng.randrange(10, vocab) for _ in range(OBSERVATION)]
    return later, cached, generated


async def workload(address: str, sessions: int, turns: int, affinity: bool, seed: int) -> dict:
    from rollout_client import AsyncRolloutClient

    async with AsyncRolloutClient(address, timeout=600) as client:
        vocab = (await client.status()).vocab_size
        start = time.perf_counter()
        results = await asyncio.gather(*(
            episode(client, random.Random(seed * 1000 + s), turns, f"s{seed}-{s}" if affinity else "", vocab)
            for s in range(sessions)
        ))
        wall = time.perf_counter() - start
    later, cached, generated = (sum(r[i] for r in results) for i in range(3))
    return {"hit_rate": cached / later, "tok_s": generated / wall, "wall_s": wall}


async def rounds_of(address: str, sessions: int, turns: int, rounds: int, calls_per_replica) -> dict[bool, list[dict]]:
    """The workload with and without affinity, `rounds` times, alternating which goes first (one
    event loop for all: grpc.aio's poller stays bound to the first)."""
    await workload(address, 4, turns, False, seed=999)  # every sequence length once: compiles stay out
    runs: dict[bool, list[dict]] = {True: [], False: []}
    for r in range(rounds):
        for affinity in ((True, False) if r % 2 == 0 else (False, True)):
            await asyncio.sleep(1.5)  # the idle engines' busy-poll ends 1 s after their last step
            before = await asyncio.to_thread(calls_per_replica)
            runs[affinity].append(await workload(address, sessions, turns, affinity, seed=r * 2 + affinity))
            after = await asyncio.to_thread(calls_per_replica)
            run = runs[affinity][-1]
            print(f"round {r + 1}, {'affinity' if affinity else 'no affinity'}: prefix-cache hit rate "
                  f"{run['hit_rate']:.3f}, {run['tok_s']:.0f} tok/s ({run['wall_s']:.1f} s); calls per replica "
                  f"{sorted(after[k] - before.get(k, 0) for k in after)}", file=sys.stderr)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 sessions x 4 turns, 1 round (about 3 minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--block-size", type=int, default=None, help="the engines' KV block size (default: vLLM's)")
    args = parser.parse_args()
    sessions, turns, rounds = (16, 4, 1) if args.quick else (64, 8, 2)

    import ray
    from ray import serve

    from rollout_service.config import ServerConfig
    from rollout_service.serve.app import APP_NAME
    from rollout_service.serve.runner import deploy, start_ray

    model = tiny_model()
    store = Path(tempfile.mkdtemp(prefix="sessions-bench-", dir=CACHE))
    max_len = FIRST_PROMPT + turns * (SAMPLED + OBSERVATION) + SAMPLED
    extra = {"block_size": args.block_size} if args.block_size else {}
    config = ServerConfig(model=model, port=0, http_port=None, max_model_len=max(256, max_len), replicas=2, replica_cpus=1,
                          weights_dir=store / "weights", cache_dir=CACHE / "rollout", **extra)
    results: dict = {"sessions": sessions, "turns": turns, "rounds": rounds, "machine": machine(),
                     "block_size": args.block_size or "default"}
    print(f"{sessions} sessions x {turns} turns on 2 replicas; {machine()}", file=sys.stderr)
    # start_ray: loopback, Ray's token, and room for the GCS to start beside the bench's other processes.
    start_ray(num_cpus=2, private_dir=config.cache_dir, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        address = deploy(config).endpoints.remote().result()["grpc"]
        engines = serve.get_deployment_handle("EngineReplica", APP_NAME)

        def calls_per_replica() -> dict[str, int]:
            return {i["replica_id"]: s.counters.requests_total for i, s in engines.broadcast("served").results(timeout_s=120)}

        runs = asyncio.run(rounds_of(address, sessions, turns, rounds, calls_per_replica))
    finally:
        ray.shutdown()
    for affinity, name in ((True, "affinity"), (False, "no_affinity")):
        results[f"hit_rate_{name}"] = statistics.median(r["hit_rate"] for r in runs[affinity])
        results[f"tok_s_{name}"] = statistics.median(r["tok_s"] for r in runs[affinity])
    results["affinity_tok_ratio"] = statistics.median(a["tok_s"] / b["tok_s"] for a, b in zip(runs[True], runs[False]))
    print(f"prefix-cache hit rate {results['hit_rate_affinity']:.3f} with affinity, {results['hit_rate_no_affinity']:.3f} "
          f"without; tokens/s ratio {results['affinity_tok_ratio']:.2f}", file=sys.stderr)
    if args.json:
        emit(results)


if __name__ == "__main__":
    main()
