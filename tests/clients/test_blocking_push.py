"""A push the server refuses mid-stream reaches an asyncio caller with the server's status.

grpc.aio overwrites that status with INTERNAL "Internal error from Core" when a request message is
still being written as the server ends the call (grpc/grpc#36066); AsyncRolloutClient pushes over
a blocking channel instead (rollout_client.blocking_push). The server here is a test double that
refuses every push on its first message, as the real one refuses a stale expected_version."""

from __future__ import annotations

import asyncio
import warnings

import grpc
import numpy as np
import pytest

from rollout_client import AsyncRolloutClient, FailedPreconditionError, push
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

PUSHES = 40
# 16 chunks of 4 MiB: the client is still writing when the refusal arrives.
WEIGHTS = {f"layer{i}.weight": np.zeros((1024, 1024), dtype=np.float32) for i in range(16)}


class RefusingServicerForClientUnitTest(pb_grpc.RolloutServiceServicer):
    """Ends a PushWeights with an expected_version on its first message with FAILED_PRECONDITION;
    reads any other push to its end, and records when that push's stream ended."""

    def __init__(self):
        self.unfenced_push_started = asyncio.Event()
        self.unfenced_push_ended = asyncio.Event()

    async def PushWeights(self, request_iterator, context):
        try:
            async for request in request_iterator:
                self.unfenced_push_started.set()
                if request.header.HasField("expected_version"):
                    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "expected_version: 1 is stale (serving 2)")
        finally:
            self.unfenced_push_ended.set()
        return pb.PushWeightsResponse()


@pytest.fixture
async def servicer():
    return RefusingServicerForClientUnitTest()


@pytest.fixture
async def refusing_server(servicer):
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20)])
    pb_grpc.add_RolloutServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(None)


async def test_a_refused_push_raises_the_servers_status_every_time(refusing_server):
    async with AsyncRolloutClient(refusing_server, timeout=30) as client:
        for _ in range(PUSHES):
            with pytest.raises(FailedPreconditionError, match="expected_version: 1 is stale"):
                await client.push_weights(WEIGHTS, expected_version=1, progress=False)


async def test_grpc_aio_itself_misreports_a_refused_push_sometimes(refusing_server):
    """The breakage the workaround is for, counted (a grpc release with the fix reports none)."""
    codes: dict[str, int] = {}
    async with grpc.aio.insecure_channel(refusing_server, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.RolloutServiceStub(ch)
        for _ in range(PUSHES):
            with pytest.raises(grpc.RpcError) as err:
                await stub.PushWeights(push.requests(WEIGHTS, expected_version=1, progress=False))
            codes[err.value.code().name] = codes.get(err.value.code().name, 0) + 1
    assert set(codes) <= {"FAILED_PRECONDITION", "INTERNAL"}, codes
    if codes.get("INTERNAL"):
        warnings.warn(f"grpc.aio reported INTERNAL for {codes['INTERNAL']} of {PUSHES} refused pushes", stacklevel=1)


async def test_cancelling_an_awaited_push_cancels_the_call(refusing_server, servicer):
    """Cancelling an awaited push cancels the call, which does not go on streaming on its thread."""
    def endless():
        for i in range(1_000_000):
            yield f"w{i}", np.zeros((256, 256), dtype=np.float32)

    async with AsyncRolloutClient(refusing_server, timeout=60) as client:
        task = asyncio.ensure_future(client.push_weights(endless(), progress=False))
        await asyncio.wait_for(servicer.unfenced_push_started.wait(), 60)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(servicer.unfenced_push_ended.wait(), 30)
