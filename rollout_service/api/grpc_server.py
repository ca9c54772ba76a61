"""The gRPC front end: rollout.v1.RolloutService, plus standard health checking and reflection.

The servicer only converts messages and calls the backend (api/backend.py); every exception is turned into a status
code by `errors.grpc_status` in `_abort_with`, the one place that does it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from rollout_client._proto.rollout.v1 import rollout_pb2 as pb
from rollout_client._proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

from rollout_service.api import convert
from rollout_service.api.backend import Backend
from rollout_service.errors import Cancelled, DeadlineExceeded, InvalidArgument, RolloutError, grpc_status, public_message

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RolloutService"].full_name
# Large batches of long completions exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


async def _abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if not isinstance(exc, RolloutError):
        log.exception("internal error in a gRPC call", exc_info=exc)
    await context.abort(grpc_status(exc), public_message(exc))


@contextlib.asynccontextmanager
async def _deadline(context: grpc.aio.ServicerContext):
    """Enforce the client's deadline here too, so the engine requests are aborted the moment it passes."""
    remaining = context.time_remaining()
    try:
        async with asyncio.timeout(remaining):
            yield
    except TimeoutError:
        raise DeadlineExceeded(f"the call's deadline ({remaining:.3f} s) passed; its engine requests were aborted") from None


class RolloutServicer(pb_grpc.RolloutServiceServicer):
    def __init__(self, backend: Backend):
        self.backend = backend

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        try:
            req = convert.request_from_proto(request)
            async with _deadline(context):
                async with contextlib.aclosing(self.backend.generate(req)) as stream:
                    done = [c async for c in stream]
        except Exception as exc:
            await _abort_with(context, exc)
        done.sort(key=lambda c: c.prompt_index)
        return pb.GenerateResponse(completions=[convert.completion_to_proto(c) for c in done])

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        try:
            req = convert.request_from_proto(request)
            async with _deadline(context):
                async with contextlib.aclosing(self.backend.generate(req)) as stream:
                    async for c in stream:
                        yield pb.GenerateResponse(completions=[convert.completion_to_proto(c)])
        except Exception as exc:
            await _abort_with(context, exc)

    async def GetStatus(self, request: pb.GetStatusRequest, context) -> pb.GetStatusResponse:
        try:
            return convert.status_to_proto(await self.backend.status())
        except Exception as exc:
            await _abort_with(context, exc)

    async def PushWeights(self, request_iterator, context) -> pb.PushWeightsResponse:
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("kind") != "header":
                raise InvalidArgument("header", "the first message of a push must be its header")
            async with self.backend.begin_push(convert.push_header_from_proto(first.header)) as session:
                async for msg in request_iterator:
                    kind = msg.WhichOneof("kind")
                    if kind == "chunk":
                        await session.add_chunk(msg.chunk.tensor_index, msg.chunk.offset, msg.chunk.data)
                    elif kind == "declare":
                        session.declare([convert.tensor_spec_from_proto(t) for t in msg.declare.tensors])
                    elif kind == "commit":
                        result = await self.backend.commit_push(session)
                        break
                    else:
                        raise InvalidArgument("header", "a push has one header, its first message")
                else:
                    raise Cancelled("the stream ended before its commit message; nothing was applied")
        except Exception as exc:
            await _abort_with(context, exc)
        return convert.push_result_to_proto(result)


async def create_server(backend: Backend, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server on host:port (0 = a free port); returns it and the bound port."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
    )
    pb_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(backend), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.health = health_servicer  # so the runner can flip it to NOT_SERVING on shutdown
    return server, bound
