"""Splitting a batch across replicas without Ray: shares follow free room, parts merge back with
the caller's prompt indices, and one part's error ends the call."""

from __future__ import annotations

import asyncio
from array import array

import pytest

from rollout_service.serve.split import merged, shares
from rollout_service.types import Completion


def test_shares_follow_free_room_and_cover_the_batch_in_order():
    assert shares(512, {"a": 1024, "b": 1024}) == [("a", 0, 256), ("b", 256, 512)]
    assert shares(10, {"a": 300, "b": 100}) == [("a", 0, 8), ("b", 8, 10)]  # 7.5 / 2.5, remainders
    assert shares(4, {"a": -20, "b": 10, "c": 10}) == [("b", 0, 2), ("c", 2, 4)]  # a full replica gets none
    assert shares(5, {"a": 1000, "b": 1}) == [("a", 0, 5)]  # a share that rounds to nothing is no part


async def _stream(indices, fail_after=None):
    for k, i in enumerate(indices):
        if fail_after is not None and k == fail_after:
            raise RuntimeError("replica b failed")
        await asyncio.sleep(0)
        yield Completion(prompt_index=i, prompt_token_ids=array("i", [i]), samples=[])


def test_parts_merge_back_with_the_callers_prompt_indices():
    async def run():
        return [c.prompt_index async for c in merged([(0, _stream([1, 0])), (2, _stream([0, 2, 1]))])]

    assert sorted(asyncio.run(run())) == [0, 1, 2, 3, 4]


def test_an_error_in_one_part_ends_the_call():
    async def run():
        return [c async for c in merged([(0, _stream(range(50))), (50, _stream(range(5), fail_after=2))])]

    with pytest.raises(RuntimeError, match="replica b failed"):
        asyncio.run(run())
