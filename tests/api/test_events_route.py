"""GET /v1/events (the Serve backend's version events) refuses an event id that is not one as a 400
naming `after`, before any coordinator sees it: an unchecked id was a 500 embedded and, with Redis,
a misleading 503 "redis unreachable". In-process over a test double of the coordinator's events."""

from __future__ import annotations

import httpx
import pytest

from rollout_service.api.access import Access
from rollout_service.api.http_app import create_app
from rollout_service.observe.metrics import Metered
from tests.api.test_guards import KEYS, RecordingBackendDouble, make_config


class EventsDouble:
    """Stands in for Coordinator.events: records what it was asked, returns one event."""

    def __init__(self):
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, after: str, count: int):
        self.asked.append((after, count))
        return [("7-0", {"kind": "version", "version": 7})]


@pytest.mark.parametrize("after", ["x", "1-", "-1", "1-2-3", "1.5", " 1", "1" * 21, str(2**64), f"5-{2**64}"])
async def test_an_event_id_that_is_not_one_is_400_naming_after(tiny_model, tmp_path, after):
    config = make_config(tiny_model, tmp_path)
    events = EventsDouble()
    app = create_app(Metered(RecordingBackendDouble(config)), Access.from_config(config), events)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x",
                                 headers={"authorization": f"Bearer {KEYS['eval']}"}) as http:
        reply = await http.get("/v1/events", params={"after": after})
        assert reply.status_code == 400 and reply.json()["error"]["field"] == "after", reply.text
        assert events.asked == []
        for good in ("0", "1733571234567-0", str(2**64 - 1)):
            reply = await http.get("/v1/events", params={"after": good})
            assert reply.status_code == 200 and reply.json()["events"][0]["version"] == 7, reply.text
    assert [a for a, _ in events.asked] == ["0", "1733571234567-0", str(2**64 - 1)]
