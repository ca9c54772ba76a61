"""Fault points: named places where a test makes this process crash or fail, to see what that leaves.

    fault_point("store.commit.after_manifest")

is a cheap check (one environment lookup) unless a test armed it, as TiKV's `fail_point!` is: the
environment variable ROLLOUT_FAULT_FILE names a file holding one armed point, as a line

    NAME            kill: SIGKILL this process there (no cleanup, no flush: a crash)
    NAME MESSAGE    fail: raise EngineUnavailable(MESSAGE) there, as a replica that cannot serve would

The first process of the service that reaches the point deletes the file, then fires. Deleting it
first makes a point one-shot, so a process restarted with the same environment (Ray Serve
restarting a killed ingress) does not fire again, and of several replicas exactly one fails. Points
in the code:

    store.commit.after_adopt      a push's shards moved into the store, nothing of its version written
    store.commit.after_manifest   the version's manifest written and synced, CURRENT not yet
    store.commit.after_current    CURRENT names the new version (the commit point passed)
    store.collect                 between two deletions of old versions (after a commit, or at start)
    replica.prepare               a replica taking a push into its staging (serve/replica.py)
    replica.apply                 a replica loading a prepared push into its engine
"""

from __future__ import annotations

import os
import signal

from rollout_service.errors import EngineUnavailable

ENV = "ROLLOUT_FAULT_FILE"


def fault_point(name: str) -> None:
    """Fire here if a test armed `name` (see the module docstring); else nothing."""
    path = os.environ.get(ENV)
    if path:
        _fire(path, name)


def _fire(path: str, name: str) -> None:
    try:
        with open(path) as fh:
            armed, _, message = fh.read().strip().partition(" ")
        if armed != name:
            return
        os.remove(path)  # consumed: only one process fires, and only once
    except FileNotFoundError:  # not armed, or another process fired it first
        return
    if message:
        raise EngineUnavailable(message)
    os.kill(os.getpid(), signal.SIGKILL)


def arm(path: os.PathLike, name: str, fail: str | None = None) -> None:
    """Arm fault point `name` for the processes whose ROLLOUT_FAULT_FILE is `path` (tests): kill
    the first process that reaches it, or with `fail`, make it raise that message."""
    if fail is not None and not fail.strip():
        raise ValueError("fail= needs a message (an empty one would arm a kill)")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(name if fail is None else f"{name} {fail}")
    os.replace(tmp, path)  # a process checking meanwhile reads the whole line or no file
