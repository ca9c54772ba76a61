"""Runs the TypeScript client's own tests (`npm test` in clients/typescript) against the shared
trainer server: a real vLLM engine behind the real gRPC service."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine
TS_DIR = Path(__file__).resolve().parents[2] / "clients" / "typescript"


def test_npm_test_passes_against_a_real_server(trainer_server, tiny_model):
    npm = shutil.which("npm")
    assert npm, "npm is missing: `make install` installs nodejs and npm"
    assert (TS_DIR / "node_modules").is_dir(), "run `make install` (npm ci in clients/typescript)"
    env = dict(os.environ, ROLLOUT_ADDRESS=trainer_server.grpc_address, ROLLOUT_MODEL=str(tiny_model),
               ROLLOUT_PYTHON=sys.executable)
    proc = subprocess.run([npm, "test"], cwd=TS_DIR, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "# fail 0" in out and "# pass 12" in out, out[-3000:]
