"""The engine replicas as the push protocol (serve/push.py) and the backend (serve/backend.py) see
them: a set to broadcast a method to, and a Generate streamed from one of them. Two adapters:
`InProcess`, one EngineReplica in this process (`--backend local`: no Ray), and serve/handle.py's
`ServeReplicas`, a Ray Serve DeploymentHandle. Everything above them is the same code for both.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

from rollout_service.errors import EngineUnavailable
from rollout_service.types import Completion


class ApplyFailed(EngineUnavailable):
    """A replica could not load a committed version; it names itself so the push can say which
    replicas are catching up (they load the version from the weight store)."""

    def __init__(self, replica_id: str, message: str):
        super().__init__(message)
        self.replica_id = replica_id

    def __reduce__(self):  # pickled through Ray with both arguments
        return ApplyFailed, (self.replica_id, str(self))


class ReplicaStream(Protocol):
    """Completions of one replica's `generate_stream`; `aclose()` aborts what is still running."""

    def __aiter__(self) -> AsyncIterator[Completion]: ...

    async def aclose(self) -> None: ...


class Replicas(Protocol):
    async def broadcast(self, method: str, *args: Any) -> list:
        """`method(*args)` on every live replica: its result or the exception it raised, one per
        replica. No replica at all (none started yet, autoscaled to zero) is an empty list."""

    def generate(self, *args: Any) -> ReplicaStream:
        """`generate_stream(*args)` on the one replica the router picks (serve/routing.py)."""

    async def call_one(self, method: str, *args: Any) -> Any:
        """`method(*args)` on any one replica; its result, or the exception it raised."""

    async def locate(self) -> None:
        """Before a push: find where the replicas run, so that `share` hands a part to a replica
        on another machine only when there is one."""

    def share(self, part: Path) -> Any:
        """The file `part` (a push's part, serve/fanout.py) as every replica can take it
        (EngineReplica.take): any thread may call it."""


async def broadcast_all(replicas: Replicas, method: str, *args: Any) -> list:
    """`method(*args)` on every live replica; their results, or the first replica's exception."""
    results = await replicas.broadcast(method, *args)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return results


class InProcess:
    """The replica set of the single-process server: one EngineReplica, called directly."""

    def __init__(self, replica):
        self.replica = replica

    async def broadcast(self, method: str, *args: Any) -> list:
        try:
            return [await getattr(self.replica, method)(*args)]
        except Exception as exc:  # noqa: BLE001 -- returned, as Serve's broadcast returns it
            return [exc]

    def generate(self, *args: Any) -> ReplicaStream:
        return self.replica.generate_stream(*args)  # an async generator: aclose() aborts it

    async def call_one(self, method: str, *args: Any) -> Any:
        return await getattr(self.replica, method)(*args)

    async def locate(self) -> None:
        pass  # the replica is in this process

    def share(self, part: Path) -> Path:
        return part  # the replica's staging is on this machine: it links the file
