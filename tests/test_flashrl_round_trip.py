"""profile -> setup -> serve --config on the tiny model in int8, as a FlashRL user would: the
quantized checkpoint is served as it is, pushed bf16 weights are requantized by its recipe; and
FLASHRL_CONFIG / bad inputs reach `serve` as documented."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from rollout_service.launcher import ServerProcess
from rollout_service.quant.checkpoint import quantize_checkpoint
from rollout_service.quant.recipe import Recipe
from tests.conftest import MAX_MODEL_LEN
from tests.weights.conftest import greedy, perturb

CLI = [sys.executable, "-m", "rollout_service.cli"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def quantized(tiny_model, tmp_path_factory):
    """An int8 compressed-tensors checkpoint of the tiny model (as llm-compressor's RTN writes)."""
    return quantize_checkpoint(tiny_model, tmp_path_factory.mktemp("qm") / "tiny-int8", Recipe("int8"))


@pytest.fixture(scope="module")
def config_file(tiny_model, quantized, tmp_path_factory):
    work = tmp_path_factory.mktemp("flashrl")
    done = _cli("profile", "-m", str(tiny_model), "-qm", str(quantized), "-o", str(work / "profile.pt"))
    assert done.returncode == 0, done.stderr
    assert "reproduces 28/28 quantized parameters bit for bit" in done.stderr
    done = _cli("setup", "-m", str(quantized), "-p", str(work / "profile.pt"), "-o", str(work / "config.yaml"),
                "--max-model-len", str(MAX_MODEL_LEN))
    assert done.returncode == 0, done.stderr
    return work / "config.yaml"


def test_setup_writes_the_settings_serve_needs(config_file, quantized):
    settings = yaml.safe_load(config_file.read_text())
    assert settings["model"] == str(quantized.resolve()) and settings["quantization"] == "int8"
    assert settings["profile"].endswith("profile.pt") and settings["max_model_len"] == MAX_MODEL_LEN


@pytest.mark.engine
def test_the_configured_server_serves_the_checkpoint_and_requantizes_pushes_by_its_profile(
    request, config_file, quantized, tiny_model, int8_server, tmp_path_factory
):
    from rollout_client import RolloutClient

    log = tmp_path_factory.mktemp("logs") / "flashrl.log"
    server = ServerProcess.start(quantized, log, "--backend", "local", "--no-http", "--config", str(config_file))
    request.addfinalizer(server.stop)
    w0 = load_file(tiny_model / "model.safetensors")
    with RolloutClient(server.grpc_address, timeout=120) as client, RolloutClient(int8_server.grpc_address, timeout=120) as ref:
        status = client.status()
        assert status.quantization == "int8" and status.model == str(quantized.resolve())
        at_load = greedy(ref)  # the bf16 checkpoint quantized at load with the default recipe
        assert greedy(client) == at_load
        result = client.push_weights(perturb(w0, seed=3), progress=False)
        assert result.version == 1 and result.requantize_s > 0
        assert greedy(client) != at_load
        client.push_weights(w0, progress=False)
        assert greedy(client) == at_load  # requantizing W0 by the profile gives the checkpoint's tensors


def test_serve_reports_bad_flashrl_settings_and_files_clearly(tiny_model, quantized, tmp_path):
    done = _cli("serve", "--model", str(tiny_model), "--backend", "local", env={"FLASHRL_CONFIG": "int4"})
    assert done.returncode == 2 and "FLASHRL_CONFIG='int4' is neither" in done.stderr
    # FLASHRL_CONFIG=fp8 reaches the server as quantization=fp8, which a CPU refuses by name.
    done = _cli("serve", "--model", str(tiny_model), "--backend", "local", "--port", "0", "--no-http",
                env={"FLASHRL_CONFIG": "fp8"})
    assert done.returncode == 2 and "quantization='fp8' needs a GPU" in done.stderr
    done = _cli("serve", "--backend", "local")
    assert done.returncode == 2 and "--model is required" in done.stderr
    done = _cli("serve", "--model", str(quantized), "--backend", "local", "--port", "0", "--no-http")
    assert done.returncode == 2 and "is a quantized checkpoint" in done.stderr
    done = _cli("setup", "-m", str(quantized), "-p", str(tmp_path / "none.pt"))
    assert done.returncode == 2 and "does not exist" in done.stderr
    done = _cli("profile", "-m", str(tiny_model), "-o", str(tmp_path / "p.pt"), "--fn", "int4")
    assert done.returncode == 2 and "--fn 'int4' is not one of" in done.stderr
