"""LocalBackend without an engine: what it hands the engine for a call."""

from __future__ import annotations

from types import SimpleNamespace

from rollout_service.api.backend import LocalBackend
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
    for body, expected in (({"max_staleness": 2}, 5), ({"max_staleness": 0, "min_weight_version": 9}, 9), ({}, 0)):
        req = GenerateRequest.parse({"prompts": [{"text": "x"}], **body})
        assert [c async for c in backend.generate(req)] == []
        assert engine.requests[-1].min_weight_version == expected and engine.requests[-1].max_staleness is None
