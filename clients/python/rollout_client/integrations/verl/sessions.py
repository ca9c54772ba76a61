"""One trajectory's turns on one service replica, though verl names every turn anew.

verl's load balancer keeps a trajectory on one server actor, but hands that actor a fresh uuid as
the request id of every turn (`LLMServerClient._vllm_request_id`), so the request id is no
session key. What does carry over is the tokens: verl's agent loops build each turn's prompt by
appending to the last one (prompt, response, then tool or user tokens). So a turn whose prompt
starts with an earlier turn's prompt + response continues that turn's session; anything else
starts a new one. Sequences are remembered by (length, rolling hash) of their tokens, the
longest match wins, and the oldest are forgotten past `capacity`.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Sequence

_MOD = (1 << 61) - 1
_BASE = 1_000_003


def _prefix_hashes(ids: Sequence[int]) -> list[int]:
    """hashes[k]: the rolling hash of ids[:k]."""
    hashes = [0]
    h = 0
    for token in ids:
        h = (h * _BASE + token + 1) % _MOD
        hashes.append(h)
    return hashes


class TrajectorySessions:
    def __init__(self, namespace: str, capacity: int = 100_000):
        self.namespace = namespace
        self.capacity = capacity
        self._sessions: OrderedDict[tuple[int, int], str] = OrderedDict()
        self._lengths: dict[int, int] = {}  # length -> how many remembered sequences have it

    def session_for(self, prompt_ids: Sequence[int]) -> str:
        """The session of the longest remembered sequence `prompt_ids` starts with, or a new one."""
        hashes = _prefix_hashes(prompt_ids)
        for length in sorted((n for n in self._lengths if n <= len(prompt_ids)), reverse=True):
            session = self._sessions.get((length, hashes[length]))
            if session is not None:
                return session
        return f"{self.namespace}-{uuid.uuid4().hex}"

    def record(self, session: str, sequence: Sequence[int]) -> None:
        """Remember that a later turn starting with `sequence` (a prompt + its response)
        continues `session`."""
        key = (len(sequence), _prefix_hashes(sequence)[-1])
        if key in self._sessions:
            self._sessions.move_to_end(key)
        else:
            self._lengths[key[0]] = self._lengths.get(key[0], 0) + 1
        self._sessions[key] = session
        while len(self._sessions) > self.capacity:
            (length, _), _ = self._sessions.popitem(last=False)
            self._lengths[length] -= 1
            if not self._lengths[length]:
                del self._lengths[length]
