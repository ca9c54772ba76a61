"""LocalBackend without an engine: what it hands the engine for a call."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rollout_service.api.backend import LocalBackend
from rollout_service.errors import InvalidArgument
from rollout_service.types import GenerateRequest


class RecordingEngineForBackendUnitTest:
    """Stands in for RolloutEngine: records the requests it is given, yields nothing."""

    def __init__(self):
        self.config = SimpleNamespace()
        self.requests: list[GenerateRequest] = []

    async def generate(self, req: GenerateRequest):
        self.requests.append(req)
        return
        yield


async def test_max_staleness_becomes_a_minimum_version_against_the_stores_committed_version():
    engine = RecordingEngineForBackendUnitTest()
    store = SimpleNamespace(current_version=lambda: 7)
    backend = LocalBackend(engine, SimpleNamespace(store=store))
    for body, expected in (({"max_staleness": 2}, 5), ({"max_staleness": 0, "min_weight_version": 8}, 8), ({}, 0)):
        req = GenerateRequest.parse({"prompts": [{"text": "x"}], **body})
        assert [c async for c in backend.generate(req)] == []
        assert engine.requests[-1].min_weight_version == expected and engine.requests[-1].max_staleness is None


async def test_a_minimum_version_beyond_the_next_one_is_refused_before_the_engine():
    """Committed 7: a call may wait for 8 (the next push), never for 9 or 2**63, which would hold a
    version-gated slot until max_version_wait_s for a version no push has begun."""
    engine = RecordingEngineForBackendUnitTest()
    backend = LocalBackend(engine, SimpleNamespace(store=SimpleNamespace(current_version=lambda: 7)))
    for version in (9, 2**63, 2**64 - 1):
        req = GenerateRequest.parse({"prompts": [{"text": "x"}], "min_weight_version": version})
        with pytest.raises(InvalidArgument, match=f"min_weight_version: {version} is beyond the next weight version.*at most 8"):
            [c async for c in backend.generate(req)]
    assert engine.requests == []
