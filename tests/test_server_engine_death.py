"""A dead engine: gRPC health turns NOT_SERVING, calls get UNAVAILABLE, /healthz 503 — so an
orchestrator replaces the server instead of routing to it."""

import signal
import time

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rollout_client import RolloutClient, UnavailableError
from rollout_service.launcher import ServerProcess

pytestmark = pytest.mark.engine


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service="rollout.v1.RolloutService")
        return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


@pytest.mark.reliability("fault")
def test_killed_engine_core_makes_the_server_report_not_serving(tiny_model, tmp_path, record_property):
    """SIGKILL the engine process of a single-process server: its health check turns NOT_SERVING
    (HTTP /healthz 503) and calls get UNAVAILABLE, so an orchestrator replaces it."""
    server = ServerProcess.start(tiny_model, tmp_path / "server.log", "--backend", "local", "--max-model-len", "128")
    try:
        assert _health(server.grpc_address) == health_pb2.HealthCheckResponse.SERVING
        with RolloutClient(server.grpc_address, timeout=30) as client:
            client.generate(["alive"], max_tokens=2)
            cores = [p for p in psutil.Process(server.proc.pid).children(recursive=True) if "EngineCor" in p.name()]
            assert cores, "no EngineCore process found"
            cores[0].send_signal(signal.SIGKILL)
            killed = time.monotonic()

            deadline = time.monotonic() + 60
            while _health(server.grpc_address) != health_pb2.HealthCheckResponse.NOT_SERVING:
                assert time.monotonic() < deadline, "health still SERVING a minute after the engine died"
                time.sleep(0.5)
            record_property("engine killed to NOT_SERVING (s)", time.monotonic() - killed)
            with pytest.raises(UnavailableError):
                client.generate(["dead"], max_tokens=2)
        r = httpx.get(f"{server.http_url}/healthz", timeout=10)
        assert r.status_code == 503 and r.json()["error"]["code"] == "UNAVAILABLE"
    finally:
        server.stop()
