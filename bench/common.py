"""Shared pieces of the bench scripts: the cached tiny model and the one-JSON-line convention."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache"


# An idle vLLM engine busy-polls for 1 s after its last step, and a push's apply makes steps: timed
# transfers wait this long first, or they share the 2 cores with the engines the last push woke
# (measured: the push right after another ran 1.3-1.5x slower than the same push given quiet).
QUIET_S = 1.5


def quiet() -> None:
    """Wait until the engines the last transfer woke are idle again."""
    time.sleep(QUIET_S)


def tiny_model() -> Path:
    """The default tiny model, made once and cached in .cache/tiny-model."""
    from rollout_service.models.tiny import make_tiny_model

    path = CACHE / "tiny-model"
    if not (path / "config.json").exists():
        make_tiny_model(path)
    return path


def machine() -> str:
    from rollout_service.tools.machine import cpu

    return f"{cpu()}, {platform.machine()}, Python {platform.python_version()}"


def emit(result: dict) -> None:
    """The last line of stdout: one JSON object with the figures."""
    print(json.dumps(result, sort_keys=True))
