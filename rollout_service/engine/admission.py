"""How many sequences the engine holds at once (`max_inflight_sequences`), and who waits for room.

A Generate of any size is served: its prompts enter the engine as room frees up, first come first
served across calls, so a verl batch of 4,096 sequences on a server taking 1,024 runs in parts
instead of being refused. A call is refused (Overloaded, RESOURCE_EXHAUSTED) only when the server
is momentarily full as it arrives -- the sequences the engine holds plus those already waiting
make a full server's worth: a retry then helps, which the refusal says.

A call waits in line as one entry for all its prompts, and is granted room a prompt at a time
(`admit`): a waiting prompt costs nothing but its token ids, where a task per prompt (what the
engine made before) cost about 9 KB each -- 18x a batch's wire size, 600 MB for 65,536 prompts.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator
from dataclasses import dataclass, field


@dataclass(eq=False)
class _Waiter:
    n: int  # sequences per prompt
    remaining: int  # prompts not yet granted room
    granted: int = 0  # prompts granted room, not yet handed to the call
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class SequenceBudget:
    """A FIFO counting semaphore over sequences, granted to calls in arrival order."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.running = 0  # sequences holding room (in the engine)
        self.waiting = 0  # sequences of admitted calls waiting for room
        self._queue: collections.deque[_Waiter] = collections.deque()

    @property
    def full(self) -> bool:
        # Waiting sequences count: with n not dividing the capacity, `running` alone may never
        # reach it, and calls would queue without bound.
        return self.running + self.waiting >= self.capacity

    async def admit(self, n: int, count: int) -> AsyncIterator[None]:
        """Yield once for each of `count` prompts of `n` sequences, as room for it is granted (in
        arrival order across calls: this call keeps its place until all its prompts are in). The
        caller owns each yielded prompt's room and gives it back with `release(n)`; room granted
        but not yet yielded when the caller stops (cancelled, closed) goes back here."""
        if n > self.capacity:
            raise ValueError(f"{n} sequences can never fit in {self.capacity}")
        waiter = _Waiter(n, count)
        self._queue.append(waiter)
        self.waiting += n * count
        self._grant()
        try:
            while waiter.remaining or waiter.granted:
                if not waiter.granted:
                    waiter.wake.clear()
                    await waiter.wake.wait()
                while waiter.granted:
                    waiter.granted -= 1
                    yield
        finally:
            self.running -= n * waiter.granted  # granted, never handed over
            self.waiting -= n * waiter.remaining
            waiter.granted = waiter.remaining = 0
            if waiter in self._queue:
                self._queue.remove(waiter)
            self._grant()  # the next in line may fit now

    def release(self, n: int) -> None:
        self.running -= n
        self._grant()

    def _grant(self) -> None:
        # First come, first served: a large head of the queue is not overtaken by smaller ones.
        while self._queue and self.running + self._queue[0].n <= self.capacity:
            head = self._queue[0]
            # Moved from waiting to running at once: the woken call resumes later, and counting
            # its prompt in both meanwhile would make the server look full.
            self.waiting -= head.n
            self.running += head.n
            head.remaining -= 1
            head.granted += 1
            head.wake.set()
            if not head.remaining:
                self._queue.popleft()
