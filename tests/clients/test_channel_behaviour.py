"""The Python client's channel behaviour (retries, deadlines, API key, wait_for_version) against a
test-double gRPC servicer: the real service cannot be made to fail on cue."""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import numpy as np
import pytest

from rollout_client import (
    NO_RETRY,
    AsyncRolloutClient,
    DeadlineExceededError,
    RetryPolicy,
    RolloutClient,
    UnavailableError,
)
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

FAST_RETRY = RetryPolicy(max_attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


class FlakyServicerForClientUnitTest(pb_grpc.RolloutServiceServicer):
    """Fails the first `failures` calls of each method with UNAVAILABLE; records what it saw."""

    def __init__(self, failures: int = 0, hold_generate: bool = False):
        self.failures = failures
        # When set, Generate answers only once the test sets `release` (at most 30 s later).
        self.release = threading.Event()
        if not hold_generate:
            self.release.set()
        self.calls: dict[str, int] = {}
        self.metadata: list[dict[str, str]] = []
        self.version = 0
        self.lock = threading.Lock()

    def _enter(self, method: str, context) -> None:
        with self.lock:
            self.calls[method] = self.calls.get(method, 0) + 1
            self.metadata.append(dict(context.invocation_metadata()))
            attempt = self.calls[method]
        if attempt <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"replica restarting (attempt {attempt})")

    def Generate(self, request, context):
        self._enter("Generate", context)
        self.release.wait(30)
        sample = pb.Sample(token_ids=[5], logprobs=[-0.5], weight_version=self.version)
        return pb.GenerateResponse(completions=[pb.Completion(prompt_index=0, samples=[sample])])

    def GetStatus(self, request, context):
        self._enter("GetStatus", context)
        with self.lock:
            self.version += 1  # every status call sees a newer version
            return pb.GetStatusResponse(weight_version=self.version)

    def PushWeights(self, request_iterator, context):
        for _ in request_iterator:
            pass
        self._enter("PushWeights", context)
        return pb.PushWeightsResponse(version=1)


@pytest.fixture
def serve():
    servers = []

    def start(servicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        pb_grpc.add_RolloutServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for s in servers:
        s.stop(0)


def test_idempotent_calls_are_retried_on_unavailable_until_they_succeed(serve):
    servicer = FlakyServicerForClientUnitTest(failures=2)
    with RolloutClient(serve(servicer), timeout=10, retry=FAST_RETRY) as client:
        assert client.generate(prompt_token_ids=[[1, 2]])[0].samples[0].token_ids == [5]
        assert client.status().weight_version >= 1
    assert servicer.calls == {"Generate": 3, "GetStatus": 3}


def test_without_retries_the_first_unavailable_reaches_the_caller_with_the_server_message(serve):
    servicer = FlakyServicerForClientUnitTest(failures=1)
    with RolloutClient(serve(servicer), timeout=10, retry=NO_RETRY) as client:
        with pytest.raises(UnavailableError, match="replica restarting"):
            client.generate(prompt_token_ids=[[1]])
    assert servicer.calls == {"Generate": 1}


def test_retries_give_up_after_max_attempts(serve):
    servicer = FlakyServicerForClientUnitTest(failures=10)
    with RolloutClient(serve(servicer), timeout=10, retry=FAST_RETRY) as client:
        with pytest.raises(UnavailableError):
            client.status()
    assert servicer.calls == {"GetStatus": 4}


def test_a_push_is_never_retried(serve):
    servicer = FlakyServicerForClientUnitTest(failures=1)
    with RolloutClient(serve(servicer), timeout=10, retry=FAST_RETRY) as client:
        with pytest.raises(UnavailableError):
            client.push_weights({"w": np.ones((1, 2), np.float32)}, progress=False)
    assert servicer.calls.get("PushWeights") == 1  # (a GetStatus before it looks for shared memory)


def test_a_call_past_its_deadline_raises_deadline_exceeded(serve):
    servicer = FlakyServicerForClientUnitTest(hold_generate=True)
    with RolloutClient(serve(servicer), timeout=10) as client:
        # The server cannot answer before `release`: only the deadline can end the call.
        with pytest.raises(DeadlineExceededError):
            client.generate(prompt_token_ids=[[1]], timeout=0.2)
        servicer.release.set()


def test_the_api_key_goes_as_a_bearer_token_on_every_call(serve):
    servicer = FlakyServicerForClientUnitTest()
    with RolloutClient(serve(servicer), api_key="sk-test") as client:
        client.status()
        client.generate(prompt_token_ids=[[1]])
    assert [m.get("authorization") for m in servicer.metadata] == ["Bearer sk-test"] * 2


def test_the_api_key_and_client_key_stay_out_of_repr_and_certificates_come_in_pairs():
    from rollout_client.channel import ChannelOptions

    options = ChannelOptions(api_key="sk-secret", client_certificate=b"cert", client_key=b"pem-secret")
    assert "sk-secret" not in repr(options) and "pem-secret" not in repr(options)
    with pytest.raises(ValueError, match="client_certificate and client_key go together"):
        ChannelOptions(client_certificate=b"cert")


def test_wait_for_version_polls_until_the_version_is_served(serve):
    servicer = FlakyServicerForClientUnitTest()
    with RolloutClient(serve(servicer)) as client:
        assert client.wait_for_version(3, timeout=10, poll_s=0.01).weight_version == 3


def test_wait_for_version_times_out_naming_the_versions(serve):
    servicer = FlakyServicerForClientUnitTest()
    with RolloutClient(serve(servicer)) as client:
        with pytest.raises(DeadlineExceededError, match=r"weight version 1000 not served after 0.3 s"):
            client.wait_for_version(1000, timeout=0.3, poll_s=0.05)


async def test_the_async_client_retries_and_waits_the_same_way(serve):
    servicer = FlakyServicerForClientUnitTest(failures=2)
    async with AsyncRolloutClient(serve(servicer), timeout=10, retry=FAST_RETRY) as client:
        assert (await client.generate(prompt_token_ids=[[1]]))[0].samples[0].logprobs.tolist() == [-0.5]
        assert (await client.wait_for_version(5, timeout=10, poll_s=0.01)).weight_version == 5
    assert servicer.calls["Generate"] == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_attempts=6), "max_attempts=6"),
        (dict(initial_backoff_s=0), "backoff"),
        (dict(codes=("UNAVALABLE",)), "UNAVALABLE"),
    ],
)
def test_a_bad_retry_policy_is_rejected_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetryPolicy(**kwargs)


def _failing_weights():
    yield "a", np.ones(4, np.float32)
    raise RuntimeError("gather failed at layer 3")


def test_an_error_in_the_callers_weights_reaches_the_caller_as_itself(serve):
    with RolloutClient(serve(FlakyServicerForClientUnitTest()), timeout=10) as client:
        with pytest.raises(RuntimeError, match="gather failed at layer 3"):
            client.push_weights(_failing_weights(), progress=False)
        with pytest.raises(TypeError, match="w: dtype int64"):
            client.push_weights({"w": np.zeros(3, np.int64)}, progress=False)


async def test_the_async_push_raises_the_callers_error_too(serve):
    async with AsyncRolloutClient(serve(FlakyServicerForClientUnitTest()), timeout=10) as client:
        with pytest.raises(RuntimeError, match="gather failed at layer 3"):
            await client.push_weights(_failing_weights(), progress=False)
