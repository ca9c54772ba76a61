"""HTTP calls that end when their client goes away or their deadline passes (both HTTP front ends)."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import Request

from rollout_service.errors import Cancelled, DeadlineExceeded


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def run_cancellable(request: Request, work, timeout: float | None):
    """Run `work` until it finishes, the client disconnects, or `timeout` passes."""
    task = asyncio.create_task(work)
    watcher = asyncio.create_task(_until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if watcher in done:
        raise Cancelled("the client disconnected; its engine requests were aborted")
    raise DeadlineExceeded(f"X-Request-Timeout ({timeout} s) passed; its engine requests were aborted")
