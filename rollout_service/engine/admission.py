"""How many sequences the engine holds at once (`max_inflight_sequences`), and who waits for room.

A Generate of any size is served: its prompts enter the engine as room frees up, first come first
served across calls, so a verl batch of 4,096 sequences on a server taking 1,024 runs in parts
instead of being refused. A call is refused (Overloaded, RESOURCE_EXHAUSTED) only when the server
is momentarily full as it arrives -- the sequences the engine holds plus those already waiting
make a full server's worth: a retry then helps, which the refusal says.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator


class SequenceBudget:
    """A FIFO counting semaphore over sequences: `hold(n)` waits until n fit, in arrival order."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.running = 0  # sequences holding room (in the engine)
        self.waiting = 0  # sequences of admitted calls waiting for room
        self._queue: collections.deque[tuple[int, asyncio.Future]] = collections.deque()

    @property
    def full(self) -> bool:
        # Waiting sequences count: with n not dividing the capacity, `running` alone may never
        # reach it, and calls would queue without bound.
        return self.running + self.waiting >= self.capacity

    @contextlib.asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        if n > self.capacity:
            raise ValueError(f"{n} sequences can never fit in {self.capacity}")
        if self._queue or self.running + n > self.capacity:
            future = asyncio.get_running_loop().create_future()
            self._queue.append((n, future))
            self.waiting += n
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():  # granted as we were cancelled
                    self._release(n)
                else:
                    self.waiting -= n
                    if (n, future) in self._queue:
                        self._queue.remove((n, future))
                    self._grant()  # the next in line may fit now
                raise
        else:
            self.running += n
        try:
            yield
        finally:
            self._release(n)

    def _release(self, n: int) -> None:
        self.running -= n
        self._grant()

    def _grant(self) -> None:
        # First come, first served: a large head of the queue is not overtaken by smaller ones.
        while self._queue and self.running + self._queue[0][0] <= self.capacity:
            n, future = self._queue.popleft()
            if future.done():  # cancelled, its task not yet resumed: it holds nothing
                continue
            # Moved from waiting to running at once: the woken task resumes later, and counting it
            # in both meanwhile would make the server look full.
            self.waiting -= n
            self.running += n
            future.set_result(None)
