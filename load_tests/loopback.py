"""Load tests only target servers on this machine: the one check every load tool here makes."""

from __future__ import annotations

from ipaddress import ip_address
from urllib.parse import urlsplit

LOOPBACK_NAMES = {"localhost"}


def loopback_host(target: str, option: str) -> str:
    """The host of `target` ("host:port", "[::1]:port" or "http://host:port/..."), given as
    `option`; SystemExit naming both unless it is a loopback address or "localhost" (no name is
    resolved)."""
    host = urlsplit(target).hostname if "://" in target else target.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = host in LOOPBACK_NAMES or ip_address(host or "").is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"{option} {target}: load tests only target servers on this machine (loopback), not host {host!r}")
    return host
