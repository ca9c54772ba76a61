"""The coordinator contract, held by the embedded default and by Redis (a real redis-server)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from rollout_service.errors import EngineUnavailable
from rollout_service.serve.coordinator import EmbeddedCoordinator, RedisCoordinator


@pytest.fixture(params=["embedded", "redis"])
def coordinator(request, redis_server):
    if request.param == "embedded":
        yield EmbeddedCoordinator()
        return
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    c = RedisCoordinator(redis_server.url)
    yield c
    asyncio.run(c.close())


async def registry(coordinator) -> dict[str, dict]:
    """The live entries of the replica registry, read as an operator would (Redis keys
    `rollout:replica:<id>`; the embedded coordinator's own table)."""
    if isinstance(coordinator, EmbeddedCoordinator):
        now = time.monotonic()
        return {rid: info for rid, (expires, info) in coordinator._replicas.items() if expires > now}
    keys = [k async for k in coordinator._r.scan_iter("rollout:replica:*")]
    values = await coordinator._r.mget(keys) if keys else []
    return {k.removeprefix("rollout:replica:"): json.loads(v) for k, v in zip(keys, values) if v}


def run(coro):
    return asyncio.run(coro)


async def until(condition, what: str, timeout: float = 30.0) -> None:
    """Await `condition()` until it is true: expiry is observed, not slept for."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_version_is_recorded_with_an_event_per_commit(coordinator):
    async def go():
        assert await coordinator.version() is None
        await coordinator.set_version(1, "/w/v000001/manifest.json", "step-1")
        await coordinator.set_version(2, "/w/v000002/manifest.json", "step-2")
        assert await coordinator.version() == (2, "/w/v000002/manifest.json")
        events = await coordinator.events("0", 10)
        assert [e["version"] for _, e in events] == [1, 2]
        assert events[1][1]["label"] == "step-2"
        after_first = await coordinator.events(events[0][0], 10)
        assert [e["version"] for _, e in after_first] == [2]
        await coordinator.close()

    run(go())


def test_ensure_version_writes_back_only_a_missing_or_older_record(coordinator):
    async def go():
        assert await coordinator.ensure_version(3, "/w/v3")
        assert not await coordinator.ensure_version(3, "/w/v3")
        assert not await coordinator.ensure_version(2, "/w/v2")
        assert await coordinator.version() == (3, "/w/v3")
        await coordinator.close()

    run(go())


def test_push_lock_excludes_other_owners_until_released_or_expired(coordinator):
    async def go():
        assert await coordinator.lock("a", 30, 0)
        assert not await coordinator.lock("b", 30, 0)
        await coordinator.unlock("b")  # not the owner: no effect
        assert not await coordinator.lock("b", 30, 0)
        assert not await coordinator.refresh("b", 30)  # not the owner: no effect
        assert await coordinator.refresh("a", 30)
        await coordinator.unlock("a")
        assert await coordinator.lock("b", 0.2, 0)
        await until(lambda: coordinator.lock("c", 30, 0), "b's lock to expire")  # b never refreshed
        assert not await coordinator.refresh("b", 30)  # a lapsed lock is not retaken by a refresh
        assert not await coordinator.lock("b", 30, 0)
        await coordinator.close()

    run(go())


def test_each_lock_gets_a_larger_fencing_token_above_the_stores(coordinator):
    """The token orders pushes for the weight store, which refuses a commit under an older one;
    `floor` (the store's last token) keeps it ordered after Redis lost its data."""
    async def go():
        first = await coordinator.lock("a", 30, 0)
        await coordinator.unlock("a")
        second = await coordinator.lock("b", 30, 0)
        await coordinator.unlock("b")
        assert 0 < first < second
        assert await coordinator.lock("c", 30, second + 40) == second + 41
        await coordinator.unlock("c")
        assert await coordinator.lock("d", 30, 0) == second + 42
        await coordinator.close()

    run(go())


def test_replica_registry_entries_expire_without_heartbeats(coordinator):
    async def go():
        await coordinator.heartbeat({"r1": {"version": 1}, "r2": {"version": 1}}, 30)
        assert set(await registry(coordinator)) == {"r1", "r2"}
        await coordinator.heartbeat({"r2": {"version": 1}}, 0.2)  # r2's last heartbeat
        await coordinator.heartbeat({"r1": {"version": 2}}, 30)

        async def only_r1() -> bool:
            return await registry(coordinator) == {"r1": {"version": 2}}

        await until(only_r1, "r2's entry to expire")
        await coordinator.close()

    run(go())


def test_unreachable_redis_is_unavailable_naming_the_server():
    async def go():
        c = RedisCoordinator("redis://127.0.0.1:1/0")
        with pytest.raises(EngineUnavailable, match="redis at redis://127.0.0.1:1/0 is unreachable"):
            await c.lock("a", 1, 0)
        await c.close()

    run(go())


def test_a_password_from_a_file_reaches_redis_and_never_shows_in_messages(tiny_model, tmp_path):
    from rollout_service.config import ServerConfig
    from rollout_service.serve.coordinator import make_coordinator, redacted
    from tests.serve.conftest import RedisServer

    secret = "redis-password-for-the-test"
    server = RedisServer(tmp_path, password=secret)
    server.start()
    try:
        password_file = tmp_path / "password"
        password_file.write_text(secret + "\n")

        async def go():
            good = make_coordinator(ServerConfig(model=tiny_model, redis_url=server.url, redis_password_file=password_file))
            await good.set_version(1, "m.json", "x")
            assert (await good.version())[0] == 1
            await good.close()
            wrong_url = server.url.replace("redis://", "redis://:wrong-password@")
            wrong = make_coordinator(ServerConfig(model=tiny_model, redis_url=wrong_url))
            with pytest.raises(EngineUnavailable) as info:
                await wrong.version()
            assert "wrong-password" not in str(info.value) and ":***@" in str(info.value)
            await wrong.close()

        run(go())
    finally:
        server.stop()
    assert redacted("redis://user:pw@h:1/0") == "redis://user:***@h:1/0" and redacted("redis://h:1/0") == "redis://h:1/0"
