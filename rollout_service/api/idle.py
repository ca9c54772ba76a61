"""A sender that goes silent, or trickles, is cut off, so it cannot hold the push lock, a Generate
slot or their buffers for as long as it likes.

Two bounds on the time spent waiting for the sender: `idle_s` (push_idle_timeout_s) for any one
item, and in all `idle_s` plus the bytes it said it would send at MIN_BODY_BYTES_PER_S (a push's
declared tensors, a body's Content-Length or its limit). Only the wait for the sender counts: the
server's own time between items (a conversion, flow control) does not.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterable, AsyncIterator
from typing import TypeVar

from rollout_service.errors import DeadlineExceeded

T = TypeVar("T")

# The slowest a sender may average over its whole body: a trainer on any network sends a hundred
# times faster, while one byte a minute (under any idle timeout) would hold a push for ever.
MIN_BODY_BYTES_PER_S = 1 << 20


class Pace:
    """The waiting a sender is allowed, and what it has used; `expect` sets its total from the bytes
    it announced."""

    def __init__(self, idle_s: float, what: str):
        self.idle_s = idle_s
        self.what = what
        self.allowed_s = math.inf
        self.waited_s = 0.0

    def expect(self, nbytes: int) -> None:
        self.allowed_s = self.idle_s + nbytes / MIN_BODY_BYTES_PER_S

    async def wait(self, awaitable):
        """The result of `awaitable` (a wait for the sender), or DeadlineExceeded once a bound passes."""
        left = self.allowed_s - self.waited_s
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            async with asyncio.timeout(min(self.idle_s, max(left, 0.0))):
                return await awaitable
        except TimeoutError:
            if left < self.idle_s:
                raise DeadlineExceeded(
                    f"{self.what}: the sender waited for in all passed {self.allowed_s:.0f} s (push_idle_timeout_s + "
                    f"its bytes at {MIN_BODY_BYTES_PER_S >> 20} MiB/s); it was aborted and nothing applied"
                ) from None
            raise DeadlineExceeded(
                f"{self.what}: nothing arrived for {self.idle_s:g} s (push_idle_timeout_s); it was aborted and nothing applied"
            ) from None
        finally:
            self.waited_s += loop.time() - start


async def enforce_pace(items: AsyncIterable[T], pace: Pace) -> AsyncIterator[T]:
    """`items`, each waited for within `pace`."""
    iterator = aiter(items)
    while True:
        try:
            item = await pace.wait(anext(iterator))
        except StopAsyncIteration:
            return
        yield item
