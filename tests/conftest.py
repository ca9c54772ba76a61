"""Shared fixtures. Engines take about a minute to start, so each server configuration is started
once per test session, lazily, by the first test that needs it."""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest

from rollout_service.launcher import ServerProcess

MAX_MODEL_LEN = 256
# Run before anything else: the Ray Serve clusters (one node, then two) start Ray's nodes and two
# engine replicas each, and do so on a quiet machine instead of beside the session's engines (5 of
# them by the time its module came up in file order: ~17 GB of 24 in use, and once Ray's node did
# not start in CI).
FIRST = ("tests/serve/test_cluster.py", "tests/serve/test_two_nodes.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: not item.nodeid.startswith(FIRST))  # stable: order kept otherwise


@pytest.fixture
def cases(record_property) -> collections.Counter:
    """Counts a fuzz test's cases by outcome; the counts are its figures in RELIABILITY.md."""
    counted: collections.Counter = collections.Counter()
    yield counted
    for outcome, n in sorted(counted.items()):
        record_property(f"cases: {outcome}", n)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from rollout_service.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


def _server(
    request, tiny_model: Path, tmp_path_factory, name: str, *args: str, context: int = MAX_MODEL_LEN, env: dict | None = None,
) -> ServerProcess:
    log = tmp_path_factory.mktemp("logs") / f"{name}.log"
    server = ServerProcess.start(tiny_model, log, "--backend", "local", "--max-model-len", str(context), *args, env=env)
    request.addfinalizer(server.stop)
    return server


@pytest.fixture(scope="session")
def bf16_server(request, tiny_model, tmp_path_factory) -> ServerProcess:
    """bf16 engine, processed logprobs, a small in-flight limit so overload is easy to reach, and
    the debug endpoints, so tests can hold generation (tests/observe.py)."""
    return _server(request, tiny_model, tmp_path_factory, "bf16", "--max-inflight-sequences", "48", "--debug-endpoints")


@pytest.fixture(scope="session")
def fp32_server(request, tiny_model, tmp_path_factory) -> ServerProcess:
    return _server(request, tiny_model, tmp_path_factory, "fp32", "--dtype", "float32")


@pytest.fixture(scope="session")
def raw_fp32_head_server(request, tiny_model, tmp_path_factory) -> ServerProcess:
    """bf16 body with the LM head in float32, returning raw (unprocessed) logprobs."""
    return _server(
        request, tiny_model, tmp_path_factory, "raw", "--logprobs-mode", "raw", "--lm-head-fp32", "--no-http"
    )


@pytest.fixture(scope="session")
def int8_server(request, tiny_model, tmp_path_factory) -> ServerProcess:
    """W8A8 engine: the bf16 tiny model quantized at load."""
    cache = tmp_path_factory.mktemp("quant-cache")
    return _server(request, tiny_model, tmp_path_factory, "int8", "--quantization", "int8", "--cache-dir", str(cache), "--no-http")


@pytest.fixture(scope="session")
def bf16_client(bf16_server):
    from rollout_client import RolloutClient

    with RolloutClient(bf16_server.grpc_address, timeout=120) as client:
        yield client


@pytest.fixture(scope="session")
def trainer_server(request, tiny_model, tmp_path_factory, otlp_sink) -> ServerProcess:
    """bf16 engine that the client, adapter and GRPO tests push to; each test first pushes the
    weights it needs (as a trainer syncs before its first rollout), so their order does not matter.
    Without shared memory: the clients stream to it as to a server on another host, so the
    adapters' pushes keep the streamed path tested (the other servers take same-host pushes).
    Tool calls in chat completions are parsed (hermes), and the context holds an agent's prompt
    with its tool definitions, for the agent tests (tests/clients/test_agents.py). It logs JSON lines
    and sends its traces to `otlp_sink`, as an operator runs it (tests/observability)."""
    return _server(
        request, tiny_model, tmp_path_factory, "trainer", "--no-shared-memory", "--tool-call-parser", "hermes",
        "--log-format", "json", "--otlp-endpoint", otlp_sink.endpoint, context=1024,
        env={**os.environ, "OTEL_BSP_SCHEDULE_DELAY": "100"},  # spans leave within 0.1 s, not 5
    )


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 server (moto) on loopback for the session, its endpoint and credentials in the
    environment (tests/s3.py); `s3_server.new_bucket()` gives a test its own bucket."""
    from tests.s3 import start_s3

    s3 = start_s3()
    yield s3
    s3.stop()


@pytest.fixture(scope="session")
def otlp_sink():
    """An OTLP trace receiver the traced servers export to (tests/observability/otlp_sink.py): the
    single-process server of tests/observability and the Ray Serve deployment of test_cluster."""
    from tests.observability.otlp_sink import OtlpSink

    sink = OtlpSink()
    yield sink
    sink.stop()
