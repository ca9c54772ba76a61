"""The trainer packages the adapter tests need (verl, OpenRLHF): skipped where a developer has not
installed them, but in CI (`CI=true`, as CI systems set it) a package that does not import fails
the run. `pytest.importorskip` alone turned about 45 tests into skips whenever an import broke (a
dependency bump, a pin in clients/python/trainer-adapters.txt), and a green run hid it."""

from __future__ import annotations

import os
from types import ModuleType

import pytest

INSTALL_HINT = "make install puts it in .venv (clients/python/trainer-adapters.txt)"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def require_trainer(module: str) -> ModuleType:
    """Import `module` (e.g. "verl", "openrlhf"). Where it does not import: skip the caller's tests
    (its module, when called at module level), or in CI fail them with the import's error."""
    if not in_ci():
        return pytest.importorskip(module, reason=f"{module} does not import; {INSTALL_HINT}")
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:  # not just ImportError: a broken package raises what it raises
        error = f"{type(exc).__name__}: {exc}"
    # Outside the except: the report shows this message, not the import's traceback chained to it.
    # At module level this is a collection error, which stops the whole run.
    pytest.fail(f"CI=true and {module} does not import ({error}); {INSTALL_HINT}", pytrace=False)
