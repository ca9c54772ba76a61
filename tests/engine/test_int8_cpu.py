"""The int8 CPU workaround (rollout_service/engine/int8_cpu.py): reloading an int8 model's own
checkpoint through our route leaves its outputs bitwise unchanged, on every CPU.

vLLM's own in-place reload of the same checkpoint gives NaN on some CPUs (AMD EPYC, AVX2 only,
2026-11-23) and not on others (Intel Xeon with AVX-512/VNNI/AMX, 2026-12-02): the breakage follows
the oneDNN path the CPU takes. That is recorded as a warning naming the CPU, never a failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from rollout_service.tools.machine import cpu

pytestmark = pytest.mark.engine


def test_our_int8_reload_is_exact_on_every_cpu(tiny_model, tmp_path, record_property):
    from rollout_service.quant.checkpoint import quantize_checkpoint
    from rollout_service.quant.recipe import Recipe

    checkpoint = quantize_checkpoint(tiny_model, tmp_path / "int8", Recipe("int8"))
    probe = Path(__file__).with_name("int8_reload_probe.py")
    run = subprocess.run(
        [sys.executable, str(probe), str(checkpoint)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert run.returncode == 0, run.stderr[-4000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    assert all(x == x for x in result["before"])  # finite before
    assert result["ours_equal"]
    vllm = "gives NaN" if result["vllm_reload_nan"] else "stays finite"
    record_property("vllm_int8_reload", vllm)
    warnings.warn(f"vLLM's own int8 reload_weights {vllm} on this CPU ({cpu()}); ours is exact", stacklevel=1)
