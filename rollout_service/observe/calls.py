"""The call being served: its request id and the RPC or route it came by, for the metrics, log
lines and spans about it.

The front ends (api/grpc_server.py, api/http_app.py) set it as a call starts; anything below them
in the same asyncio task (or a task or thread started from it with its context) reads it with
`current()`. contextvars follow tasks, so two calls served at once never see each other's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import uuid
from collections.abc import Iterator
from contextvars import ContextVar

# A request id a caller sends is kept if it is at most MAX_REQUEST_ID of these characters (ids of
# uuids, ULIDs, "step-12/rollout-3", base64): no space, quote or bracket, so that an id cannot
# forge the rest of a text log line; else a new one. The Python client sends only such ids
# (rollout_client/client_base.py).
MAX_REQUEST_ID = 128
_USABLE = re.compile(r"[A-Za-z0-9._:/=+@-]+")


@dataclasses.dataclass(frozen=True)
class Call:
    request_id: str
    route: str  # "Generate", "PushWeights" (gRPC methods) or "POST /v1/completions" (HTTP routes)
    # The OpenTelemetry context of the call's span (observe/tracing.py), the parent of the spans
    # below it; None where the call is not traced. Held here rather than attached as OpenTelemetry's
    # current context: a replica's generator runs in its caller's task, between whose steps an
    # attached context would leak.
    trace: object | None = None


_CURRENT: ContextVar[Call | None] = ContextVar("rollout_call", default=None)


def current() -> Call | None:
    """The call this code runs for; None outside one (a background task, start-up)."""
    return _CURRENT.get()


def request_id(given: str | None) -> str:
    """The caller's request id where it is a usable one, else a new one."""
    if given and len(given) <= MAX_REQUEST_ID and _USABLE.fullmatch(given):
        return given
    return uuid.uuid4().hex


@contextlib.contextmanager
def serving(call: Call) -> Iterator[Call]:
    """`call` is current inside the block."""
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)
