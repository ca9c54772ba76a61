"""Debug routes, mounted only with --debug-endpoints (tests hold generation with them; an operator
checks that a push landed). They call the engine replicas directly (serve/replicas.py), past the
backend the request path uses; the HTTP app mounts them as given (api/http_app.py).

GET  /v1/debug/engine-weights   the engine's weights as it computes with them (safetensors; see
                    RolloutWorkerExtension.rollout_snapshot); of one replica
POST /v1/debug/pause?mode=      hold generation on every engine until resume; running samples
POST /v1/debug/resume           finish (drain), are aborted (abort) or stay frozen (continue, the
                    default); new requests are admitted and wait. A push ends the hold (it pauses
                    and resumes by its own policy); replicas started later are not held.
                    &stepped=true: generation runs (resumed if held) until every request in the
                    engine has a token (so it is running, not queued), then is held
"""

from __future__ import annotations

from fastapi import APIRouter, Query
from fastapi.responses import Response

from rollout_service.config import InflightPolicy
from rollout_service.serve.replicas import Replicas, broadcast_all


def debug_router(replicas: Replicas) -> APIRouter:
    """The routes over `replicas`."""
    router = APIRouter(prefix="/v1/debug")

    @router.get("/engine-weights")
    async def engine_weights():
        return Response(await replicas.call_one("snapshot"), media_type="application/octet-stream")

    @router.post("/pause")
    async def pause(
        mode: InflightPolicy = Query("continue", description="What running samples do meanwhile."),
        stepped: bool = Query(False, description="Run (resumed if held) until every request in the engine has a token, then hold."),
    ):
        await broadcast_all(replicas, "pause", mode, stepped)
        return {"paused": mode}

    @router.post("/resume")
    async def resume():
        await broadcast_all(replicas, "resume")
        return {"paused": None}

    return router
