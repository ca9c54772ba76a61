"""`pip install ./clients/python` into an empty virtualenv brings grpcio, protobuf and numpy only,
and the client imports (and computes TIS weights) without torch or the server package."""

from __future__ import annotations

import shutil
import subprocess
import venv
from pathlib import Path

CLIENT = Path(__file__).resolve().parents[2] / "clients" / "python"


def test_the_client_installs_alone_and_needs_no_torch(tmp_path):
    source = shutil.copytree(CLIENT, tmp_path / "client", ignore=shutil.ignore_patterns("build", "*.egg-info"))
    venv.create(tmp_path / "env", with_pip=True)
    python = tmp_path / "env" / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", str(source)], check=True, timeout=600)
    listed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True, check=True)
    names = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert {"grpcio", "protobuf", "numpy", "rollout-client"} <= names
    assert not names & {"torch", "rollout-service", "vllm", "ray", "tqdm"}
    code = (
        "import sys, numpy as np; from rollout_client import RolloutClient, tis_weights; "
        "RolloutClient('localhost:1').close(); "
        "print(float(tis_weights(np.zeros(1, np.float32), np.zeros(1, np.float32))[0]), 'torch' in sys.modules)"
    )
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.split() == ["1.0", "False"]
