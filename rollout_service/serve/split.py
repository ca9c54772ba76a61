"""Splitting one large Generate across the engine replicas, and merging the parts back.

A verl batch (256-1,024 prompts x n=8-16) sent to one replica leaves the others idle. A batch
larger than one engine step (`max_num_seqs` sequences) is cut into contiguous runs of prompts, one
per replica, each sized in proportion to the replica's free room (max_inflight_sequences minus its
sequences in flight and waiting; the ingress refuses the call when no replica has any), and each part is routed to its replica
(serve/routing.py reads the target). Completions stream back as they finish, with `prompt_index`
into the caller's batch.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

from rollout_service.types import Completion, GenerateRequest


def shares(prompts: int, free: dict[str, int]) -> list[tuple[str, int, int]]:
    """(replica id, first prompt, end) runs covering `prompts` prompts, in proportion to `free`
    (largest remainder); replicas whose share rounds to nothing get no part. Each replica takes
    its part even beyond its free room: it runs it in parts (engine/admission.py)."""
    weights = {r: max(f, 0) for r, f in free.items()}  # a full replica (<= 0) gets no part
    total = sum(weights.values())
    if not total:
        raise ValueError(f"no replica has free room: {free}")
    exact = {r: prompts * w / total for r, w in weights.items()}
    counts = {r: int(x) for r, x in exact.items()}
    for r in sorted(exact, key=lambda r: exact[r] - counts[r], reverse=True)[: prompts - sum(counts.values())]:
        counts[r] += 1
    runs, start = [], 0
    for r, count in counts.items():
        if count:
            runs.append((r, start, start + count))
            start += count
    return runs


def part(req: GenerateRequest, start: int, end: int) -> GenerateRequest:
    return req.model_copy(update={"prompts": req.prompts[start:end]})


async def merged(streams: list[tuple[int, AsyncIterator[Completion]]]) -> AsyncIterator[Completion]:
    """The completions of every (offset, stream) as they arrive, prompt_index shifted by offset;
    the first error stops the rest."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(offset: int, stream: AsyncIterator[Completion]) -> None:
        try:
            async for c in stream:
                await queue.put(dataclasses.replace(c, prompt_index=c.prompt_index + offset))
            await queue.put(done)
        except Exception as exc:  # noqa: BLE001 -- handed to the consumer
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(offset, s)) for offset, s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
