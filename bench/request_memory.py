"""Memory a Generate request costs the server, against its size on the wire.

Sends the largest Generate the default limits allow (max_prompts_per_call prompts of a full
context's tokens, within max_request_mib) to a single-process server, over gRPC and as
/v1/generate JSON, and samples the server process's RSS (the front end, where the request is
parsed and waits for room in the engine) every 10 ms until the call's deadline ends it:

  grpc_ratio / http_ratio    the peak RSS increase / the request's wire size (aim: <= 3)
  *_wire_mib, *_peak_mib     the two figures
  *_engine_peak_mib          the engine process's RSS increase (the prompts let in: at most
                             max_inflight_sequences of them)

Each transport is measured on a fresh server (memory the first call freed would make a second
look cheaper than it is).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import CACHE, emit, machine, quiet, tiny_model  # noqa: E402

CONTEXT = 256


class PeakRss:
    """The peak RSS of a process above its RSS when started, sampled every 10 ms in a thread."""

    def __init__(self, pid: int):
        import psutil

        self._proc = psutil.Process(pid)
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def stop(self) -> float:
        """The peak increase, MiB."""
        self._stop.set()
        self._thread.join()
        return (self.peak - self.base) / 2**20


def prompts(count: int) -> list[list[int]]:
    # Ids spread over the vocabulary (2-byte varints on the wire, as most real token ids are).
    return [[(i * 31 + j * 7) % 1900 + 100 for j in range(CONTEXT - 1)] for i in range(count)]


def measure(server, send, wire: int) -> tuple[float, float]:
    """(peak front-end MiB, peak engine MiB) of one call that `send` makes."""
    import psutil

    quiet()
    front = PeakRss(server.proc.pid)
    engines = [PeakRss(p.pid) for p in psutil.Process(server.proc.pid).children(recursive=True)]
    try:
        send()
    except Exception as exc:  # the deadline ends the call: only its memory is measured
        print(f"  call ended: {type(exc).__name__}: {str(exc)[:100]}", file=sys.stderr)
    peak = front.stop()
    engine = max((e.stop() for e in engines), default=0.0)
    print(f"  wire {wire / 2**20:.1f} MiB, front end +{peak:.0f} MiB ({peak * 2**20 / wire:.2f}x), "
          f"engine +{engine:.0f} MiB", file=sys.stderr)
    return peak, engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="an eighth of the largest request")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    parser.add_argument("--server-args", default="", help="more `serve` options, e.g. \"--max-inflight-sequences 16\"")
    args = parser.parse_args()

    import httpx
    from rollout_client import RolloutClient
    from rollout_client.client import build_request

    from rollout_service.config import ServerConfig
    from rollout_service.launcher import ServerProcess

    defaults = ServerConfig(model=tiny_model())
    count = defaults.max_prompts_per_call // (8 if args.quick else 1)
    batch = prompts(count)
    grpc_wire = build_request(None, batch, "", {"max_tokens": 1}, "").ByteSize()
    limit = defaults.max_request_mib * 2**20
    # JSON spends about 5 bytes a token: as many prompts as fit in max_request_mib.
    body = lambda n: ('{"prompts": [' + ",".join('{"token_ids": [%s]}' % ",".join(map(str, p)) for p in batch[:n])  # noqa: E731
                      + '], "sampling": {"max_tokens": 1}}').encode()
    http_count = min(count, int(count * limit / len(body(count)) * 0.98))
    http_body = body(http_count)
    assert grpc_wire <= limit and len(http_body) <= limit
    results = {"machine": machine(), "prompts_grpc": count, "prompts_http": http_count, "tokens_per_prompt": CONTEXT - 1,
               "max_request_mib": defaults.max_request_mib, "quick": args.quick}
    print(f"{count} prompts x {CONTEXT - 1} tokens; {machine()}", file=sys.stderr)
    # A fresh server for each transport: memory freed by the first call would be reused by the
    # second, which would then look cheaper than it is.
    for transport in ("grpc", "http"):
        log = Path(tempfile.mkdtemp(prefix="request-memory-", dir=CACHE)) / "server.log"
        server = ServerProcess.start(tiny_model(), log, "--backend", "local", "--max-model-len", str(CONTEXT), *args.server_args.split())
        try:
            with RolloutClient(server.grpc_address, timeout=60) as client:
                client.generate(prompt_token_ids=batch[:4], max_tokens=1)  # warm: first calls compile
                if transport == "grpc":
                    print("gRPC Generate:", file=sys.stderr)
                    send, wire = lambda: client.generate(prompt_token_ids=batch, max_tokens=1, timeout=20), grpc_wire
                else:
                    print("HTTP /v1/generate:", file=sys.stderr)
                    send = lambda: httpx.post(f"{server.http_url}/v1/generate", content=http_body, timeout=20,  # noqa: E731
                                              headers={"content-type": "application/json", "x-request-timeout": "20"}).raise_for_status()
                    wire = len(http_body)
                peak, engine = measure(server, send, wire)
                results |= {f"{transport}_wire_mib": wire / 2**20, f"{transport}_peak_mib": peak,
                            f"{transport}_ratio": peak * 2**20 / wire, f"{transport}_engine_peak_mib": engine}
                assert client.generate(prompt_token_ids=batch[:2], max_tokens=1)  # still serving
        finally:
            server.stop()
    print(f"peak RSS / wire size: gRPC {results['grpc_ratio']:.2f}x ({results['grpc_wire_mib']:.0f} MiB), "
          f"HTTP {results['http_ratio']:.2f}x ({results['http_wire_mib']:.0f} MiB)")
    if args.json:
        emit(results)


if __name__ == "__main__":
    main()
