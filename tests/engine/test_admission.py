"""SequenceBudget without an engine: room is granted to calls in arrival order, a prompt at a time;
waiting is bounded by nothing but the caller; a call stopped part-way gives back what it held and
what it was granted but never took."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from rollout_service.engine.admission import SequenceBudget


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


class Call:
    """A call of `count` prompts of `n` sequences that takes each grant (and holds its room until
    `finish`), as RolloutEngine.generate does."""

    def __init__(self, budget: SequenceBudget, name: str, n: int, count: int, order: list[str]):
        self.budget, self.n, self.held = budget, n, 0
        self.task = asyncio.create_task(self._run(name, count, order))

    async def _run(self, name: str, count: int, order: list[str]):
        async with contextlib.aclosing(self.budget.admit(self.n, count)) as grants:
            async for _ in grants:
                order.append(name)
                self.held += 1

    def finish(self, prompts: int = 1) -> None:
        for _ in range(prompts):
            self.held -= 1
            self.budget.release(self.n)


def test_room_is_granted_in_arrival_order_and_a_large_head_is_not_overtaken():
    async def run():
        budget, order = SequenceBudget(4), []
        first = Call(budget, "a", 3, 1, order)
        await _settle()
        big = Call(budget, "big", 4, 1, order)  # must wait for all 4
        await _settle()
        small = Call(budget, "small", 1, 1, order)  # would fit now, but arrived after big
        await _settle()
        assert order == ["a"] and (budget.running, budget.waiting) == (3, 5) and budget.full
        first.finish()
        await _settle()
        assert order == ["a", "big"]
        big.finish()
        await asyncio.gather(first.task, big.task, small.task)
        small.finish()
        return order, budget

    order, budget = asyncio.run(run())
    assert order == ["a", "big", "small"] and (budget.running, budget.waiting) == (0, 0)


def test_a_call_keeps_its_place_until_all_its_prompts_are_in():
    """Two calls of three 1-sequence prompts on room for 2: the first call's prompts all go in
    before any of the second's, however the room frees."""
    async def run():
        budget, order = SequenceBudget(2), []
        first = Call(budget, "a", 1, 3, order)
        second = Call(budget, "b", 1, 3, order)
        await _settle()
        assert order == ["a", "a"] and (budget.running, budget.waiting) == (2, 4)
        for call in (first, first, first, second, second, second):
            call.finish()
            await _settle()
        await asyncio.gather(first.task, second.task)
        return order, budget

    order, budget = asyncio.run(run())
    assert order == ["a", "a", "a", "b", "b", "b"] and (budget.running, budget.waiting) == (0, 0)


def test_a_call_cancelled_before_its_turn_frees_its_place():
    async def run():
        budget, order = SequenceBudget(2), []
        holder = Call(budget, "holder", 2, 1, order)
        await _settle()
        waiter = Call(budget, "waiter", 2, 3, order)
        await _settle()
        assert budget.waiting == 6
        waiter.task.cancel()
        await _settle()
        assert waiter.task.cancelled() and budget.waiting == 0
        holder.finish()
        return budget

    budget = asyncio.run(run())
    assert (budget.running, budget.waiting) == (0, 0)


def test_more_than_the_capacity_at_once_is_refused():
    async def run():
        async for _ in SequenceBudget(2).admit(3, 1):
            pass

    with pytest.raises(ValueError, match="3 sequences can never fit in 2"):
        asyncio.run(run())


def test_cancelling_a_call_part_running_part_waiting_leaves_no_room_taken():
    """A deadline on a batch larger than the server: the call's running prompts are given back by
    the call, its granted-but-not-taken and waiting ones by the budget."""
    async def run():
        budget, order = SequenceBudget(4), []
        call = Call(budget, "a", 2, 5, order)
        other = Call(budget, "b", 4, 1, order)
        await _settle()
        assert (budget.running, budget.waiting, call.held) == (4, 10, 2)
        call.task.cancel()
        await asyncio.gather(call.task, return_exceptions=True)
        call.finish(call.held)  # the caller's own prompts end with it
        await _settle()
        assert order[-1] == "b" and (budget.running, budget.waiting) == (4, 0)
        other.finish()
        return budget

    budget = asyncio.run(run())
    assert (budget.running, budget.waiting) == (0, 0)


def test_a_server_whose_queue_holds_its_capacity_is_full():
    async def run():
        budget, order = SequenceBudget(4), []
        calls = [Call(budget, "a", 3, 1, order), Call(budget, "b", 3, 1, order)]  # 3 running, 3 waiting
        await _settle()
        full = budget.full
        for c in calls:
            c.task.cancel()
        await asyncio.gather(*(c.task for c in calls), return_exceptions=True)
        calls[0].finish()
        return full, budget

    full, budget = asyncio.run(run())
    assert full and (budget.running, budget.waiting) == (0, 0)


def test_a_granted_prompt_counts_as_running_only_even_before_its_call_resumes():
    async def run():
        budget, order = SequenceBudget(4), []
        holder = Call(budget, "holder", 4, 1, order)
        await _settle()
        waiter = Call(budget, "waiter", 4, 1, order)
        await _settle()
        assert (budget.running, budget.waiting) == (4, 4)
        holder.finish()
        # Granted: until its task runs, its 4 sequences are running, not both.
        counts = (budget.running, budget.waiting)
        await waiter.task
        waiter.finish()
        return counts

    assert asyncio.run(run()) == (4, 0)
