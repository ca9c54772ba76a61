"""What a call (calls.py) asks of its client: the steps that need the network or the clock.

A call is a generator. It yields a step, and gets back at that `yield` the step's reply, or the
exception the step raised, thrown in there, so the call's own `try` handles it as if it had made
the RPC itself. RolloutClient carries each step out blocking and AsyncRolloutClient awaits it
(client.py); `advance` is how both move a call on. The steps are plain data: which RPC, which
request, which deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from rollout_client.push import SourceErrors

T = TypeVar("T")

# The frames between a call's generator and whoever called the client's method: `advance`, the
# client's runner and the method. A warning raised inside a call adds them to its stacklevel to name
# the line it named when each client had a copy of the call of its own.
RUNNER_FRAMES = 3


@dataclass(frozen=True)
class Rpc:
    """A unary RPC by name ("Generate", "GetStatus"). Reply: its response; raises the typed error
    (errors.from_rpc_error)."""

    method: str
    request: Message
    timeout: float | None  # None: the client's default deadline


@dataclass(frozen=True)
class Push:
    """PushWeights, its requests drawn from `source` on gRPC's thread. Reply: the
    PushWeightsResponse; raises the request stream's own error where it raised one (the caller's
    generator, a tensor's dtype: gRPC reports those only as a cancelled call), else the typed error."""

    source: SourceErrors
    timeout: float | None


@dataclass(frozen=True)
class StopStream:
    """Wait until gRPC's thread no longer draws `source` (a failed push's): only then may the call
    take the caller's tensors again or clear the delta base. The asyncio client waits on a worker
    thread and lets the wait finish even when its task is cancelled."""

    source: SourceErrors


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Rpc | Push | StopStream | Sleep
# A call that returns T.
Steps = Generator[Step, Any, T]


@dataclass(frozen=True)
class Stream(Generic[T]):
    """A server-streaming RPC, what a streaming call returns (it has no steps of its own): the client
    yields each response `parse`d into items, raises the typed error, and cancels the RPC when its
    caller stops reading early (the server then aborts the prompts still running)."""

    method: str
    request: Message
    timeout: float | None
    parse: Callable[[Any], Iterable[T]]


@dataclass(frozen=True)
class Done(Generic[T]):
    result: T


def advance(steps: Steps[T], reply: Any = None, error: BaseException | None = None) -> Step | Done[T]:
    """The call's next step after the last one's `reply`, or after the `error` it raised (thrown in
    at its yield); Done with the call's result when it returns. What the call raises goes through."""
    try:
        return steps.send(reply) if error is None else steps.throw(error)
    except StopIteration as done:
        return Done(done.value)
