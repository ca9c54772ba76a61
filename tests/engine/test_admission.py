"""SequenceBudget without an engine: room is granted in arrival order, waiting is bounded by
nothing but the caller, and a cancelled waiter leaves no trace."""

from __future__ import annotations

import asyncio

import pytest

from rollout_service.engine.admission import SequenceBudget


async def _settle():
    for _ in range(5):
        await asyncio.sleep(0)


def test_room_is_granted_in_arrival_order_and_a_large_head_is_not_overtaken():
    async def run():
        budget, order = SequenceBudget(4), []
        release = asyncio.Event()

        async def take(name: str, n: int):
            async with budget.hold(n):
                order.append(name)
                await release.wait()

        first = asyncio.create_task(take("a", 3))
        await _settle()
        big = asyncio.create_task(take("big", 4))  # must wait for all 4
        await _settle()
        small = asyncio.create_task(take("small", 1))  # would fit now, but arrived after big
        await _settle()
        assert order == ["a"] and (budget.running, budget.waiting) == (3, 5) and budget.full
        release.set()
        await asyncio.gather(first, big, small)
        return order, budget

    order, budget = asyncio.run(run())
    assert order == ["a", "big", "small"] and (budget.running, budget.waiting) == (0, 0)


def test_a_waiter_cancelled_before_its_turn_frees_its_place():
    async def run():
        budget = SequenceBudget(2)
        async with budget.hold(2):
            waiter = asyncio.create_task(budget.hold(2).__aenter__())
            await _settle()
            assert budget.waiting == 2
            waiter.cancel()
            await _settle()
            assert waiter.cancelled() and budget.waiting == 0
        return budget

    budget = asyncio.run(run())
    assert (budget.running, budget.waiting) == (0, 0)


def test_more_than_the_capacity_at_once_is_refused():
    async def run():
        async with SequenceBudget(2).hold(3):
            pass

    with pytest.raises(ValueError, match="3 sequences can never fit in 2"):
        asyncio.run(run())


def test_cancelling_a_call_part_running_part_waiting_leaves_no_room_taken():
    """The holder and the waiter are cancelled together (a deadline on a batch larger than the
    server): the holder's release must not grant room to the cancelled waiter."""
    async def run():
        budget = SequenceBudget(4)

        async def take(n: int):
            async with budget.hold(n):
                await asyncio.Event().wait()

        tasks = [asyncio.create_task(take(4)), asyncio.create_task(take(4))]
        await _settle()
        assert (budget.running, budget.waiting) == (4, 4)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return budget

    budget = asyncio.run(run())
    assert (budget.running, budget.waiting) == (0, 0)


def test_a_server_whose_queue_holds_its_capacity_is_full():
    async def run():
        budget = SequenceBudget(4)

        async def take(n: int):
            async with budget.hold(n):
                await asyncio.Event().wait()

        tasks = [asyncio.create_task(take(3)) for _ in range(2)]  # 3 running, 3 waiting
        await _settle()
        full = budget.full
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return full

    assert asyncio.run(run())


def test_a_granted_waiter_counts_as_running_only_even_before_it_resumes():
    async def run():
        budget = SequenceBudget(4)
        async with budget.hold(4):
            waiter = asyncio.create_task(budget.hold(4).__aenter__())
            await _settle()
            assert (budget.running, budget.waiting) == (4, 4)
        # Released: the waiter is granted; until its task runs, its 4 sequences are running, not both.
        counts = (budget.running, budget.waiting)
        await waiter
        return counts

    assert asyncio.run(run()) == (4, 0)
