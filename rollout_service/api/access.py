"""Who may call what: API keys with roles, checked the same way by the gRPC and HTTP front ends.

A keys file holds one key a line, `ROLE:KEY` or `ROLE:sha256:HEX` (the key's SHA-256 in hex, so the
file need not hold the key itself); blank lines and `#` comments are skipped. Keys are kept as
digests only and looked up in constant time (every digest is compared, with no early exit), and
never logged: a caller is named by its role and the first 8 hex digits of its digest.

The file is re-read when it changes (inode, mtime or size), so keys rotate without a restart. At
start every line must parse; on a reload a malformed line is skipped and logged and the others
apply, so deleting a key's line always revokes it.

Operations not listed for a role are denied: an RPC or path that `grpc_operation` / `http_operation`
does not know needs `admin`. Health (gRPC `grpc.health.v1.Health`, `GET /healthz`) is open.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections import Counter
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_service.errors import ConfigError, Overloaded, PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)


class Operation(str, Enum):
    GENERATE = "generate"
    PUSH = "push"
    STATUS = "status"
    ADMIN = "admin"  # debug endpoints, metrics, reflection, API docs, anything not listed
    HEALTH = "health"  # open to anyone


ROLES: dict[str, frozenset[Operation]] = {
    "trainer": frozenset({Operation.GENERATE, Operation.PUSH, Operation.STATUS}),
    "eval": frozenset({Operation.GENERATE, Operation.STATUS}),
    "admin": frozenset(Operation),
}

def _rpc_operations() -> dict[str, Operation]:
    """Each rollout.v1 method's operation, as the proto declares it (`option (operation)`); a
    method that declares none is admin only."""
    service = pb.DESCRIPTOR.services_by_name["RolloutService"]
    declared = {m.name: m.GetOptions().Extensions[pb.operation] for m in service.methods}
    return {f"/{service.full_name}/{name}": Operation(op) for name, op in declared.items() if op}


_GRPC = {
    **_rpc_operations(),
    "/grpc.health.v1.Health/Check": Operation.HEALTH,
    "/grpc.health.v1.Health/Watch": Operation.HEALTH,
}
_HTTP = {
    ("POST", "/v1/generate"): Operation.GENERATE,
    ("POST", "/v1/completions"): Operation.GENERATE,
    ("POST", "/v1/chat/completions"): Operation.GENERATE,
    ("GET", "/v1/models"): Operation.STATUS,
    ("POST", "/v1/weights"): Operation.PUSH,
    ("POST", "/v1/weights:load"): Operation.PUSH,
    ("GET", "/v1/status"): Operation.STATUS,
    ("GET", "/v1/events"): Operation.STATUS,
    # Read-only, as GetStatus is: a scraper's key (an eval key) then cannot roll back or push.
    ("GET", "/metrics"): Operation.STATUS,
    ("GET", "/healthz"): Operation.HEALTH,
}


def grpc_operation(method: str) -> Operation:
    return _GRPC.get(method, Operation.ADMIN)


def http_operation(method: str, path: str) -> Operation:
    return _HTTP.get((method, path), Operation.ADMIN)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh key: 32 random bytes, URL-safe."""
    return "rk_" + secrets.token_urlsafe(32)


def parse_key_line(line: str, where: str) -> tuple[str, str] | None:
    """(role, hex digest) of one keys-file line, None for a blank or comment line."""
    line = line.strip()
    if not line or line.startswith("#"):
        return None
    role, sep, rest = line.partition(":")
    if not sep or not rest:
        raise ConfigError(f"{where}: expected ROLE:KEY or ROLE:sha256:HEX")
    if role not in ROLES:
        raise ConfigError(f"{where}: unknown role {role!r}; roles are {', '.join(ROLES)}")
    if rest.startswith("sha256:"):
        hexdigest = rest.removeprefix("sha256:").lower()
        if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise ConfigError(f"{where}: sha256: needs 64 hex digits")
        return role, hexdigest
    if len(rest) < 16:
        raise ConfigError(f"{where}: a key must be at least 16 characters (make one with `rollout-service make-key`)")
    return role, digest(rest)


@dataclass(frozen=True)
class Caller:
    role: str
    name: str  # role:first 8 hex digits of the key's digest; "anonymous" without keys

    def may(self, operation: Operation) -> bool:
        return operation in ROLES[self.role]


ANONYMOUS = Caller("admin", "anonymous")


