"""Where the service is and how to reach it, from verl's `actor_rollout_ref.rollout.custom`.

verl passes a rollout no address of its own; its `RolloutConfig.custom` dict (not in verl's yaml,
so set it with a `+` override) carries ours, with environment variables as the fallback:

    +actor_rollout_ref.rollout.custom={address: "svc:50051", api_key: "...", tls: true, root_certificates: /ca.pem}

    ROLLOUT_SERVICE_ADDRESS, ROLLOUT_SERVICE_API_KEY, ROLLOUT_SERVICE_TLS (1/true),
    ROLLOUT_SERVICE_ROOT_CERTIFICATES (a PEM path), ROLLOUT_SERVICE_TIMEOUT (seconds)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

ENV = {
    "address": "ROLLOUT_SERVICE_ADDRESS",
    "api_key": "ROLLOUT_SERVICE_API_KEY",
    "tls": "ROLLOUT_SERVICE_TLS",
    "root_certificates": "ROLLOUT_SERVICE_ROOT_CERTIFICATES",
    "timeout": "ROLLOUT_SERVICE_TIMEOUT",
}


@dataclass(frozen=True)
class Connection:
    """Arguments of RolloutClient / AsyncRolloutClient (plain values: it travels to Ray actors)."""

    address: str
    api_key: str | None = None
    tls: bool = False
    root_certificates: str | None = None
    timeout: float = 600.0

    @classmethod
    def from_custom(cls, custom: Mapping[str, Any] | None) -> Connection:
        """From `rollout.custom` (a dict, a DictConfig or None), each key falling back to its
        environment variable; no address anywhere is a ValueError saying where to put one."""
        custom = dict(custom or {})
        unknown = sorted(set(custom) - set(ENV))
        if unknown:
            raise ValueError(f"actor_rollout_ref.rollout.custom: unknown key(s) {unknown}; known: {sorted(ENV)}")
        value = {key: custom.get(key, os.environ.get(var)) for key, var in ENV.items()}
        if not value["address"]:
            raise ValueError(
                "rollout-service address: set +actor_rollout_ref.rollout.custom.address=HOST:PORT "
                f"or the {ENV['address']} environment variable"
            )
        tls = value["tls"]
        return cls(
            address=str(value["address"]),
            api_key=value["api_key"] or None,
            tls=tls if isinstance(tls, bool) else str(tls or "").lower() in ("1", "true", "yes"),
            root_certificates=str(value["root_certificates"]) if value["root_certificates"] else None,
            timeout=float(value["timeout"] or 600.0),
        )

    def client_options(self) -> dict[str, Any]:
        return asdict(self)
