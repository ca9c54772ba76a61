"""The asyncio client's PushWeights goes over a blocking gRPC channel.

Why: grpc.aio loses the server's status when the server ends a client-streaming call while a
request message is still being written (a stale `expected_version`, a malformed header, a push
over the size limit all end the call early). The failed write overwrites the status the server sent
with INTERNAL "Internal error from Core" (grpc/grpc#36066; fix proposed in grpc/grpc#43486).
With 4 MiB chunks a write is nearly always in flight, so about one early refusal in ten came back
as INTERNAL (tests/clients/test_blocking_push.py measures it). The blocking API reports the
server's status. As a side effect the tensors are read and serialized on gRPC's thread, not on the
caller's event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc

from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc
from rollout_client.channel import ChannelOptions


class BlockingPush:
    """PushWeights for AsyncRolloutClient: the call runs on a blocking channel (opened on the
    first push) and is awaited without blocking the event loop; cancelling the await cancels it
    (the weights generator may still be finishing its current item on gRPC's thread for a moment)."""

    def __init__(self, options: ChannelOptions, address: str):
        self._options = options
        self._address = address
        self._channel: grpc.Channel | None = None

    async def __call__(
        self, requests: Iterator[pb.PushWeightsRequest], *, timeout: float | None, metadata
    ) -> pb.PushWeightsResponse:
        if self._channel is None:
            self._channel = self._options.channel(self._address)
        call = pb_grpc.RolloutServiceStub(self._channel).PushWeights.future(
            requests, timeout=timeout, metadata=metadata
        )
        loop = asyncio.get_running_loop()
        finished = loop.create_future()

        def wake(_call) -> None:  # runs on a gRPC thread
            if not loop.is_closed():
                loop.call_soon_threadsafe(lambda: finished.done() or finished.set_result(None))

        call.add_done_callback(wake)
        try:
            await finished
        except asyncio.CancelledError:
            call.cancel()
            raise
        return call.result()  # raises the grpc.RpcError carrying the server's status

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
