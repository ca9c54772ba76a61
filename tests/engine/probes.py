"""Runs reload_probe.py in a child process and reads its result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_reload_probe(w0: Path, w1: Path) -> dict:
    """Reload W0, W1, W0 through our route and W1 through vLLM's into an engine started from W0."""
    probe = Path(__file__).with_name("reload_probe.py")
    run = subprocess.run(
        [sys.executable, str(probe), str(w0), str(w1)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def vllms_route(result: dict) -> str:
    """What vLLM's own reload gave, in words."""
    if result["vllm_nan"]:
        return "gives NaN"
    if result["vllm_equal_ours"]:
        return "gives exactly our result"
    return f"differs from our (exact) result by up to {result['vllm_max_abs_diff']:.3g} in logprob"
