"""The backend (serve/backend.py) without an engine: what it hands a replica for a call."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rollout_service.serve.backend import Backend
from rollout_service.errors import InvalidArgument
from rollout_service.types import GenerateRequest


class RecordingReplicasForBackendUnitTest:
    """Stands in for the replica set (serve/replicas.py): records the requests it is given, yields nothing."""

    def __init__(self):
        self.requests: list[GenerateRequest] = []

    def generate(self, req: GenerateRequest, replica_id: str = "", carried: dict | None = None):
        self.requests.append(req)
        return self._nothing()

    async def _nothing(self):
        return
        yield


def backend_over(replicas, committed: int) -> Backend:
    config = SimpleNamespace(max_num_seqs=256)
    return Backend(config, replicas, SimpleNamespace(store=SimpleNamespace(current_version=lambda: committed)))


async def test_max_staleness_becomes_a_minimum_version_against_the_stores_committed_version():
    engine = RecordingReplicasForBackendUnitTest()
    backend = backend_over(engine, 7)
    for body, expected in (({"max_staleness": 2}, 5), ({"max_staleness": 0, "min_weight_version": 8}, 8), ({}, 0)):
        req = GenerateRequest.parse({"prompts": [{"text": "x"}], **body})
        assert [c async for c in backend.generate(req)] == []
        assert engine.requests[-1].min_weight_version == expected and engine.requests[-1].max_staleness is None


async def test_a_minimum_version_beyond_the_next_one_is_refused_before_the_engine():
    """Committed 7: a call may wait for 8 (the next push), never for 9 or 2**63, which would hold a
    version-gated slot until max_version_wait_s for a version no push has begun."""
    engine = RecordingReplicasForBackendUnitTest()
    backend = backend_over(engine, 7)
    for version in (9, 2**63, 2**64 - 1):
        req = GenerateRequest.parse({"prompts": [{"text": "x"}], "min_weight_version": version})
        with pytest.raises(InvalidArgument, match=f"min_weight_version: {version} is beyond the next weight version.*at most 8"):
            [c async for c in backend.generate(req)]
    assert engine.requests == []
