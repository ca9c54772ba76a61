"""Start the real `rollout-service serve` as a child process and wait for its ready line.

Used by the demo, the benchmarks and the tests, which all want the server exactly as users run it.
Each server so started gets a weight store of its own, deleted when it stops, unless the arguments
name one (`--weights-dir`): several may run side by side on one model, and none resumes on the
versions an earlier run pushed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
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
    own_store: Path | None = None  # deleted at stop

    @classmethod
    def start(cls, model: Path, log_path: Path, *args: str) -> ServerProcess:
        """Run `serve --model MODEL --port 0 --http-port 0 ARGS`, logging to `log_path`."""
        own_store = None
        if not any(a == "--weights-dir" or a.startswith("--weights-dir=") for a in args):
            own_store = Path(tempfile.mkdtemp(prefix="rollout-weights-"))
            args = (*args, "--weights-dir", str(own_store))
        cmd = [
            sys.executable, "-m", "rollout_service.cli", "serve", "--model", str(model),
            "--port", "0", "--http-port", "0", *args,
        ]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            text = log_path.read_text()
            if m := READY.search(text):
                host, port, http = m.group(1), m.group(2), m.group(3)
                return cls(proc, log_path, f"{host}:{port}", None if http == "off" else f"http://{http}", own_store)
            if proc.poll() is not None:
                _remove(own_store)
                raise RuntimeError(f"server exited with {proc.returncode} before ready:\n{text[-4000:]}")
            time.sleep(0.5)
        proc.kill()
        _remove(own_store)
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
        _remove(self.own_store)
        return self.proc.returncode


def _remove(store: Path | None) -> None:
    if store is not None:
        shutil.rmtree(store, ignore_errors=True)


def start_side_by_side(stack: ExitStack, starts: dict[str, Callable[[], ServerProcess]]) -> dict[str, ServerProcess]:
    """Run each start (e.g. a bf16 and an int8 server) in parallel; every server that started is
    stopped when `stack` closes, even if another failed to start (whose error is then raised)."""
    with ThreadPoolExecutor(len(starts)) as pool:
        futures = {key: pool.submit(start) for key, start in starts.items()}
    for future in futures.values():
        if future.exception() is None:
            stack.callback(future.result().stop)
    return {key: future.result() for key, future in futures.items()}
