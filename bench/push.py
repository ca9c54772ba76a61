"""PushWeights throughput against its physical references, measured side by side in one run.

For the same bytes (a bench model's bf16 state_dict), interleaved round by round:
  push       client.push_weights into a running `rollout-service serve` (bf16 engine): receive,
             check, convert, stage, apply, version flip -- the whole service path, on the client's
             default path (on one host: the tensors handed over in shared memory);
  streamed   the same push with shared_memory=False: every byte through the gRPC stream, as from
             another host;
  bare gRPC  the same client stream (same messages, same chunk size) into a gRPC server in its
             own process that only counts bytes: the cost of gRPC itself;
  TCP        the raw bytes over a loopback socket into a process that reads them: the physical
             reference.
Also: requantization GB/s per format (quant.quantize_weight over the model's linear weights),
the generation pause per push while a generate load runs (and the drain before it), the server's peak extra memory during
a push (RSS of the server and its engine processes), the same for a push the client cancels half
way and what is left after it (with the version unchanged), delta pushes along a real training run
(examples/grpo_toy.py's GRPO on the bench model, pushing with delta=True after every step, at lr 1e-6
and 1e-5: bytes on the wire / the model's bytes, and the push time beside the same run's pushed whole), and,
without --quick, push into an int8 server (requantize on arrival).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CACHE, emit, machine, quiet  # noqa: E402

CHUNK = 4 * 1024 * 1024


def bench_model(quick: bool) -> Path:
    from rollout_service.models.tiny import TinyModelSpec, make_tiny_model

    # The full model is over 0.5 GB (as the issue on the push data plane asks), the quick one ~50 MB.
    spec = TinyModelSpec(layers=4, hidden=512) if quick else TinyModelSpec(layers=8, hidden=2048, heads=16, kv_heads=4)
    path = CACHE / f"push-bench-{spec.layers}x{spec.hidden}"
    if not (path / "config.json").exists():
        make_tiny_model(path, spec)
    return path


# ---- references, each in its own process ---------------------------------------------------------


def _bare_grpc_server(port_queue) -> None:
    import asyncio

    import grpc
    from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
    from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

    class Counting(pb_grpc.RolloutServiceServicer):
        async def PushWeights(self, request_iterator, context):
            n = 0
            async for msg in request_iterator:
                if msg.HasField("chunk"):
                    n += len(msg.chunk.data)
            return pb.PushWeightsResponse(bytes_received=n)

    async def main():
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", 256 << 20)])
        pb_grpc.add_RolloutServiceServicer_to_server(Counting(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        port_queue.put(port)
        await server.wait_for_termination()

    asyncio.run(main())


def _tcp_sink(port_queue) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port_queue.put(srv.getsockname()[1])
        while True:
            conn, _ = srv.accept()
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            with conn:
                while conn.recv_into(view):
                    pass


def _start(target) -> tuple[mp.Process, int]:
    q = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=target, args=(q,), daemon=True)
    proc.start()
    return proc, q.get(timeout=60)


def tcp_send(port: int, payload: list[memoryview]) -> float:
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        for piece in payload:
            s.sendall(piece)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the sink closes once it has read everything
    return time.perf_counter() - start


# ---- measurements ---------------------------------------------------------------------------------


def requant_gbps(weights: dict, fmt: str) -> float:
    from rollout_service.quant import is_quantized_param, quantize_weight

    linear = [t for n, t in weights.items() if is_quantized_param(n, t.ndim)]
    start = time.perf_counter()
    for t in linear:
        quantize_weight(t, fmt)
    return sum(t.numel() * t.element_size() for t in linear) / (time.perf_counter() - start) / 1e9


class RssSampler:
    """Peak RSS of a process and its children, sampled every 10 ms."""

    def __init__(self, pid: int):
        import psutil

        self._proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss(self) -> int:
        procs = [self._proc, *self._proc.children(recursive=True)]
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except Exception:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.01)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def cancelled_push(client, stub, weights: dict, pid: int) -> dict:
    """Push `weights` and cancel the call half way: the server's extra RSS at its peak and 3 s
    after the cancel (the staged half dropped), and whether the served version stayed."""
    from rollout_client.push import requests

    messages = list(requests(weights, chunk_bytes=CHUNK))
    half, never = threading.Event(), threading.Event()

    def stream():
        for i, message in enumerate(messages):
            if i == len(messages) // 2:
                half.set()
                never.wait(120)  # cancelled meanwhile
            yield message

    version = client.status().weight_version
    sampler = RssSampler(pid)
    base = sampler.rss()
    with sampler:
        call = stub.PushWeights.future(stream(), timeout=600)
        half.wait(120)
        time.sleep(0.5)  # the messages before the half reach the server
        call.cancel()
        never.set()
        time.sleep(3)
    after = sampler.rss()
    return {
        "cancelled_push_peak_extra_mb": (sampler.peak - base) / 1e6,
        "cancelled_push_after_extra_mb": (after - base) / 1e6,
        "cancelled_push_version_kept": client.status().weight_version == version,
    }


def delta_pushes(address: str, model: Path, steps: int) -> dict:
    """GRPO steps of examples/grpo_toy.py on the bench model, each pushed as a delta, at lr 1e-6
    and 1e-5, and the same run at 1e-6 pushed whole, side by side: per run the median over steps
    of wire bytes / model bytes and of the push's seconds (the push of the trainer's bf16 copy of
    its float32 weights, as grpo_toy makes it; the first push of a run, whole, is not a step)."""
    from examples.grpo_toy import Settings, train
    from rollout_client import RolloutClient

    out: dict = {}
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    for lr, delta, key in ((1e-6, True, "delta_%s"), (1e-6, False, "dense_%s"), (1e-5, True, "delta_%s_lr1e5")):
        with RolloutClient(address, timeout=600) as trainer:
            records = train(trainer, model, f"{'delta' if delta else 'dense'} lr {lr:g}", Settings(steps=steps, lr=lr, delta=delta), log)
            if delta:
                out["delta_client_base_mb"] = round(trainer.delta_base.nbytes / 1e6, 1)
        out[key % "wire_ratio"] = statistics.median(r.wire_ratio for r in records)
        out[key % "push_s"] = statistics.median(r.push_s for r in records)
    out["delta_speedup"] = out["dense_push_s"] / out["delta_push_s"]
    return out


def generate_load(address: str, stop: threading.Event) -> None:
    from rollout_client import RolloutClient

    with RolloutClient(address, timeout=120) as client:
        while not stop.is_set():
            client.generate(prompt_token_ids=[[5, 6, 7, 8]] * 8, max_tokens=16, temperature=1.0, ignore_eos=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a ~50 MB model, 2 rounds, no int8 server (about 3 minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--rounds", type=int, help="measured rounds per side (default 5; quick 2)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)

    import torch
    from safetensors.torch import load_file

    from rollout_client import RolloutClient
    from rollout_client.push import requests
    from rollout_service.launcher import ServerProcess

    model = bench_model(args.quick)
    weights = load_file(model / "model.safetensors")
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    print(f"bench model {model.name}: {len(weights)} tensors, {nbytes / 1e6:.0f} MB bf16; {machine()}", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    # Two policies that differ, so every push really changes the served weights.
    policies = [weights, {k: (v.float() + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in weights.items()}]
    payload = [memoryview(t.contiguous().view(torch.uint8).numpy()) for t in weights.values()]

    bare_proc, bare_port = _start(_bare_grpc_server)
    tcp_proc, tcp_port = _start(_tcp_sink)
    log = CACHE / "push-bench-server.log"
    server = ServerProcess.start(model, log, "--backend", "local", "--max-model-len", "256", "--no-http", "--cache-dir", str(CACHE / "rollout"))
    results: dict = {"model_mb": round(nbytes / 1e6, 1), "chunk_bytes": CHUNK, "rounds": rounds, "machine": machine()}
    try:
        import grpc
        from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

        client = RolloutClient(server.grpc_address, timeout=600)
        bare = pb_grpc.RolloutServiceStub(grpc.insecure_channel(f"127.0.0.1:{bare_port}", options=[("grpc.max_send_message_length", 256 << 20)]))
        client.push_weights(policies[1], chunk_bytes=CHUNK)  # warm both paths once
        bare.PushWeights(requests(weights, chunk_bytes=CHUNK))
        client.push_weights(policies[0], chunk_bytes=CHUNK, shared_memory=False, delta=False)
        push_s, stream_s, bare_s, tcp_s, extra_mb = [], [], [], [], []
        for r in range(rounds):
            quiet()
            sampler = RssSampler(server.proc.pid)
            base = sampler.rss()
            with sampler:
                result = client.push_weights(policies[r % 2], chunk_bytes=CHUNK)
            assert result.shared_bytes == nbytes, "the bench's client should see the server's shared memory"
            push_s.append(result.seconds)
            extra_mb.append((sampler.peak - base) / 1e6)
            quiet()
            stream_s.append(client.push_weights(policies[(r + 1) % 2], chunk_bytes=CHUNK, shared_memory=False, delta=False).seconds)
            quiet()
            start = time.perf_counter()
            bare.PushWeights(requests(weights, chunk_bytes=CHUNK))
            bare_s.append(time.perf_counter() - start)
            tcp_s.append(tcp_send(tcp_port, payload))
            print(f"round {r + 1}: push {nbytes / push_s[-1] / 1e9:.3f} GB/s (shared memory), streamed "
                  f"{nbytes / stream_s[-1] / 1e9:.3f}, bare gRPC {nbytes / bare_s[-1] / 1e9:.3f}, TCP {nbytes / tcp_s[-1] / 1e9:.2f}; "
                  f"apply {result.apply_s * 1e3:.0f} ms, peak extra {extra_mb[-1]:.0f} MB", file=sys.stderr)
        results["push_gbps"] = results["shm_push_gbps"] = nbytes / statistics.median(push_s) / 1e9
        results["stream_push_gbps"] = nbytes / statistics.median(stream_s) / 1e9
        results["bare_grpc_gbps"] = nbytes / statistics.median(bare_s) / 1e9
        results["tcp_gbps"] = nbytes / statistics.median(tcp_s) / 1e9
        # The streamed push beside the same stream into a server that only counts bytes.
        results["ratio_vs_bare_grpc"] = statistics.median(b / p for p, b in zip(stream_s, bare_s))
        results["ratio_vs_tcp"] = statistics.median(t / p for p, t in zip(push_s, tcp_s))
        results["stream_ratio_vs_tcp"] = statistics.median(t / p for p, t in zip(stream_s, tcp_s))
        results["shm_vs_stream"] = statistics.median(s / p for p, s in zip(push_s, stream_s))
        results["peak_extra_mb"] = max(extra_mb)
        results["apply_ms"] = result.apply_s * 1e3
        service = pb_grpc.RolloutServiceStub(grpc.insecure_channel(server.grpc_address, options=[("grpc.max_send_message_length", 256 << 20)]))
        results.update(cancelled_push(client, service, weights, server.proc.pid))

        # Pause per push while a generate load runs (the default drain policy).
        stop = threading.Event()
        load = [threading.Thread(target=generate_load, args=(server.grpc_address, stop)) for _ in range(2)]
        for t in load:
            t.start()
        time.sleep(2)
        pauses, applies, drains = [], [], []
        for r in range(rounds):
            res = client.push_weights(policies[r % 2], chunk_bytes=CHUNK)
            pauses.append(res.pause_ms)
            applies.append(res.apply_s * 1e3)
            drains.append(res.drain_ms)
        stop.set()
        for t in load:
            t.join()
        results["pause_ms"] = statistics.median(pauses)
        results["pause_apply_ms"] = statistics.median(applies)
        results["drain_ms"] = statistics.median(drains)
        print(f"under load: pause {[round(p) for p in pauses]} ms, of which apply {[round(a) for a in applies]} ms; "
              f"drain before it {[round(d) for d in drains]} ms", file=sys.stderr)
        client.close()
        results.update(delta_pushes(server.grpc_address, model, steps=3 if args.quick else 10))
    finally:
        server.stop()
        bare_proc.kill()
        tcp_proc.kill()

    results["requant_gbps"] = {fmt: requant_gbps(weights, fmt) for fmt in ("int8", "fp8", "fp8_channel")}
    if not args.quick:
        int8 = ServerProcess.start(model, CACHE / "push-bench-int8.log", "--backend", "local", "--max-model-len", "256", "--no-http",
                                   "--quantization", "int8", "--cache-dir", str(CACHE / "rollout"))
        try:
            with RolloutClient(int8.grpc_address, timeout=600) as c8:
                c8.push_weights(policies[1], chunk_bytes=CHUNK)
                secs = [c8.push_weights(policies[r % 2], chunk_bytes=CHUNK).seconds for r in range(rounds)]
            results["push_int8_gbps"] = nbytes / statistics.median(secs) / 1e9
        finally:
            int8.stop()
    for key, value in results.items():
        print(f"{key}: {value}", file=sys.stderr)
    if args.json:
        emit({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()} | {
            "requant_gbps": {k: round(v, 3) for k, v in results["requant_gbps"].items()}})


if __name__ == "__main__":
    main()
