"""Routing Generate calls to replicas: Serve's power-of-two-choices, plus session affinity, plus
parts of a split batch (serve/split.py) sent to the replica they were cut for.

A request with a `session_id` (the turns of one multi-turn rollout) ranks the replicas by
rendezvous hashing of (session, replica): the same replica comes first while the replica set is
unchanged, so later turns find their prefix in its cache; when a replica is added or removed only
the sessions hashed to it move. A full first choice falls through to the next rank, as Serve does.
"""

from __future__ import annotations

import hashlib

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import PendingRequest, RunningReplica


def _score(session_id: str, replica_id: str) -> bytes:
    return hashlib.blake2b(f"{session_id}\0{replica_id}".encode(), digest_size=8).digest()


def session_of(pending: PendingRequest | None) -> str:
    if pending is None or not pending.args:
        return ""
    return getattr(pending.args[0], "session_id", "") or ""


def target_of(pending: PendingRequest | None) -> str:
    """The replica a part of a split batch was cut for (generate_stream's second argument)."""
    if pending is None or pending.metadata.call_method != "generate_stream" or len(pending.args) < 2:
        return ""
    return pending.args[1] or ""


def rank_for_session(session_id: str, replicas: list[RunningReplica]) -> list[RunningReplica]:
    return sorted(replicas, key=lambda r: _score(session_id, r.replica_id.unique_id), reverse=True)


class SessionAffinityRouter(PowerOfTwoChoicesRequestRouter):
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        target = target_of(pending_request)
        chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
        if chosen:
            return [chosen]
        session = session_of(pending_request)  # a target gone meanwhile: routed as any request
        if not session or len(candidate_replicas) < 2:
            return await super().choose_replicas(candidate_replicas, pending_request)
        return [[r] for r in rank_for_session(session, candidate_replicas)]
