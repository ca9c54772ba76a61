"""Start the real `rollout-service serve` as a child process and wait for its ready line.

Used by the demo, the benchmarks and the tests, which all want the server exactly as users run it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

# The server logs this once it serves; the launcher reads the bound ports from that line.
READY_PREFIX = "rollout-service ready:"
READY = re.compile(re.escape(READY_PREFIX) + r" grpc=(\S+):(\d+) http=(\S+)")
START_TIMEOUT_S = 400


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    log_path: Path
    grpc_address: str
    http_url: str | None

    @classmethod
    def start(cls, model: Path, log_path: Path, *args: str, cwd: Path | None = None, env: dict | None = None) -> ServerProcess:
        """Run `serve --model MODEL --port 0 --http-port 0 ARGS`, logging to `log_path`; `cwd`:
        another checkout's code (Python and Ray's workers import from the working directory),
        `env`: its environment (default this process's)."""
        cmd = [
            sys.executable, "-m", "rollout_service.cli", "serve", "--model", str(model),
            "--port", "0", "--http-port", "0", *args,
        ]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = log_path.read_text()
            if m := READY.search(text):
                host, port, http = m.group(1), m.group(2), m.group(3)
                return cls(proc, log_path, f"{host}:{port}", None if http == "off" else f"http://{http}")
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before ready:\n{text[-4000:]}")
            time.sleep(0.5)
        proc.kill()
        raise TimeoutError(f"server not ready after {START_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")

    def stop(self) -> int:
        """SIGTERM, then wait for a graceful exit (kill after 60 s); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def start_side_by_side(stack: ExitStack, starts: dict[str, Callable[[], ServerProcess]]) -> dict[str, ServerProcess]:
    """Run each start (e.g. a bf16 and an int8 server) in parallel; every server that started is
    stopped when `stack` closes, even if another failed to start (whose error is then raised)."""
    with ThreadPoolExecutor(len(starts)) as pool:
        futures = {key: pool.submit(start) for key, start in starts.items()}
    for future in futures.values():
        if future.exception() is None:
            stack.callback(future.result().stop)
    return {key: future.result() for key, future in futures.items()}
