"""Python client for rollout-service (rollout.v1 over gRPC). Depends on grpcio, protobuf, numpy only."""

from rollout_client.channel import NO_RETRY, RetryPolicy
from rollout_client.client import AsyncRolloutClient, RolloutClient
from rollout_client.errors import (
    AbortedError,
    CancelledError,
    DataLossError,
    DeltaBaseError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    RolloutClientError,
    UnauthenticatedError,
    UnavailableError,
)
from rollout_client.push import PushResult
from rollout_client.rl import MismatchReport, mismatch_report, tis_weights
from rollout_client.types import Completion, Sample

__all__ = [
    "AbortedError",
    "AsyncRolloutClient",
    "CancelledError",
    "Completion",
    "DataLossError",
    "DeltaBaseError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "MismatchReport",
    "NO_RETRY",
    "NotFoundError",
    "PermissionDeniedError",
    "PushResult",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RolloutClient",
    "RolloutClientError",
    "Sample",
    "UnauthenticatedError",
    "UnavailableError",
    "mismatch_report",
    "tis_weights",
]
