"""generate_stream on both clients against a test-double servicer: completions as each prompt
finishes, a failure mid-stream as a typed error, and a caller that stops early cancels the call."""

from __future__ import annotations

import threading

import grpc
import pytest

from rollout_client import AsyncRolloutClient, ResourceExhaustedError, RolloutClient
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc
from tests.clients.test_channel_behaviour import serve  # noqa: F401  (its test-double server fixture)


class StreamingServicerForClientUnitTest(pb_grpc.RolloutServiceServicer):
    """Answers each prompt in its own response, last prompt first; fails after the first when a
    prompt's text is "fail"; records whether a stream was cancelled before its end."""

    def __init__(self):
        self.cancelled = threading.Event()

    def GenerateStream(self, request, context):
        context.add_callback(lambda: context.is_active() or self.cancelled.set())
        for index in reversed(range(len(request.prompts))):
            sample = pb.Sample(token_ids=[index], logprobs=[-1.0], weight_version=7)
            yield pb.GenerateResponse(completions=[pb.Completion(prompt_index=index, samples=[sample])])
            if request.prompts[0].text == "fail":
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many sequences in flight")
            if request.prompts[0].text == "slow":
                context.is_active() and self.cancelled.wait(30)


@pytest.fixture
def servicer():
    return StreamingServicerForClientUnitTest()


@pytest.fixture
def address(serve, servicer):
    return serve(servicer)


async def stream(kind: str, address: str, prompts: list[str], take: int | None = None) -> list[int]:
    """The prompt indices `kind`'s generate_stream yields (the first `take` of them)."""
    seen: list[int] = []
    if kind == "blocking":
        with RolloutClient(address, timeout=10) as client:
            for completion in client.generate_stream(prompts, max_tokens=1):
                seen.append(completion.prompt_index)
                if len(seen) == take:
                    break
        return seen
    async with AsyncRolloutClient(address, timeout=10) as client:
        async for completion in client.generate_stream(prompts, max_tokens=1):
            seen.append(completion.prompt_index)
            if len(seen) == take:
                break
    return seen


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_completions_come_as_each_prompt_finishes(address, kind):
    assert await stream(kind, address, ["a", "b", "c"]) == [2, 1, 0]


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_a_failure_mid_stream_is_a_typed_error_after_what_finished(address, kind):
    with pytest.raises(ResourceExhaustedError, match="too many sequences in flight"):
        await stream(kind, address, ["fail", "b"])


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_a_caller_that_stops_early_cancels_the_call(address, servicer, kind):
    assert await stream(kind, address, ["slow", "b"], take=1) == [1]
    assert servicer.cancelled.wait(10)


async def test_an_unknown_sampling_option_fails_when_the_stream_is_first_read(address):
    with RolloutClient(address) as client:
        calls = client.generate_stream(["a"], temprature=1.0)  # nothing checked or sent yet
        with pytest.raises(TypeError, match="temprature"):
            next(calls)
    async with AsyncRolloutClient(address) as client:
        calls = client.generate_stream(["a"], temprature=1.0)
        with pytest.raises(TypeError, match="temprature"):
            await calls.__anext__()
