"""Where the service is and how to reach it, for the trainer integrations.

verl passes a rollout no address of its own; its `RolloutConfig.custom` dict (not in verl's yaml,
so set it with a `+` override) carries ours, with environment variables as the fallback (the
OpenRLHF launcher reads the environment only):

    +actor_rollout_ref.rollout.custom={address: "svc:50051", api_key: "...", tls: true, root_certificates: /ca.pem}

    ROLLOUT_SERVICE_ADDRESS, ROLLOUT_SERVICE_API_KEY, ROLLOUT_SERVICE_TLS (1/true),
    ROLLOUT_SERVICE_ROOT_CERTIFICATES (a PEM path), ROLLOUT_SERVICE_TIMEOUT (seconds),
    ROLLOUT_SERVICE_CLIENT_CERTIFICATE and ROLLOUT_SERVICE_CLIENT_KEY (PEM paths, for a service that
    requires client certificates)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from rollout_client.client import RolloutClient

ENV = {
    "address": "ROLLOUT_SERVICE_ADDRESS",
    "api_key": "ROLLOUT_SERVICE_API_KEY",
    "tls": "ROLLOUT_SERVICE_TLS",
    "root_certificates": "ROLLOUT_SERVICE_ROOT_CERTIFICATES",
    "timeout": "ROLLOUT_SERVICE_TIMEOUT",
    "client_certificate": "ROLLOUT_SERVICE_CLIENT_CERTIFICATE",
    "client_key": "ROLLOUT_SERVICE_CLIENT_KEY",
}


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("", "0", "false", "no", "off")


@dataclass(frozen=True)
class Connection:
    """Arguments of RolloutClient / AsyncRolloutClient (plain values: it travels to Ray actors).
    `timeout` bounds each Generate call (a push has no deadline)."""

    address: str
    api_key: str | None = field(default=None, repr=False)
    tls: bool = False
    root_certificates: str | None = None
    timeout: float = 600.0
    client_certificate: str | None = None
    client_key: str | None = field(default=None, repr=False)

    @classmethod
    def from_custom(cls, custom: Mapping[str, Any] | None, where: str = "actor_rollout_ref.rollout.custom") -> Connection:
        """From `custom` (a dict, a DictConfig or None: verl's `rollout.custom`, named by `where`),
        each key unset or null falling back to its environment variable; a missing address or a bad
        value is a ValueError naming where it came from."""
        custom, prefix = dict(custom or {}), where
        unknown = sorted(set(custom) - set(ENV))
        if unknown:
            raise ValueError(f"{prefix}: unknown key(s) {unknown}; known: {sorted(ENV)}")

        def value(key: str) -> tuple[Any, str]:
            if custom.get(key) is not None:
                return custom[key], f"{prefix}.{key}"
            return os.environ.get(ENV[key]), ENV[key]

        address, _ = value("address")
        if not address:
            raise ValueError(f"rollout-service address: set +{prefix}.address=HOST:PORT or the {ENV['address']} environment variable")
        tls, where = value("tls")
        if not isinstance(tls, bool):
            text = str(tls or "").strip().lower()
            if text not in _TRUE + _FALSE:
                raise ValueError(f"{where}={tls!r}: expected true or false")
            tls = text in _TRUE
        timeout, where = value("timeout")
        try:
            timeout = 600.0 if timeout in (None, "") else float(timeout)
        except ValueError:
            raise ValueError(f"{where}={timeout!r}: expected seconds, e.g. 600") from None
        if not timeout > 0:
            raise ValueError(f"{where}={timeout!r}: must be positive")
        api_key, _ = value("api_key")
        roots, _ = value("root_certificates")
        certificate, _ = value("client_certificate")
        key, where = value("client_key")
        if bool(certificate) != bool(key):
            raise ValueError(f"{where}: client_certificate and client_key go together: set both or neither")
        return cls(
            address=str(address), api_key=api_key or None, tls=tls,
            root_certificates=str(roots) if roots else None, timeout=timeout,
            client_certificate=str(certificate) if certificate else None, client_key=str(key) if key else None,
        )

    @classmethod
    def from_env(cls) -> Connection:
        """From the environment variables alone; a missing address is a ValueError naming its variable."""
        if not os.environ.get(ENV["address"]):
            raise ValueError(f"rollout-service address: set the {ENV['address']} environment variable (HOST:PORT)")
        return cls.from_custom({}, where="environment")

    def client_options(self) -> dict[str, Any]:
        return asdict(self)

    def push_client(self) -> RolloutClient:
        """A blocking client for weight syncs: no deadline (a push of many GB takes as long as it
        takes), kept across syncs for the bf16 copy each sync's delta is taken against."""
        return RolloutClient(**{**self.client_options(), "timeout": None})
