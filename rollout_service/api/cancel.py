"""HTTP calls that end when their client goes away or their deadline passes (both HTTP front ends)."""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import Request

from rollout_service.errors import Cancelled, DeadlineExceeded
from rollout_service.types import Completion, GenerateRequest


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


async def generate_all(request: Request, backend, req: GenerateRequest, timeout: float | None) -> list[Completion]:
    """Every Completion of `req` from `backend`, in prompt order, ended as run_cancellable ends it."""

    async def work() -> list[Completion]:
        async with contextlib.aclosing(backend.generate(req)) as stream:
            done = [c async for c in stream]
        return sorted(done, key=lambda c: c.prompt_index)

    return await run_cancellable(request, work(), timeout)
