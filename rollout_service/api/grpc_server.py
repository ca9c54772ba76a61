"""The gRPC front end: rollout.v1.RolloutService, plus standard health checking and reflection.

The servicer only converts messages and calls the backend (serve/backend.py); every exception is turned into a status
code by `errors.grpc_status` in `_abort_with`, the one place that does it. `AccessInterceptor` checks each call's
API key and role (api/access.py) before its request is even deserialized; health stays open for probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc

from rollout_service.api import messages
from rollout_service.api.access import Access, Operation, grpc_operation
from rollout_service.api.idle import Pace, enforce_pace
from rollout_service.api.limits import MIB, PushBudget, check_generate, check_generate_message, check_whole
from rollout_service.config import ServerConfig
from rollout_service.errors import (
    Cancelled,
    DeadlineExceeded,
    InvalidArgument,
    RolloutError,
    grpc_status,
    grpc_trailers,
    public_message,
)
from rollout_service.observe.call_scope import CallInterceptor
from rollout_service.observe.metrics import Metered
from rollout_service.serve.load import load_weights
from rollout_service.types import GenerateRequest
from rollout_service.weights.manifest import PushHeader
from rollout_service.weights.session import PushSession
from rollout_service.weights.shared import SharedMemoryDir

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RolloutService"].full_name
# Large batches of long completions exceed gRPC's 4 MiB default.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
GRPC_IDLE_MS = 300_000
GRPC_STREAMS_PER_CONNECTION = 1024
# A Generate message beyond this is converted in a thread (a mebibyte of token ids takes tens of
# milliseconds); below, a thread hop would cost an agent's many small calls more than it saves.
LARGE_MESSAGE = 1 << 20
# What the server takes in one message at least, whatever max_request_mib says: the clients send
# pushes in 4 MiB chunks.
MIN_RECEIVE_BYTES = 16 * MIB


async def _abort_with(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    if not isinstance(exc, RolloutError):
        log.exception("internal error in a gRPC call", exc_info=exc)
    await context.abort(grpc_status(exc), public_message(exc), trailing_metadata=grpc_trailers(exc))


@contextlib.asynccontextmanager
async def _deadline(context: grpc.aio.ServicerContext):
    """Enforce the client's deadline here too, so the engine requests are aborted the moment it passes."""
    remaining = context.time_remaining()
    try:
        async with asyncio.timeout(remaining):
            yield
    except TimeoutError:
        raise DeadlineExceeded(f"the call's deadline ({remaining:.3f} s) passed; its engine requests were aborted") from None


def _refusal(handler: grpc.RpcMethodHandler, exc: RolloutError) -> grpc.RpcMethodHandler:
    """A handler of the same kind that fails with `exc` and never deserializes the request."""

    async def refuse(_request, context):
        await context.abort(grpc_status(exc), public_message(exc))

    async def refuse_stream(_request, context):
        await context.abort(grpc_status(exc), public_message(exc))
        yield  # an async generator, as a streaming handler must be

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    return grpc.unary_unary_rpc_method_handler(refuse)


def _holding(handler: grpc.RpcMethodHandler, access: Access, caller, operation, method: str) -> grpc.RpcMethodHandler:
    """The same handler, holding one of the caller's slots until the call is done. A unary request
    reaches it as bytes and is parsed only once the slot holds them (Access counts a Generate's
    bytes against its key's), so a capped key's messages are never parsed. The call's done
    callback gives the slot back, however the call ends: a streaming handler cancelled while
    suspended at a `yield` would otherwise keep it until garbage collection."""
    parse = None if handler.request_streaming else handler.request_deserializer

    async def enter(request, context):
        try:
            slot = access.acquire(caller, operation)
            context.add_done_callback(lambda _: slot.release())
            if parse is None:
                return request
            slot.grow(len(request))
        except RolloutError as exc:
            await context.abort(grpc_status(exc), public_message(exc))
        try:
            return parse(request)
        except Exception:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: the message does not parse as {method}'s request")

    if handler.response_streaming:
        inner = handler.unary_stream or handler.stream_stream

        async def behaviour(request, context):
            parsed = [await enter(request, context)]
            del request  # the handler holds the only reference to what it parses: it may drop it
            async for item in inner(parsed.pop(), context):
                yield item
    else:
        inner = handler.unary_unary or handler.stream_unary

        async def behaviour(request, context):
            parsed = [await enter(request, context)]
            del request
            return await inner(parsed.pop(), context)

    kind = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(handler.request_streaming, handler.response_streaming)]
    # A unary request arrives as the bytes on the wire (no deserializer): `enter` parses it.
    deserializer = handler.request_deserializer if handler.request_streaming else None
    return kind(behaviour, deserializer, handler.response_serializer)


class AccessInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, access: Access):
        self.access = access

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None:
            return None
        operation = grpc_operation(details.method)
        authorization = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        try:
            caller = self.access.authorize(authorization, operation)
        except RolloutError as exc:
            log.info("refused %s: %s", details.method, exc)
            return _refusal(handler, exc)
        if operation not in (Operation.GENERATE, Operation.PUSH):
            return handler
        return _holding(handler, self.access, caller, operation, details.method)


class RolloutServicer(pb_grpc.RolloutServiceServicer):
    def __init__(self, backend: Metered, shared: SharedMemoryDir | None = None):
        self.backend = backend
        self.shared = shared  # where same-host clients hand over pushed tensors

    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        try:
            req = await self._request(request)
            del request  # the message is copied into `req`: its memory goes back now, not after the call
            check_whole(req)
            async with _deadline(context):
                async with contextlib.aclosing(self.backend.generate(req)) as stream:
                    done = [c async for c in stream]
        except Exception as exc:
            await _abort_with(context, exc)
        done.sort(key=lambda c: c.prompt_index)
        return pb.GenerateResponse(completions=[messages.completion_to_proto(c) for c in done])

    async def GenerateStream(self, request: pb.GenerateRequest, context):
        try:
            req = await self._request(request)
            del request
            async with _deadline(context):
                async with contextlib.aclosing(self.backend.generate(req)) as stream:
                    async for c in stream:
                        yield pb.GenerateResponse(completions=[messages.completion_to_proto(c)])
        except Exception as exc:
            await _abort_with(context, exc)

    async def _request(self, message: pb.GenerateRequest) -> GenerateRequest:
        """The checked request of a Generate message: its counts checked before anything is copied
        out of it, then every bound (api/limits.py). A large batch is converted off the event loop
        (65,536 prompts of 255 tokens take seconds), a small one on it (a thread hop would cost an
        agent's many small calls more than the conversion)."""

        def checked() -> GenerateRequest:
            check_generate_message(message, self.backend.config)
            req = messages.request_from_proto(message)
            check_generate(req, self.backend.config)
            return req

        return await asyncio.to_thread(checked) if message.ByteSize() > LARGE_MESSAGE else checked()

    async def GetStatus(self, request: pb.GetStatusRequest, context) -> pb.GetStatusResponse:
        try:
            response = messages.status_to_proto(await self.backend.status())
            if self.shared is not None:
                response.shared_memory.dir, response.shared_memory.token = str(self.shared.dir), self.shared.token
            return response
        except Exception as exc:
            await _abort_with(context, exc)

    async def ListVersions(self, request: pb.ListVersionsRequest, context) -> pb.ListVersionsResponse:
        try:
            manifests = await self.backend.list_versions()
        except Exception as exc:
            await _abort_with(context, exc)
        return pb.ListVersionsResponse(versions=[
            pb.StoredVersion(version=m.version, label=m.label, committed_at=m.created, tensors=len(m.tensors),
                             bytes=sum(t.nbytes for t in m.tensors.values()))
            for m in manifests
        ])

    async def PushWeights(self, request_iterator, context) -> pb.PushWeightsResponse:
        pace = Pace(self.backend.config.push_idle_timeout_s, "the push stream")
        request_iterator = enforce_pace(request_iterator, pace)
        try:
            first = await anext(request_iterator, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise InvalidArgument("header", "the first message of a push must be its header")
            budget = PushBudget(self.backend.config)
            budget.count(len(first.header.tensors))  # before a spec is converted

            async def read_header() -> PushHeader:  # once the push lock is held
                header = messages.push_header_from_proto(first.header)
                budget.add(header.tensors)
                pace.expect(budget.declared)
                return header

            if self.shared is not None:
                self.shared.sweep(self.backend.config.push_idle_timeout_s)
            async with self.backend.begin_push(read_header) as session:
                await self._take_shared(session, session.header.tensors, 0)
                declared = len(session.header.tensors)
                async for msg in request_iterator:
                    kind = msg.WhichOneof("kind")
                    if kind == "chunk":
                        await session.add_chunk(msg.chunk.tensor_index, msg.chunk.offset, msg.chunk.data)
                    elif kind == "declare":
                        budget.count(len(msg.declare.tensors))
                        specs = [messages.tensor_spec_from_proto(t) for t in msg.declare.tensors]
                        budget.add(specs)
                        pace.expect(budget.declared)
                        session.declare(specs)
                        await self._take_shared(session, specs, declared)
                        declared += len(specs)
                    elif kind == "commit":
                        result = await self.backend.commit_push(session)
                        break
                    else:
                        raise InvalidArgument("header", "a push has one header, its first message")
                else:
                    raise Cancelled("the stream ended before its commit message; nothing was applied")
        except Exception as exc:
            await _abort_with(context, exc)
        return messages.push_result_to_proto(result)

    async def LoadWeights(self, request: pb.LoadWeightsRequest, context) -> pb.PushWeightsResponse:
        try:
            expected = request.expected_version if request.HasField("expected_version") else None
            result = await load_weights(self.backend, request.url, expected, request.label, request.inflight)
        except Exception as exc:
            await _abort_with(context, exc)
        return messages.push_result_to_proto(result)

    async def Rollback(self, request: pb.RollbackRequest, context) -> pb.PushWeightsResponse:
        try:
            expected = request.expected_version if request.HasField("expected_version") else None
            result = await self.backend.rollback(request.to_version, expected)
        except Exception as exc:
            await _abort_with(context, exc)
        return messages.push_result_to_proto(result)

    async def _take_shared(self, session: PushSession, specs, first: int) -> None:
        """Hand the session the bytes of the tensors just declared that lie in shared memory (a
        declaration's tensors are a client bucket, in one file: its map is dropped after)."""
        mapped: dict[str, memoryview] = {}
        for index, spec in enumerate(specs, first):
            if spec.shared is None:
                continue
            field = f"tensors[{index}].shared"
            if self.shared is None:
                raise InvalidArgument(field, "this server takes no tensors in shared memory (GetStatus has no shared_memory): stream them")
            await session.add_shared(index, self.shared.take(spec.shared, spec.wire_nbytes, field, mapped))


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS from config.tls_cert/tls_key; client certificates required when tls_client_ca is set."""
    if config.tls_cert is None:
        return None
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


async def create_server(backend: Metered, config: ServerConfig, access: Access) -> tuple[grpc.aio.Server, int]:
    """A started gRPC server on config.host:config.port (0 = a free port); returns it and the bound port."""
    server = grpc.aio.server(
        interceptors=[CallInterceptor(), AccessInterceptor(access)],  # the call's scope around its access checks
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", max(config.max_request_mib * MIB, MIN_RECEIVE_BYTES)),
            # A connection that carries no call for five minutes is closed (clients reconnect on
            # their next call), and one connection carries at most 1,024 calls at once (a client
            # queues the rest): a stranger's idle or call-flooding connections are bounded.
            ("grpc.max_connection_idle_ms", GRPC_IDLE_MS),
            ("grpc.max_concurrent_streams", GRPC_STREAMS_PER_CONNECTION),
        ],
    )
    shared = SharedMemoryDir.create(config.shared_memory_dir if config.shared_memory else None)
    if shared is not None:  # removed when the server is gone, or at exit
        weakref.finalize(server, shared.close)
    pb_grpc.add_RolloutServiceServicer_to_server(RolloutServicer(backend, shared), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    address = f"{config.host}:{config.port}"
    credentials = server_credentials(config)
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot bind the gRPC server to {address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.health = health_servicer  # so the runner can flip it to NOT_SERVING on shutdown
    return server, bound
