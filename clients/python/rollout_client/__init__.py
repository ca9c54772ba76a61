"""Python client for rollout-service (rollout.v1 over gRPC). Depends on grpcio, protobuf, numpy only."""

from rollout_client.client import AsyncRolloutClient, RolloutClient
from rollout_client.errors import (
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    ResourceExhaustedError,
    RolloutClientError,
    UnavailableError,
)
from rollout_client.types import Completion, Sample

__all__ = [
    "AsyncRolloutClient",
    "CancelledError",
    "Completion",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InvalidArgumentError",
    "ResourceExhaustedError",
    "RolloutClient",
    "RolloutClientError",
    "Sample",
    "UnavailableError",
]
