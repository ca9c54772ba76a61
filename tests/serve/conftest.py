"""A real redis-server on a free port (tests never mock Redis), which a test may restart; and the
prompts and weights the Ray Serve tests compare replicas with."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load_file

from rollout_service.types import GenerateRequest


class RedisServer:
    def __init__(self, workdir: Path, password: str | None = None):
        self.workdir = workdir
        self.password = password
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # No persistence: a restart loses every key, the case the service has to recover from.
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), *(["--requirepass", self.password] if self.password else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis.from_url(self.url, password=self.password).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (make install installs it; Debian package redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


PROMPTS = [[(11 * i + 3 * j) % 2000 + 10 for j in range(10)] for i in range(3)]
# One prompt per request: outputs compared across replicas and calls need a fixed batch schedule
# (see tests/weights/conftest.py greedy()).
GREEDY = [
    GenerateRequest.model_validate(
        {"prompts": [{"token_ids": p}], "sampling": {"max_tokens": 10, "temperature": 0.0, "ignore_eos": True}}
    )
    for p in PROMPTS
]


def perturbed(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(torch.bfloat16) for k, v in base.items()}


@pytest.fixture(scope="module")
def base_weights(tiny_model):
    return load_file(tiny_model / "model.safetensors")
