"""The fan-out of a push's parts (serve/fanout.py) over a test double of the replica set: parts go
to every replica in order, the conversion thread waits once WINDOW_PARTS are out, a replica's
failure stops the handing out and fails the push at its commit, and closing frees a waiting
thread. (The real replicas take parts in tests/serve/test_cluster.py and test_two_nodes.py.)"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from rollout_service.errors import EngineUnavailable
from rollout_service.serve import fanout as fanout_module
from rollout_service.serve.fanout import WINDOW_PARTS, Fanout


class ReplicasDoubleForFanoutTest:
    """Two replicas whose `take` waits until the test lets it through (`gate`), or fails."""

    def __init__(self):
        self.taken: list[str] = []
        self.shared: list[Path] = []
        self.gate = asyncio.Event()
        self.fail_on: str | None = None

    def share(self, part: Path) -> Path:
        self.shared.append(part)
        return part

    async def broadcast(self, method: str, *args) -> list:
        assert method == "take"
        part = args[3]
        await self.gate.wait()
        if part == self.fail_on:
            return [None, EngineUnavailable(f"replica r2 failed to stage {part}")]
        self.taken.append(part)
        return [None, None]


def write_parts(fanout: Fanout, count: int) -> threading.Thread:
    """A conversion thread writing `count` parts."""

    def run():
        for i in range(count):
            fanout.part_written(Path(f"/staging/part-{i:05d}.safetensors"), [f"t{i}"])

    thread = threading.Thread(target=run)
    thread.start()
    return thread


async def until(condition, what: str) -> None:
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_parts_go_to_every_replica_in_order_and_the_writer_waits_for_room():
    replicas = ReplicasDoubleForFanoutTest()
    fanout = Fanout(replicas, "p", 1, None)
    thread = write_parts(fanout, WINDOW_PARTS + 2)
    await until(lambda: len(replicas.shared) == WINDOW_PARTS, "the window to fill")
    await asyncio.sleep(0.05)
    assert len(replicas.shared) == WINDOW_PARTS and thread.is_alive()  # no room: the writer waits
    replicas.gate.set()
    await asyncio.to_thread(thread.join)
    parts = await fanout.finish()
    assert replicas.taken == [f"part-{i:05d}.safetensors" for i in range(WINDOW_PARTS + 2)]
    assert parts == {f"t{i}": f"part-{i:05d}.safetensors" for i in range(WINDOW_PARTS + 2)}


async def test_a_replica_failing_a_part_stops_the_handing_out_and_fails_the_commit():
    replicas = ReplicasDoubleForFanoutTest()
    replicas.fail_on = "part-00001.safetensors"
    replicas.gate.set()
    fanout = Fanout(replicas, "p", 1, None)
    thread = write_parts(fanout, 2)
    await asyncio.to_thread(thread.join)
    await until(lambda: fanout._error is not None, "the failure")
    await asyncio.to_thread(write_parts(fanout, 3).join)  # written after it: not handed out
    with pytest.raises(EngineUnavailable, match="replica r2 failed to stage part-00001"):
        await fanout.finish()
    assert len(replicas.shared) == 2


async def test_a_part_not_taken_in_time_fails_the_push(monkeypatch):
    monkeypatch.setattr(fanout_module, "TAKE_TIMEOUT_S", 0.05)
    replicas = ReplicasDoubleForFanoutTest()  # the gate never opens: a replica that hangs
    fanout = Fanout(replicas, "p", 1, None)
    await asyncio.to_thread(write_parts(fanout, 1).join)
    with pytest.raises(EngineUnavailable, match="did not take part part-00000.safetensors"):
        await fanout.finish()


async def test_closing_frees_a_writer_waiting_for_room():
    replicas = ReplicasDoubleForFanoutTest()
    fanout = Fanout(replicas, "p", 1, None)
    thread = write_parts(fanout, WINDOW_PARTS + 3)
    await until(lambda: len(replicas.shared) == WINDOW_PARTS, "the window to fill")
    await fanout.close()  # the push ended (cancelled, refused) with parts out
    await asyncio.to_thread(thread.join, 5)
    assert not thread.is_alive() and len(replicas.shared) == WINDOW_PARTS
