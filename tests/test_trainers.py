"""tests/trainers.py: a trainer package that does not import skips its tests on a developer's
machine and fails the run in CI, at collection (module level) as well as inside a test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainers import require_trainer

ROOT = Path(__file__).resolve().parents[1]
MISSING = "rollout_service_no_such_trainer"


def test_an_installed_trainer_package_is_returned_in_and_out_of_ci(monkeypatch):
    for ci in ("", "true"):
        monkeypatch.setenv("CI", ci)
        assert require_trainer("json").__name__ == "json"


def test_a_missing_trainer_package_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match=f"{MISSING} does not import"):
        require_trainer(MISSING)


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_a_missing_trainer_package_fails_in_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception, match=f"CI=true and {MISSING} does not import .ModuleNotFoundError"):
        require_trainer(MISSING)


def test_a_package_that_raises_something_else_on_import_fails_in_ci(monkeypatch, tmp_path):
    (tmp_path / "broken_trainer.py").write_text("raise RuntimeError('a pin that no longer fits')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="RuntimeError: a pin that no longer fits"):
        require_trainer("broken_trainer")


def _run_pytest(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    """A real pytest run of a module that requires a missing trainer package at import, as the
    verl and OpenRLHF test modules do, beside one that needs nothing."""
    (tmp_path / "test_other.py").write_text("def test_other():\n    pass\n")
    (tmp_path / "test_adapter.py").write_text(
        "from tests.trainers import require_trainer\n\n"
        f"require_trainer({MISSING!r})\n\n\n"
        "def test_adapter():\n    pass\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"} | {"PYTHONPATH": str(ROOT)}
    if ci is not None:
        env["CI"] = ci
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:locust", str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )


def test_a_run_in_ci_fails_where_a_trainer_module_would_have_been_skipped(tmp_path):
    local = _run_pytest(tmp_path, ci=None)
    assert local.returncode == 0 and "1 passed, 1 skipped" in local.stdout, local.stdout
    ci = _run_pytest(tmp_path, ci="true")
    assert ci.returncode != 0 and "1 error during collection" in ci.stdout and f"CI=true and {MISSING} does not import" in ci.stdout, ci.stdout
