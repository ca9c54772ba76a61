"""Shared state of a deployment: the current version, the replica registry, the push lock and the
version event stream. `RedisCoordinator` keeps it in Redis (`--redis-url`), where several ingresses
and trainers see it; `EmbeddedCoordinator` keeps the same in the ingress process.

Redis keys (prefix `rollout:`):
    version             current version number          manifest   its manifest's path
    replica:<id>        JSON of one replica, expires unless refreshed (the heartbeat)
    push-lock           owner token of the running push, expires unless refreshed
    fence               the last fencing token issued with the push lock (each lock: one more)
    events              stream of {kind, version, label, manifest, time}; a trainer can XREAD it

The weight store on disk is the durable record of versions: after Redis loses its data (a restart
without persistence) the ingress writes the current version back (`ensure_version`), and the next
lock's token starts above the newest one the store has recorded (`floor`, its FENCE).
"""

from __future__ import annotations

import collections
import itertools
import json
import time
from typing import Protocol
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from rollout_service.config import ServerConfig
from rollout_service.errors import EngineUnavailable

PREFIX = "rollout:"
EVENTS_KEPT = 1000

# Take the lock and issue its fencing token: one more than the last, and above ARGV[3] (the newest token
# the weight store recorded), so a Redis that lost its data cannot issue a token the store refuses.
_LOCK = """
if not redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
local token = redis.call('incr', KEYS[2])
if token <= tonumber(ARGV[3]) then
  token = tonumber(ARGV[3]) + 1
  redis.call('set', KEYS[2], token)
end
return token
"""
# Compare-and-delete / compare-and-extend: only the lock's owner may release or refresh it.
_UNLOCK = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
_REFRESH = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"


class Coordinator(Protocol):
    async def version(self) -> tuple[int, str] | None:
        """(current version, manifest path), None when never set."""

    async def set_version(self, version: int, manifest: str, label: str) -> None:
        """Record a committed version and append its event."""

    async def ensure_version(self, version: int, manifest: str) -> bool:
        """Write `version` back when the record is missing or older; True if it did."""

    async def heartbeat(self, replicas: dict[str, dict], ttl_s: float) -> None: ...

    async def lock(self, owner: str, ttl_s: float, floor: int) -> int:
        """Take the push lock for `ttl_s` unless another owner holds it (then 0). Returns its
        fencing token: larger than every token issued before and than `floor`. The weight store
        commits a version only under the newest token a push began with (VersionStore.raise_fence)."""

    async def refresh(self, owner: str, ttl_s: float) -> bool: ...

    async def unlock(self, owner: str) -> None: ...

    async def events(self, after: str, count: int) -> list[tuple[str, dict]]: ...

    async def close(self) -> None: ...


def _event(version: int, manifest: str, label: str) -> dict:
    return {"kind": "version", "version": version, "label": label, "manifest": manifest, "time": time.time()}


class EmbeddedCoordinator:
    """The in-process default: the same operations for a deployment with a single ingress."""

    def __init__(self):
        self._version: tuple[int, str] | None = None
        self._replicas: dict[str, tuple[float, dict]] = {}
        self._lock: tuple[str, float] | None = None
        self._events: collections.deque[tuple[str, dict]] = collections.deque(maxlen=EVENTS_KEPT)
        self._ids = itertools.count(1)
        self._fence = 0

    async def version(self):
        return self._version

    async def set_version(self, version, manifest, label):
        self._version = (version, manifest)
        self._events.append((f"{next(self._ids)}-0", _event(version, manifest, label)))

    async def ensure_version(self, version, manifest):
        if self._version is None or self._version[0] < version:
            self._version = (version, manifest)
            return True
        return False

    async def heartbeat(self, replicas, ttl_s):
        now = time.monotonic()
        self._replicas = {rid: entry for rid, entry in self._replicas.items() if entry[0] > now}  # as Redis expires them
        for rid, info in replicas.items():
            self._replicas[rid] = (now + ttl_s, info)

    async def lock(self, owner, ttl_s, floor):
        now = time.monotonic()
        if self._lock is not None and self._lock[1] > now:
            return 0
        self._lock = (owner, now + ttl_s)
        self._fence = max(self._fence, floor) + 1
        return self._fence

    async def refresh(self, owner, ttl_s):
        # As Redis's: only a lock this owner still holds is extended; a lapsed one is not retaken.
        now = time.monotonic()
        if self._lock is None or self._lock[0] != owner or self._lock[1] <= now:
            return False
        self._lock = (owner, now + ttl_s)
        return True

    async def unlock(self, owner):
        if self._lock is not None and self._lock[0] == owner:
            self._lock = None

    async def events(self, after, count):
        seq = _seq(after)
        return [(i, e) for i, e in self._events if _seq(i) > seq][:count]

    async def close(self):
        pass


