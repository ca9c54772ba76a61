"""Typed errors and the one table that maps them to gRPC status codes and HTTP statuses.

Core code raises these with messages naming the offending field, index or value; the API layers
call `grpc_status` / `http_status` and never decide codes themselves.
"""

from __future__ import annotations

import grpc


class RolloutError(Exception):
    """Base of every error the service reports to a client."""


class InvalidArgument(RolloutError):
    """A request field is out of range. `field` names it, e.g. 'prompts[2].token_ids[5]'."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class Overloaded(RolloutError):
    """The server is at its in-flight limit; the client should retry later."""


class DeadlineExceeded(RolloutError):
    """The call's deadline passed; its engine requests were aborted."""


class Cancelled(RolloutError):
    """The client went away; its engine requests were aborted."""


class EngineUnavailable(RolloutError):
    """The engine died or is not ready; the call may succeed on another replica."""


class DataLoss(RolloutError):
    """Pushed bytes are missing, beyond a tensor's declared size, or fail their checksum."""


class FailedPrecondition(RolloutError):
    """The request assumes a server state that does not hold (a stale expected_version)."""


class DeltaBaseUnavailable(FailedPrecondition):
    """A delta push's base is not what the server holds: a version no longer kept, or a tensor
    whose value there differs from the client's. The client pushes the whole tensors instead."""


class Conflict(RolloutError):
    """Another operation that excludes this one is in progress (a second push)."""


class ConfigError(RolloutError):
    """The server cannot start with the given settings."""


class Unauthenticated(RolloutError):
    """The call carries no API key, or one the server does not know."""


class PermissionDenied(RolloutError):
    """The caller's key is valid but its role may not do this."""


class NotFound(RolloutError):
    """The request names something the server does not have (a model name the OpenAI layer does not serve)."""


class TooLarge(RolloutError):
    """A request, body or push is larger than the server's configured limit (the message names it)."""


class StorageFull(RolloutError):
    """The disk holding the weight store or the staging has no space left for a push (refused)."""


class StorageUnavailable(RolloutError):
    """The weight store or the staging cannot be written (read-only, permissions, I/O error)."""


# The one table: error type -> (gRPC code, HTTP status). Order matters only for subclasses.
_TABLE: dict[type[BaseException], tuple[grpc.StatusCode, int]] = {
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, 400),
    Overloaded: (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    DeadlineExceeded: (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    Cancelled: (grpc.StatusCode.CANCELLED, 499),
    EngineUnavailable: (grpc.StatusCode.UNAVAILABLE, 503),
    DataLoss: (grpc.StatusCode.DATA_LOSS, 400),
    FailedPrecondition: (grpc.StatusCode.FAILED_PRECONDITION, 412),
    Conflict: (grpc.StatusCode.ABORTED, 409),
    ConfigError: (grpc.StatusCode.FAILED_PRECONDITION, 500),
    Unauthenticated: (grpc.StatusCode.UNAUTHENTICATED, 401),
    PermissionDenied: (grpc.StatusCode.PERMISSION_DENIED, 403),
    NotFound: (grpc.StatusCode.NOT_FOUND, 404),
    TooLarge: (grpc.StatusCode.RESOURCE_EXHAUSTED, 413),
    StorageFull: (grpc.StatusCode.RESOURCE_EXHAUSTED, 507),
    StorageUnavailable: (grpc.StatusCode.UNAVAILABLE, 503),
}
_INTERNAL = (grpc.StatusCode.INTERNAL, 500)
# Errors a client tells apart from others of the same code, by the trailing metadata
# "rollout-error: <tag>" (gRPC) -- a refused delta base from a stale expected_version.
_TAGS: dict[type[BaseException], str] = {DeltaBaseUnavailable: "delta-base"}
TAG_KEY = "rollout-error"


def _lookup(exc: BaseException) -> tuple[grpc.StatusCode, int]:
    for kind in type(exc).__mro__:
        if kind in _TABLE:
            return _TABLE[kind]
    return _INTERNAL


def grpc_status(exc: BaseException) -> grpc.StatusCode:
    """The gRPC code for `exc`; anything not a RolloutError is INTERNAL."""
    return _lookup(exc)[0]


def http_status(exc: BaseException) -> int:
    """The HTTP status for `exc`; anything not a RolloutError is 500."""
    return _lookup(exc)[1]


def grpc_trailers(exc: BaseException) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that tells `exc` apart from others of its code (usually none)."""
    tag = next((_TAGS[k] for k in type(exc).__mro__ if k in _TAGS), None)
    return ((TAG_KEY, tag),) if tag else ()


def public_message(exc: BaseException) -> str:
    """What the client is told: our own messages verbatim, other exceptions by type only."""
    if isinstance(exc, RolloutError):
        return str(exc)
    return f"internal error ({type(exc).__name__}); see the server log"
