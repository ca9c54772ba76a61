"""API keys and roles (api/access.py), without a server."""

from __future__ import annotations

import os

import pytest

from rollout_service.api.access import (
    ROLES,
    Access,
    KeyRing,
    Operation,
    digest,
    grpc_operation,
    http_operation,
    new_key,
    parse_key_line,
)
from rollout_service.errors import ConfigError, Overloaded, PermissionDenied, Unauthenticated

TRAINER = "trainer-key-0123456789abcdef"
EVAL = "eval-key-0123456789abcdef"
ADMIN = "admin-key-0123456789abcdef"


def keys_file(tmp_path, *lines: str):
    path = tmp_path / "keys"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def access(tmp_path) -> Access:
    path = keys_file(tmp_path, "# comment", "", f"trainer:{TRAINER}", f"eval:sha256:{digest(EVAL)}", f"admin:{ADMIN}")
    return Access(KeyRing(path), max_generates=2, max_pushes=1)


@pytest.mark.parametrize(
    "line, problem",
    [
        ("trainer", "expected ROLE:KEY"),
        ("root:" + "k" * 20, "unknown role 'root'"),
        ("eval:short", "at least 16 characters"),
        ("eval:sha256:abc", "64 hex digits"),
        ("eval:sha256:" + "g" * 64, "64 hex digits"),
    ],
)
def test_a_malformed_key_line_is_refused_naming_file_and_line(line, problem):
    with pytest.raises(ConfigError, match=problem) as info:
        parse_key_line(line, "keys:3")
    assert str(info.value).startswith("keys:3: ")


def test_a_key_and_its_sha256_line_are_the_same_key():
    key = new_key()
    assert parse_key_line(f"eval:{key}", "x") == parse_key_line(f"eval:sha256:{digest(key)}", "x")


def test_every_role_may_do_exactly_its_operations(access):
    for key, role in ((TRAINER, "trainer"), (EVAL, "eval"), (ADMIN, "admin")):
        for operation in Operation:
            if operation is Operation.HEALTH:
                continue
            if operation in ROLES[role]:
                assert access.authorize(f"Bearer {key}", operation).role == role
            else:
                with pytest.raises(PermissionDenied, match=f"role '{role}' may not {operation.value}"):
                    access.authorize(f"Bearer {key}", operation)


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer ", "Basic abc", f"Token {TRAINER}", "Bearer unknown-key-xyz"])
def test_a_missing_or_unknown_key_is_unauthenticated(access, header):
    with pytest.raises(Unauthenticated):
        access.authorize(header, Operation.GENERATE)


def test_health_is_open_and_unlisted_operations_need_admin(access):
    assert access.authorize(None, Operation.HEALTH)
    assert grpc_operation("/grpc.health.v1.Health/Check") is Operation.HEALTH
    assert http_operation("GET", "/healthz") is Operation.HEALTH
    for method in ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "/rollout.v1.RolloutService/New"):
        assert grpc_operation(method) is Operation.ADMIN
    assert http_operation("GET", "/metrics") is Operation.STATUS  # a scraper's key need not be an admin's
    for path in ("/docs", "/openapi.json", "/v1/debug/pause", "/v1/weights/"):
        assert http_operation("GET", path) is Operation.ADMIN
    assert http_operation("GET", "/v1/weights") is Operation.ADMIN  # only POST pushes


def test_callers_are_named_by_role_and_digest_never_by_key(access):
    caller = access.authorize(f"Bearer {TRAINER}", Operation.PUSH)
    assert caller.name == f"trainer:{digest(TRAINER)[:8]}"
    assert TRAINER not in repr(caller)


def test_the_keys_file_is_reread_when_it_changes_and_a_deleted_line_revokes(tmp_path, access):
    path = access.keys.path
    new = new_key()
    path.write_text(f"trainer:{TRAINER}\nnot a key line\neval:{new}\n")
    os.utime(path, ns=(1, 1))  # a new mtime even within the clock's resolution
    assert access.authorize(f"Bearer {new}", Operation.STATUS).role == "eval"  # the bad line skipped
    with pytest.raises(Unauthenticated):
        access.authorize(f"Bearer {ADMIN}", Operation.STATUS)  # its line is gone


def test_a_line_that_is_not_utf8_is_skipped_on_reload_and_refused_at_start(tmp_path, access):
    path = access.keys.path
    path.write_bytes(b"# caf\xe9\n" + f"trainer:{TRAINER}\n".encode())
    os.utime(path, ns=(2, 2))
    assert access.authorize(f"Bearer {TRAINER}", Operation.PUSH).role == "trainer"
    with pytest.raises(ConfigError, match="keys:1: not UTF-8"):
        KeyRing(path)


def test_an_unreadable_keys_file_keeps_the_previous_keys(tmp_path, access):
    access.keys.path.unlink()
    assert access.authorize(f"Bearer {TRAINER}", Operation.PUSH).role == "trainer"


def test_a_keys_file_must_parse_whole_and_hold_a_key_at_start(tmp_path):
    with pytest.raises(ConfigError, match="keys:2"):
        KeyRing(keys_file(tmp_path, f"trainer:{TRAINER}", "bad"))
    with pytest.raises(ConfigError, match="no keys"):
        KeyRing(keys_file(tmp_path, "# nothing"))


def test_per_key_slots_cap_generate_and_push_and_free_on_release(access):
    trainer = access.authorize(f"Bearer {TRAINER}", Operation.GENERATE)
    other = access.authorize(f"Bearer {ADMIN}", Operation.GENERATE)
    held = [access.acquire(trainer, Operation.GENERATE) for _ in range(2)]
    with pytest.raises(Overloaded, match="per-key limit"):
        access.acquire(trainer, Operation.GENERATE)
    access.acquire(other, Operation.GENERATE).release()  # another key has its own slots
    push = access.acquire(trainer, Operation.PUSH)
    with pytest.raises(Overloaded):
        access.acquire(trainer, Operation.PUSH)
    for slot in [*held, push]:
        slot.release()
        slot.release()  # once only: a second release gives nothing back twice
    for _ in range(2):
        access.acquire(trainer, Operation.GENERATE)  # all free again
    for _ in range(3):
        access.acquire(trainer, Operation.STATUS)  # status is not capped


def test_a_key_s_generate_bytes_in_flight_are_capped_before_parsing_and_freed_with_the_call(tmp_path):
    capped = Access(KeyRing(keys_file(tmp_path, f"trainer:{TRAINER}", f"admin:{ADMIN}")), 8, 1, max_request_bytes=1000)
    trainer = capped.authorize(f"Bearer {TRAINER}", Operation.GENERATE)
    first, second = capped.acquire(trainer, Operation.GENERATE), capped.acquire(trainer, Operation.GENERATE)
    first.grow(600)
    second.grow(300)
    with pytest.raises(Overloaded, match="max_request_mib_per_key"):
        second.grow(200)  # 1100 > 1000: refused, and nothing of it counted
    second.grow(100)
    other = capped.authorize(f"Bearer {ADMIN}", Operation.GENERATE)
    capped.acquire(other, Operation.GENERATE).grow(1000)  # another key's bytes are its own
    first.release()
    second.release()
    capped.acquire(trainer, Operation.GENERATE).grow(1000)  # all of the key's bytes are back


def test_without_keys_everyone_is_let_in(tmp_path):
    open_access = Access(None, max_generates=1, max_pushes=1, max_request_bytes=1)
    caller = open_access.authorize(None, Operation.PUSH)
    for _ in range(2):
        open_access.acquire(caller, Operation.PUSH)
        open_access.acquire(caller, Operation.GENERATE).grow(10)
