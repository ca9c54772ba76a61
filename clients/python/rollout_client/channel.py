"""Channel settings shared by the blocking and asyncio clients: retries, TLS, API key.

Retries are gRPC's own (a service config `retryPolicy`), not a loop in this package: gRPC
re-sends a call that failed with a retryable code before any response reached the client, with
exponential backoff and jitter, and never retries a call whose response has started (so a
GenerateStream that already yielded completions is not silently restarted). Only idempotent
calls get the policy: Generate, GenerateStream and GetStatus. PushWeights is never retried (its
request stream is consumed once, and one cut off after its commit point stands: the caller reads
the committed version before pushing again).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
SERVICE = "rollout.v1.RolloutService"
IDEMPOTENT_METHODS = ("Generate", "GenerateStream", "GetStatus")


@dataclass(frozen=True)
class RetryPolicy:
    """How idempotent calls are retried. gRPC caps `max_attempts` at 5 (first try included)."""

    max_attempts: int = 5
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 10.0
    backoff_multiplier: float = 2.0
    # UNAVAILABLE: the replica died, restarts, or is not ready. Add "RESOURCE_EXHAUSTED" to also
    # wait out the server's in-flight limit.
    codes: Sequence[str] = field(default=("UNAVAILABLE",))

    def __post_init__(self) -> None:
        if not 1 <= self.max_attempts <= 5:
            raise ValueError(f"RetryPolicy.max_attempts={self.max_attempts} must be in [1, 5] (gRPC's limit)")
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(
                f"RetryPolicy backoff: need 0 < initial_backoff_s ({self.initial_backoff_s}) <= "
                f"max_backoff_s ({self.max_backoff_s})"
            )
        unknown = [c for c in self.codes if c not in grpc.StatusCode.__members__]
        if unknown:
            raise ValueError(f"RetryPolicy.codes: {unknown} are not gRPC status code names")

    def service_config(self) -> str:
        """The gRPC service config JSON applying this policy to the idempotent methods."""
        method_config = {"name": [{"service": SERVICE, "method": m} for m in IDEMPOTENT_METHODS]}
        if self.max_attempts > 1:
            method_config["retryPolicy"] = {
                "maxAttempts": self.max_attempts,
                "initialBackoff": f"{self.initial_backoff_s}s",
                "maxBackoff": f"{self.max_backoff_s}s",
                "backoffMultiplier": self.backoff_multiplier,
                "retryableStatusCodes": list(self.codes),
            }
        return json.dumps({"methodConfig": [method_config]})


NO_RETRY = RetryPolicy(max_attempts=1)


@dataclass(frozen=True)
class ChannelOptions:
    """Everything about the connection itself.

    `tls`: use TLS with the system roots, or with `root_certificates` (PEM bytes or a path).
    `client_certificate` / `client_key`: this client's certificate and key (PEM bytes or paths) for a
    server that requires client certificates (mutual TLS); they imply TLS.
    `api_key`: sent as `authorization: Bearer <key>` on every call (TLS recommended); never shown in repr.
    """

    retry: RetryPolicy = RetryPolicy()
    tls: bool = False
    root_certificates: bytes | str | Path | None = None
    api_key: str | None = field(default=None, repr=False)
    client_certificate: bytes | str | Path | None = None
    client_key: bytes | str | Path | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.client_certificate is None) != (self.client_key is None):
            raise ValueError("client_certificate and client_key go together: give both or neither")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.api_key else ()

    def grpc_options(self) -> list[tuple[str, object]]:
        return [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.enable_retries", 1),
            ("grpc.service_config", self.retry.service_config()),
        ]

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not (self.tls or self.root_certificates or self.client_certificate):
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_pem(self.root_certificates),
            private_key=_pem(self.client_key),
            certificate_chain=_pem(self.client_certificate),
        )

    def channel(self, address: str) -> grpc.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(address, options=self.grpc_options())
        return grpc.secure_channel(address, creds, options=self.grpc_options())

    def aio_channel(self, address: str) -> grpc.aio.Channel:
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(address, options=self.grpc_options())
        return grpc.aio.secure_channel(address, creds, options=self.grpc_options())


def _pem(value: bytes | str | Path | None) -> bytes | None:
    """PEM bytes as given, or read from a path."""
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()