class KeyRing:
    """The keys of one file, as (digest, role), re-read when the file changes."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp = None
        self._keys: list[tuple[bytes, str]] = []
        self._last_error = ""
        self._load(strict=True)

    def _stat(self):
        st = os.stat(self.path)
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self, strict: bool) -> None:
        stamp = self._stat()
        keys = []
        for number, raw in enumerate(self.path.read_bytes().splitlines(), 1):
            try:
                try:
                    line = raw.decode()
                except UnicodeDecodeError:
                    raise ConfigError(f"{self.path}:{number}: not UTF-8") from None
                parsed = parse_key_line(line, f"{self.path}:{number}")
            except ConfigError as exc:
                if strict:
                    raise
                log.error("keys file reload: skipping a line: %s", exc)
                continue
            if parsed is not None:
                keys.append((bytes.fromhex(parsed[1]), parsed[0]))
        if not keys and strict:
            raise ConfigError(f"{self.path}: no keys (one a line, ROLE:KEY or ROLE:sha256:HEX)")
        self._keys, self._stamp = keys, stamp
        log.info("API keys from %s: %s", self.path, dict(Counter(role for _, role in keys)) or "none")

    def refresh(self) -> None:
        """Re-read the file if it changed. A file that cannot be read (being replaced, removed) keeps
        the keys there are: revoke a key by deleting its line, not the file."""
        try:
            if self._stat() != self._stamp:
                self._load(strict=False)
            self._last_error = ""
        except OSError as exc:
            if str(exc) != self._last_error:  # once, not on every call
                log.error("keys file %s unreadable, keeping the previous keys: %s", self.path, exc)
                self._last_error = str(exc)

    def lookup(self, key: str) -> Caller | None:
        self.refresh()
        wanted = hashlib.sha256(key.encode()).digest()
        found = None
        for stored, role in self._keys:  # no early exit: the time does not depend on which key matched
            if hmac.compare_digest(stored, wanted):
                found = role
        return None if found is None else Caller(found, f"{found}:{wanted.hex()[:8]}")


class Slot:
    """One call's share of its key's caps: the call itself, and (Generate) the bytes of its request.
    `release` gives both back, once."""

    def __init__(self, access: Access | None = None, key: tuple[str, Operation] | None = None):
        self._access, self._key = access, key
        self.nbytes = 0

    def grow(self, nbytes: int) -> None:
        """Count `nbytes` more of the request against the key's bytes in flight, before they are
        parsed (Overloaded beyond the cap: nothing was taken)."""
        if self._access is not None:
            self._access._grow(self, nbytes)

    def release(self) -> None:
        if self._access is not None:
            self._access._release(self)
            self._access = None


UNCAPPED = Slot()  # status, health, admin calls, and every call on a server without keys


class Access:
    """Authentication, authorization and per-key caps, for both front ends of a process: calls of
    Generate and Push running at once, and the bytes of Generate requests in flight (their wire
    size: a parsed request takes up to about 8x it over gRPC, 3x as JSON; BENCHMARKS.md)."""

    def __init__(self, keys: KeyRing | None, max_generates: int, max_pushes: int, max_request_bytes: int | None = None):
        self.keys = keys
        self._caps = {Operation.GENERATE: max_generates, Operation.PUSH: max_pushes}
        self._max_bytes = max_request_bytes
        self._running: Counter[tuple[str, Operation]] = Counter()
        self._bytes: Counter[str] = Counter()

    @classmethod
    def from_config(cls, config) -> Access:
        config.check_secret_files()
        keys = KeyRing(config.api_keys) if config.api_keys is not None else None
        return cls(
            keys, config.max_concurrent_generates_per_key, config.max_concurrent_pushes_per_key,
            config.max_request_mib_per_key * 1024 * 1024,
        )

    def authorize(self, authorization: str | None, operation: Operation) -> Caller:
        """The caller behind an `authorization` value ("Bearer KEY"), if it may do `operation`."""
        if operation is Operation.HEALTH or self.keys is None:
            return ANONYMOUS
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("no API key: send `authorization: Bearer <key>`")
        caller = self.keys.lookup(key.strip())
        if caller is None:
            raise Unauthenticated("unknown API key")
        if not caller.may(operation):
            allowed = [role for role, ops in ROLES.items() if operation in ops]
            raise PermissionDenied(f"role {caller.role!r} may not {operation.value}; roles that may: {', '.join(allowed)}")
        return caller

    def acquire(self, caller: Caller, operation: Operation) -> Slot:
        """One of the caller's concurrent calls of `operation` (generate and push are capped;
        Overloaded beyond); give it back with `Slot.release`."""
        cap = self._caps.get(operation)
        if cap is None or caller is ANONYMOUS:
            return UNCAPPED
        key = (caller.name, operation)
        if self._running[key] >= cap:
            raise Overloaded(f"{caller.name} already has {cap} {operation.value} call(s) running (the per-key limit)")
        self._running[key] += 1
        return Slot(self, key)

    def _grow(self, slot: Slot, nbytes: int) -> None:
        name, operation = slot._key
        if operation is not Operation.GENERATE or self._max_bytes is None:
            return
        if self._bytes[name] + nbytes > self._max_bytes:
            mib = 1024 * 1024
            raise Overloaded(
                f"{name} has {self._bytes[name] / mib:.1f} MiB of generate requests in flight; "
                f"{nbytes / mib:.1f} MiB more would pass the per-key limit (max_request_mib_per_key="
                f"{self._max_bytes // mib}); retry when its calls have finished"
            )
        self._bytes[name] += nbytes
        slot.nbytes += nbytes

    def _release(self, slot: Slot) -> None:
        name, operation = slot._key
        self._running[slot._key] -= 1
        if not self._running[slot._key]:
            del self._running[slot._key]
        if slot.nbytes:
            self._bytes[name] -= slot.nbytes
            if not self._bytes[name]:
                del self._bytes[name]
