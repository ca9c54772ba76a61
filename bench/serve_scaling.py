"""The cost of Ray Serve, and pushes through the deployment, measured side by side in one run.

  serve_tok_ratio          tokens/s through the Serve deployment (ingress -> handle -> 1 engine
                           replica) / tokens/s of the single-process server (`--backend local`),
                           same model, same load, rounds interleaved; target >= 0.95
  push latency             PushWeights of the whole model into 1 replica, then 2 (scaled in place)
  push_ratio_vs_bare_grpc  push throughput into 2 replicas, streamed (shared_memory=False) / the same
                           client stream into a gRPC server that only counts bytes, interleaved;
                           target >= 0.7
  serve_push_ratio_vs_local / serve_push_ratio_vs_tcp
                           push into 2 replicas / push into the single-process server (target
                           >= 0.8) / the raw bytes over loopback TCP, interleaved round by round;
                           every push takes the client's default path (shared memory on one host)
  int8_serve_push_ratio_vs_local
                           the same with int8 replicas and an int8 single-process server
  tokens/s with 2 replicas on this machine (2 cores shared by everything: replicas cannot add
  throughput here; the scaling measurement belongs on a machine with a core set per replica).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CACHE, emit, machine, quiet  # noqa: E402
from bench.push import CHUNK, _bare_grpc_server, _start, _tcp_sink, bench_model, tcp_send  # noqa: E402

PROMPT = [(7 * j) % 1500 + 20 for j in range(24)]


def tokens_per_s(address: str, threads: int, calls: int, batch: int, max_tokens: int) -> float:
    """`threads` clients each making `calls` Generate calls of `batch` prompts x `max_tokens`."""
    from rollout_client import RolloutClient

    counts: list[int] = []

    def worker(seed: int) -> None:
        with RolloutClient(address, timeout=600) as c:
            for i in range(calls):
                done = c.generate(prompt_token_ids=[PROMPT] * batch, max_tokens=max_tokens, ignore_eos=True, seed=seed * 100 + i)
                counts.append(sum(len(s.token_ids) for comp in done for s in comp.samples))

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 23 MB model instead of the 587 MB one, 2 rounds, lighter load (about 6 minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    rounds = 2 if args.quick else 3
    load = dict(threads=2, calls=2, batch=8, max_tokens=32) if args.quick else dict(threads=4, calls=2, batch=8, max_tokens=32)

    import grpc
    import ray
    import torch
    from rollout_client import RolloutClient
    from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc
    from rollout_client.push import requests
    from safetensors.torch import load_file

    from rollout_service.config import ServerConfig
    from rollout_service.launcher import ServerProcess
    from rollout_service.serve.runner import deploy, start_ray

    model = bench_model(args.quick)
    weights = load_file(model / "model.safetensors")
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    g = torch.Generator().manual_seed(0)
    policies = [weights, {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in weights.items()}]
    print(f"bench model {model.name}: {nbytes / 1e6:.0f} MB bf16; {machine()}", file=sys.stderr)
    results: dict = {"model_mb": round(nbytes / 1e6, 1), "rounds": rounds, "load": load, "machine": machine()}

    bare_proc, bare_port = _start(_bare_grpc_server)
    tcp_proc, tcp_port = _start(_tcp_sink)
    payload = [memoryview(t.contiguous().view(torch.uint8).numpy()) for t in weights.values()]
    bare = pb_grpc.RolloutServiceStub(grpc.insecure_channel(f"127.0.0.1:{bare_port}", options=[("grpc.max_send_message_length", 256 << 20)]))
    local = ServerProcess.start(model, CACHE / "serve-bench-local.log", "--backend", "local", "--max-model-len", "256",
                                "--no-http", "--cache-dir", str(CACHE / "rollout"))
    store = Path(tempfile.mkdtemp(prefix="serve-bench-", dir=CACHE))
    config = ServerConfig(model=model, port=0, http_port=None, max_model_len=256, replicas=1, replica_cpus=1,
                          weights_dir=store / "weights", cache_dir=CACHE / "rollout")
    # start_ray: loopback, Ray's token, and room for the GCS to start beside the bench's other processes.
    start_ray(num_cpus=2, private_dir=config.cache_dir, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        address = deploy(config).endpoints.remote().result()["grpc"]
        client = RolloutClient(address, timeout=600)
        for a in (local.grpc_address, address):  # first calls compile; keep them out
            tokens_per_s(a, 1, 1, 2, 4)

        local_tps, serve_tps = [], []
        for r in range(rounds):
            order = [("local", local.grpc_address), ("serve", address)][:: 1 if r % 2 == 0 else -1]
            for name, a in order:
                quiet()
                (local_tps if name == "local" else serve_tps).append(tokens_per_s(a, **load))
            print(f"round {r + 1}: local {local_tps[-1]:.0f} tok/s, serve {serve_tps[-1]:.0f} tok/s", file=sys.stderr)
        results["local_tok_s"] = statistics.median(local_tps)
        results["serve_tok_s"] = statistics.median(serve_tps)
        results["serve_tok_ratio"] = statistics.median(s / l for s, l in zip(serve_tps, local_tps))
        local_client = RolloutClient(local.grpc_address, timeout=600)

        def pushes(n: int) -> list:
            done = []
            for i in range(n):
                quiet()
                done.append(client.push_weights(policies[i % 2], chunk_bytes=CHUNK))
            return done

        client.push_weights(policies[1], chunk_bytes=CHUNK)  # warm
        one = pushes(rounds)
        results["push_1_replica_s"] = statistics.median(p.seconds for p in one)
        print(f"push to 1 replica: {[round(p.seconds, 2) for p in one]} s", file=sys.stderr)

        start = time.perf_counter()
        deploy(config.model_copy(update={"replicas": 2}))
        results["scale_1_to_2_s"] = time.perf_counter() - start
        print(f"scaled to 2 replicas in {results['scale_1_to_2_s']:.0f} s (new replica caught up)", file=sys.stderr)
        local_client.push_weights(policies[1], chunk_bytes=CHUNK)  # warm
        two, streamed, bare_s, single, tcp_s = [], [], [], [], []
        for r in range(rounds):
            quiet()
            two.append(client.push_weights(policies[r % 2], chunk_bytes=CHUNK))
            quiet()
            streamed.append(client.push_weights(policies[(r + 1) % 2], chunk_bytes=CHUNK, shared_memory=False, delta=False))
            quiet()
            start = time.perf_counter()
            bare.PushWeights(requests(weights, chunk_bytes=CHUNK))
            bare_s.append(time.perf_counter() - start)
            quiet()
            single.append(local_client.push_weights(policies[r % 2], chunk_bytes=CHUNK))
            quiet()
            tcp_s.append(tcp_send(tcp_port, payload))
            print(f"round {r + 1}: push to 2 replicas {two[-1].seconds:.2f} s ({nbytes / two[-1].seconds / 1e9:.3f} GB/s, "
                  f"{two[-1].shared_bytes / 1e6:.0f} MB through shared memory), streamed {streamed[-1].seconds:.2f} s, bare gRPC {bare_s[-1]:.2f} s, "
                  f"single-process push {single[-1].seconds:.2f} s, TCP {tcp_s[-1]:.3f} s; prepare+requantize "
                  f"{two[-1].requantize_s:.2f} s, apply {two[-1].apply_s * 1e3:.0f} ms, pause {two[-1].pause_ms:.0f} ms", file=sys.stderr)
        results["push_2_replicas_s"] = statistics.median(p.seconds for p in two)
        results["push_2_replicas_gbps"] = nbytes / results["push_2_replicas_s"] / 1e9
        results["bare_grpc_gbps"] = nbytes / statistics.median(bare_s) / 1e9
        results["stream_push_2_replicas_gbps"] = nbytes / statistics.median(p.seconds for p in streamed) / 1e9
        results["push_ratio_vs_bare_grpc"] = statistics.median(b / p.seconds for p, b in zip(streamed, bare_s))
        results["push_latency_ratio_2_vs_1"] = results["push_2_replicas_s"] / results["push_1_replica_s"]
        results["local_push_gbps"] = nbytes / statistics.median(p.seconds for p in single) / 1e9
        results["tcp_gbps"] = nbytes / statistics.median(tcp_s) / 1e9
        results["serve_push_ratio_vs_local"] = statistics.median(s.seconds / p.seconds for p, s in zip(two, single))
        results["serve_push_ratio_vs_tcp"] = statistics.median(t / p.seconds for p, t in zip(two, tcp_s))
        local_client.close()
        local.stop()
        time.sleep(1.5)
        results["serve_2_replicas_tok_s"] = tokens_per_s(address, **load)
        client.close()

        # int8 replicas (the ingress requantizes each tensor once, as it arrives, for both) beside
        # a single-process int8 server (which requantizes as it arrives too).
        address = deploy(config.model_copy(update={"replicas": 2, "quantization": "int8"})).endpoints.remote().result()["grpc"]
        local = ServerProcess.start(model, CACHE / "serve-bench-local-int8.log", "--backend", "local", "--max-model-len", "256",
                                    "--no-http", "--cache-dir", str(CACHE / "rollout"), "--quantization", "int8")
        with RolloutClient(address, timeout=600) as client, RolloutClient(local.grpc_address, timeout=600) as local_client:
            client.push_weights(policies[1], chunk_bytes=CHUNK)  # warm
            local_client.push_weights(policies[1], chunk_bytes=CHUNK)
            two8, single8 = [], []
            for r in range(rounds):
                quiet()
                two8.append(client.push_weights(policies[r % 2], chunk_bytes=CHUNK))
                quiet()
                single8.append(local_client.push_weights(policies[r % 2], chunk_bytes=CHUNK))
                print(f"int8 round {r + 1}: push to 2 replicas {two8[-1].seconds:.2f} s (requantize+prepare "
                      f"{two8[-1].requantize_s:.2f} s), single-process {single8[-1].seconds:.2f} s", file=sys.stderr)
        results["int8_push_2_replicas_gbps"] = nbytes / statistics.median(p.seconds for p in two8) / 1e9
        results["int8_local_push_gbps"] = nbytes / statistics.median(p.seconds for p in single8) / 1e9
        results["int8_serve_push_ratio_vs_local"] = statistics.median(s.seconds / p.seconds for p, s in zip(two8, single8))
    finally:
        local.stop()
        ray.shutdown()
        bare_proc.kill()
        tcp_proc.kill()
    print(
        f"serve/local tokens/s {results['serve_tok_ratio']:.3f} (target >= 0.95); push to 2 replicas "
        f"{results['push_2_replicas_gbps']:.3f} GB/s, streamed {results['push_ratio_vs_bare_grpc']:.2f} x bare gRPC (target >= 0.7); "
        f"push latency 1 replica {results['push_1_replica_s']:.2f} s, 2 replicas {results['push_2_replicas_s']:.2f} s; "
        f"2 replicas / single-process push {results['serve_push_ratio_vs_local']:.2f} (target >= 0.8), / TCP "
        f"{results['serve_push_ratio_vs_tcp']:.3f}; int8: 2 replicas / single-process push "
        f"{results['int8_serve_push_ratio_vs_local']:.2f}",
        file=sys.stderr,
    )
    if args.json:
        emit(results)


if __name__ == "__main__":
    main()
