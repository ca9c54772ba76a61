"""Session affinity: one session's calls rank the same replica first; adding a replica moves only
the sessions that now hash to it."""

from __future__ import annotations

from dataclasses import dataclass

from rollout_service.serve.routing import rank_for_session


@dataclass(frozen=True)
class _ReplicaIdForRoutingTest:
    unique_id: str


@dataclass(frozen=True)
class FakeReplicaForRoutingTest:
    """Stands in for Serve's RunningReplica: the router reads only replica_id.unique_id."""

    replica_id: _ReplicaIdForRoutingTest


def replicas(*names: str):
    return [FakeReplicaForRoutingTest(_ReplicaIdForRoutingTest(n)) for n in names]


def test_a_session_ranks_the_same_replica_first_whatever_the_order():
    rs = replicas("a", "b", "c")
    first = rank_for_session("session-7", rs)[0]
    assert rank_for_session("session-7", list(reversed(rs)))[0] == first


def test_sessions_spread_and_adding_a_replica_moves_only_sessions_to_it():
    before = {f"s{i}": rank_for_session(f"s{i}", replicas("a", "b"))[0].replica_id.unique_id for i in range(400)}
    after = {f"s{i}": rank_for_session(f"s{i}", replicas("a", "b", "c"))[0].replica_id.unique_id for i in range(400)}
    assert 150 < sum(v == "a" for v in before.values()) < 250
    moved = [s for s in before if before[s] != after[s]]
    assert all(after[s] == "c" for s in moved)
    assert 90 < len(moved) < 180  # about a third
