"""A push's tensors in the engines' format, handed to every replica as they are written, so that
each replica stages them while the push is still being received (serve/push.py's prepare phase).

Each part file the ingress writes (its requantized parts for int8/fp8 engines, else the weight
store's own shards) goes to the replicas through the replica set (serve/replicas.py `share`): in a
Ray Serve deployment, for replicas on other nodes, as one Ray object, put once out of band and read
zero-copy by the replicas of each node, Ray moving it to the nodes that need it; a replica on the
ingress's node, and the single-process server's, hard-links the file itself. So replicas need not
share a filesystem with the ingress or with each other.

Parts go to the replicas one after another, each to all of them at once; at most `WINDOW_PARTS`
are handed out and not yet taken: the conversion thread writing a further one waits, and with it
the push's flow control, so memory (Ray's object store) stays bounded whatever the model size. A
replica failing to take a part (or not within `TAKE_TIMEOUT_S`) fails the push at its commit; no
part is handed out after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

from rollout_service.errors import EngineUnavailable
from rollout_service.serve.replicas import Replicas, broadcast_all

# Parts (64 MiB each: weights/staging.py) handed out and not yet taken by every replica.
WINDOW_PARTS = 4
# A part not taken by every replica in this long fails the push (a node Ray has not yet seen die):
# 64 MiB at 1 MB/s, with room.
TAKE_TIMEOUT_S = 300.0


class Fanout:
    """Started with a push (`part_written` is its spool's `on_part`); `finish` once the push's last
    part is written."""

    def __init__(self, replicas: Replicas, push_id: str, version: int, fingerprint: str | None):
        """`fingerprint`: the quantization recipe the parts follow (None: the engine dtype), so
        that a replica whose engine holds its parameters another way ignores them."""
        self._replicas = replicas
        self._args = (push_id, version, fingerprint)
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._room = threading.Semaphore(WINDOW_PARTS)
        self._closed = False
        self._error: BaseException | None = None
        self.parts: dict[str, str] = {}  # tensor name -> part name
        self._task = asyncio.create_task(self._send())

    def part_written(self, path: Path, names: list[str]) -> None:
        """On the conversion thread: hand part `path` (tensors `names`) to every replica."""
        self._room.acquire()
        if self._closed or self._error is not None:
            self._room.release()  # for the next part written after the push ended or failed
            return
        shared = self._replicas.share(path)
        for name in names:
            self.parts[name] = path.name
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (path.name, shared, names))

    async def _send(self) -> None:
        while (item := await self._queue.get()) is not None:
            try:
                if self._error is None:
                    await asyncio.wait_for(broadcast_all(self._replicas, "take", *self._args, *item), TAKE_TIMEOUT_S)
            except TimeoutError:
                self._error = EngineUnavailable(f"a replica did not take part {item[0]} of the push in {TAKE_TIMEOUT_S:.0f} s")
            except BaseException as exc:  # the push fails at its commit: every replica drops what it took
                self._error = exc
                if isinstance(exc, asyncio.CancelledError):
                    raise
            finally:
                del item  # the Ray object is freed once no replica call holds it
                self._room.release()

    async def finish(self) -> dict[str, str]:
        """Once every part was written: wait until every replica took them; tensor name -> part.
        Raises what a replica raised taking one."""
        self._queue.put_nowait(None)
        await self._task
        if self._error is not None:
            raise self._error
        return self.parts

    async def close(self) -> None:
        """Stop handing parts out (the push ended, committed or not): a part being taken is left
        to the replicas' abort, and a conversion thread waiting for room goes on without."""
        self._closed = True
        for _ in range(WINDOW_PARTS):
            self._room.release()
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
