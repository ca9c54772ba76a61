"""Calls through Serve handles. Exceptions coming back through Serve are wrapped in RayTaskError
(message: a remote traceback); the front ends want the replica's own exception, to map it in
errors.py and show its message."""

from __future__ import annotations

from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import DeploymentUnavailableError

from rollout_service.errors import EngineUnavailable


class ApplyFailed(EngineUnavailable):
    """A replica could not load a committed version; it names itself so the push can say which
    replicas are catching up (they load the version from the weight store)."""

    def __init__(self, replica_id: str, message: str):
        super().__init__(message)
        self.replica_id = replica_id

    def __reduce__(self):  # pickled through Ray with both arguments
        return ApplyFailed, (self.replica_id, str(self))


def unwrap(exc: BaseException) -> BaseException:
    while isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    if isinstance(exc, RayActorError):  # the replica's process died during the call (killed, OOM)
        return EngineUnavailable(
            f"an engine replica died during the call ({type(exc).__name__}); Serve replaces it: retry the call"
        )
    return exc


async def broadcast(handle, method: str, *args) -> list:
    """`method(*args)` on every live replica; results and (unwrapped) exceptions, one per replica.
    No replica at all (none started yet, autoscaled to zero) is an empty list."""
    try:
        results = await handle.broadcast(method, *args).results_async(return_exceptions=True)
    except DeploymentUnavailableError:
        return []
    return [unwrap(r) if isinstance(r, BaseException) else r for r in results]


async def broadcast_all(handle, method: str, *args) -> list:
    """`method(*args)` on every live replica; their results, or the first replica's exception."""
    results = await broadcast(handle, method, *args)
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return results
