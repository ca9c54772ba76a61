"""A push whose sender goes silent is ended, so it cannot hold the push lock (and its buffers) forever.

Only the wait for the sender's next message counts: the server's own time between messages (a
conversion, flow control) does not.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from typing import TypeVar

from rollout_service.errors import DeadlineExceeded

T = TypeVar("T")


async def paced(items: AsyncIterable[T], idle_s: float, what: str) -> AsyncIterator[T]:
    """`items`, failing with DeadlineExceeded when the next one takes more than `idle_s` to come."""
    iterator = aiter(items)
    while True:
        try:
            async with asyncio.timeout(idle_s):
                item = await anext(iterator)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DeadlineExceeded(
                f"{what}: nothing arrived for {idle_s:g} s (push_idle_timeout_s); the push was aborted and nothing applied"
            ) from None
        yield item
