"""Typed client errors, one per gRPC status code the service uses; each carries `.code`."""

from __future__ import annotations

import grpc


class RolloutClientError(Exception):
    """A call failed; `.code` is the grpc.StatusCode and `.details` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str, code: grpc.StatusCode | None = None):
        super().__init__(f"{(code or self.code).name}: {details}")
        self.details = details
        if code is not None:
            self.code = code


class InvalidArgumentError(RolloutClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ResourceExhaustedError(RolloutClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceededError(RolloutClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CancelledError(RolloutClientError):
    code = grpc.StatusCode.CANCELLED


class UnavailableError(RolloutClientError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPreconditionError(RolloutClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeltaBaseError(FailedPreconditionError):
    """A delta push's base is not what the server holds (a version it no longer keeps, or another
    value): a delta push then pushes the whole tensors by itself."""


class DataLossError(RolloutClientError):
    code = grpc.StatusCode.DATA_LOSS


class AbortedError(RolloutClientError):
    code = grpc.StatusCode.ABORTED


class UnauthenticatedError(RolloutClientError):
    """No API key was sent, or the server does not know it."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(RolloutClientError):
    """The key's role may not make this call (e.g. an eval key pushing weights)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class NotFoundError(RolloutClientError):
    """The call names something the server cannot find (a checkpoint file load_weights names)."""

    code = grpc.StatusCode.NOT_FOUND


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgumentError,
        ResourceExhaustedError,
        DeadlineExceededError,
        CancelledError,
        UnavailableError,
        FailedPreconditionError,
        DataLossError,
        AbortedError,
        UnauthenticatedError,
        PermissionDeniedError,
        NotFoundError,
    )
}


# Errors told apart from others of their code by the trailing metadata "rollout-error: <tag>".
_BY_TAG = {"delta-base": DeltaBaseError}


def from_rpc_error(err: grpc.RpcError) -> RolloutClientError:
    """The typed error for a failed call."""
    code = err.code()
    cls = _BY_CODE.get(code, RolloutClientError)
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    tags = [value for key, value in (trailers or ()) if key == "rollout-error"]
    if tags and tags[0] in _BY_TAG and issubclass(_BY_TAG[tags[0]], cls):
        cls = _BY_TAG[tags[0]]
    return cls(err.details() or "", code)
