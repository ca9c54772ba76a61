"""The short version of examples/grpo_toy.py: GRPO through the service must raise the reward."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "grpo_toy.py"


def test_grpo_through_the_service_raises_the_reward(trainer_server, tiny_model, tmp_path):
    cmd = [
        sys.executable, str(SCRIPT), "--address", trainer_server.grpc_address, "--model", str(tiny_model),
        "--runs", "bf16+tis", "--steps", "6", "--lr", "1e-3", "--seed", "0", "--out", str(tmp_path), "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])["runs"]["bf16+tis"]
    assert result["steps"] == 6
    assert result["final_reward"] > result["first_reward"] + 0.2, result
    assert (tmp_path / "grpo_toy.png").stat().st_size > 10_000
    rows = (tmp_path / "grpo_toy.csv").read_text().splitlines()
    assert rows[0].startswith("run,step,reward") and len(rows) == 7
