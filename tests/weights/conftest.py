"""Fixtures for weight pushes: perturbed checkpoints, and push-target servers of their own (the
shared servers in tests/conftest.py must keep their weights)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import MAX_MODEL_LEN
from rollout_service.launcher import ServerProcess

PROMPTS = [[(11 * i + 3 * j) % 2000 + 10 for j in range(10)] for i in range(4)]
GREEDY = dict(max_tokens=12, temperature=0.0, ignore_eos=True)
LONG_CONTEXT = 1024  # bf16_target's max_model_len


def perturb(weights: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A different policy of the same shapes (as after an optimizer step, only larger)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in weights.items()}


def step(weights: dict[str, torch.Tensor], seed: int, scale: float = 3e-5) -> dict[str, torch.Tensor]:
    """One small optimizer step: a few percent of the bf16 values move, as between RL steps."""
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in weights.items()}


def write_checkpoint(like: Path, weights: dict[str, torch.Tensor], out: Path) -> Path:
    """A copy of checkpoint `like` (config, tokenizer) holding `weights`."""
    shutil.copytree(like, out)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


def greedy(client) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and logprobs of each prompt, one prompt per call, one call at a time.

    vLLM's CPU bf16/int8 kernels round differently with the batch shape (seen on AMX machines:
    the same weights gave -1.7706 or -1.7771 as prompts of one call landed in one scheduler step
    or in two), so outputs are only comparable across calls and servers under a fixed schedule:
    here, every sequence alone in its batch."""
    out = []
    for prompt in PROMPTS:
        sample = client.generate(prompt_token_ids=[prompt], **GREEDY)[0].samples[0]
        out.append((sample.token_ids, sample.logprobs.tolist()))
    return out


@pytest.fixture(scope="session")
def weights0(tiny_model) -> dict[str, torch.Tensor]:
    return load_file(tiny_model / "model.safetensors")


@pytest.fixture(scope="session")
def weights1(weights0) -> dict[str, torch.Tensor]:
    return perturb(weights0, seed=1)


@pytest.fixture(scope="session")
def model1(tiny_model, weights1, tmp_path_factory) -> Path:
    """The tiny model with perturbed weights W1."""
    return write_checkpoint(tiny_model, weights1, tmp_path_factory.mktemp("w1") / "model")


def start_server(
    request, model: Path, tmp_path_factory, name: str, *args: str, max_model_len: int = MAX_MODEL_LEN
) -> ServerProcess:
    """A server whose engine weights tests can read back (GET /v1/debug/engine-weights)."""
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    server = ServerProcess.start(model, log, "--backend", "local", "--max-model-len", str(max_model_len), "--debug-endpoints", *args)
    request.addfinalizer(server.stop)
    return server


def engine_weights(server: ServerProcess) -> dict[str, torch.Tensor]:
    """The engine's weights as it computes with them, read through the engine."""
    import httpx
    from safetensors.torch import load

    response = httpx.get(f"{server.http_url}/v1/debug/engine-weights", timeout=120)
    response.raise_for_status()
    return load(response.content)


@pytest.fixture(scope="package")
def bf16_target(request, tiny_model, tmp_path_factory) -> ServerProcess:
    """A bf16 server started from W0 that tests push into. A 1 MiB push buffer makes pushes of
    the tiny model wait for conversions, as large pushes do; a long context lets the in-flight
    tests run generations far longer than a push takes to land."""
    return start_server(request, tiny_model, tmp_path_factory, "bf16-target", "--push-buffer-mib", "1", max_model_len=LONG_CONTEXT)


@pytest.fixture(scope="package")
def bf16_target_client(bf16_target):
    from rollout_client import RolloutClient

    with RolloutClient(bf16_target.grpc_address, timeout=120) as client:
        yield client
