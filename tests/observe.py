"""Waiting by observation, and generation held still, so that engine tests need no sleeps and no
assumption about how fast the machine generates: on a fast CPU a "long" generation can end in
a tenth of the time it takes on a slow one."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import httpx

from rollout_service.launcher import ServerProcess


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds (a bound on a
    hang, not a figure the test depends on)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# One connection pool: a new httpx client per call spends 0.1-1 s setting up TLS contexts on a busy
# 2-core machine, which would delay the pause it carries.
_http = httpx.Client(timeout=60)


@contextlib.contextmanager
def held(server: ServerProcess, mode: str = "continue", stepped: bool = False) -> Iterator[None]:
    """Generation on `server` (started with --debug-endpoints) is held inside the block: new
    requests are admitted and wait in the engine, running samples stay frozen where they are
    (mode "continue"); all resume when the block ends. stepped: generation runs (resumed if
    held) until every request in the engine has generated a token, then is held; decided in
    the server, not a client round trip later."""
    _pause(server, mode, stepped)
    try:
        yield
    finally:
        _http.post(f"{server.http_url}/v1/debug/resume").raise_for_status()


def step(server: ServerProcess) -> None:
    """Inside held(server): run generation until every request in the engine has generated a
    token (at least one engine step), then hold it again."""
    _pause(server, "continue", stepped=True)


def _pause(server: ServerProcess, mode: str, stepped: bool) -> None:
    params = {"mode": mode, "stepped": str(stepped).lower()}
    _http.post(f"{server.http_url}/v1/debug/pause", params=params).raise_for_status()


class InBackground:
    """`call()` on a thread; `outcome()` joins it and returns its result or raises its error."""

    def __init__(self, call: Callable[[], object]):
        self._box: dict[str, object] = {}
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], object]) -> None:
        try:
            self._box["result"] = call()
        except BaseException as exc:  # handed to the test thread by outcome()
            self._box["error"] = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def outcome(self, timeout: float = 300.0) -> object:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the background call did not end within {timeout} s"
        if "error" in self._box:
            raise self._box["error"]  # type: ignore[misc]
        return self._box["result"]
