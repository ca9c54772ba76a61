"""Fault points: named places where a test can kill this process, to see what a crash there leaves.

    fault_point("store.commit.after_manifest")

is a cheap check (one environment lookup) unless a test armed it: the environment variable
ROLLOUT_FAULT_FILE names a file whose content is the name of one fault point. The first process of
the service that reaches that point deletes the file and kills itself with SIGKILL (no cleanup, no
flush: a crash). Deleting the file first makes it one-shot, so a process restarted with the same
environment (Ray Serve restarting a killed ingress) does not fire again. Points in the code:

    store.commit.after_adopt      a push's shards moved into the store, nothing of its version written
    store.commit.after_manifest   the version's manifest written and synced, CURRENT not yet
    store.commit.after_current    CURRENT names the new version (the commit point passed)
    store.collect                 between two deletions of old versions (after a commit, or at start)
"""

from __future__ import annotations

import os
import signal

ENV = "ROLLOUT_FAULT_FILE"


def fault_point(name: str) -> None:
    """SIGKILL this process here if a test armed `name` (see the module docstring)."""
    path = os.environ.get(ENV)
    if path:
        _fire(path, name)


def _fire(path: str, name: str) -> None:
    try:
        with open(path) as fh:
            if fh.read().strip() != name:
                return
        os.remove(path)  # consumed: only one process fires, and only once
    except FileNotFoundError:  # not armed, or another process fired it first
        return
    os.kill(os.getpid(), signal.SIGKILL)


def arm(path: os.PathLike, name: str) -> None:
    """Arm fault point `name` for the processes whose ROLLOUT_FAULT_FILE is `path` (tests)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(name)
    os.replace(tmp, path)  # a process checking meanwhile reads the whole name or no file