def _seq(event_id: str) -> tuple[int, int]:
    ms, _, n = event_id.partition("-")
    return int(ms), int(n or 0)


class RedisCoordinator:
    """The same in Redis. A Redis error becomes EngineUnavailable naming the server, so a push
    while Redis is down fails fast and clearly; generation never touches Redis."""

    def __init__(self, url: str, password: str | None = None):
        self.url = redacted(url)  # what messages and logs show
        self._r = aioredis.Redis.from_url(
            url, password=password, decode_responses=True, socket_timeout=5, socket_connect_timeout=2
        )

    async def _call(self, what: str, coro):
        try:
            return await coro
        except (RedisError, OSError) as exc:
            raise EngineUnavailable(f"redis at {self.url} is unreachable ({what}): {exc}") from None

    async def version(self):
        v, m = await self._call("read version", self._r.mget(PREFIX + "version", PREFIX + "manifest"))
        return None if v is None else (int(v), m or "")

    async def set_version(self, version, manifest, label):
        async def write():
            async with self._r.pipeline(transaction=True) as p:
                p.mset({PREFIX + "version": version, PREFIX + "manifest": manifest})
                p.xadd(PREFIX + "events", {k: str(v) for k, v in _event(version, manifest, label).items()},
                       maxlen=EVENTS_KEPT, approximate=True)
                await p.execute()

        await self._call("set version", write())

    async def ensure_version(self, version, manifest):
        current = await self.version()
        if current is not None and current[0] >= version:
            return False
        await self._call("restore version", self._r.mset({PREFIX + "version": version, PREFIX + "manifest": manifest}))
        return True

    async def heartbeat(self, replicas, ttl_s):
        async def write():
            async with self._r.pipeline(transaction=False) as p:
                for rid, info in replicas.items():
                    p.set(PREFIX + f"replica:{rid}", json.dumps(info), px=int(ttl_s * 1000))
                await p.execute()

        await self._call("heartbeat", write())

    async def lock(self, owner, ttl_s, floor):
        keys = (PREFIX + "push-lock", PREFIX + "fence")
        return int(await self._call("push lock", self._r.eval(_LOCK, 2, *keys, owner, int(ttl_s * 1000), floor)))

    async def refresh(self, owner, ttl_s):
        return bool(await self._call("push lock", self._r.eval(_REFRESH, 1, PREFIX + "push-lock", owner, int(ttl_s * 1000))))

    async def unlock(self, owner):
        await self._call("push lock", self._r.eval(_UNLOCK, 1, PREFIX + "push-lock", owner))

    async def events(self, after, count):
        entries = await self._call("read events", self._r.xrange(PREFIX + "events", min=f"({after}" if after != "0" else "-", count=count))
        return [(i, {**e, "version": int(e["version"]), "time": float(e["time"])}) for i, e in entries]

    async def close(self):
        await self._r.aclose()


def redacted(url: str) -> str:
    """`url` with any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


def make_coordinator(config: ServerConfig) -> Coordinator:
    if not config.redis_url:
        return EmbeddedCoordinator()
    password = config.redis_password_file.read_text().strip() if config.redis_password_file else None
    return RedisCoordinator(config.redis_url, password)
