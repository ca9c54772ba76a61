"""RolloutClient (blocking) and AsyncRolloutClient (asyncio) for rollout.v1.RolloutService.

    client = RolloutClient("localhost:50051", timeout=60)
    completions = client.generate(["The trainer"], n=4, max_tokens=32, temperature=0.7)
    completions[0].samples[0].logprobs   # exact per-token logprobs, numpy float32
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from rollout_client._proto.rollout.v1 import rollout_pb2 as pb
from rollout_client._proto.rollout.v1 import rollout_pb2_grpc as pb_grpc
from rollout_client import push
from rollout_client.errors import from_rpc_error
from rollout_client.push import PushResult
from rollout_client.types import Completion, completion_from_proto

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
SAMPLING_FIELDS = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)


def build_request(
    prompts: Sequence[str] | None, prompt_token_ids: Sequence[Sequence[int]] | None, request_id: str, sampling: dict,
    session_id: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest from text prompts and/or token-id prompts plus SamplingParams fields."""
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; known: {list(SAMPLING_FIELDS)}")
    batch = [pb.Prompt(text=t) for t in prompts or ()]
    batch += [pb.Prompt(token_ids=ids) for ids in prompt_token_ids or ()]
    params = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    return pb.GenerateRequest(prompts=batch, sampling=params, request_id=request_id, session_id=session_id)


def _completions(response: pb.GenerateResponse) -> list[Completion]:
    return [completion_from_proto(c) for c in response.completions]


class RolloutClient:
    """Blocking client. `timeout` (seconds) is the default deadline of every call."""

    def __init__(self, address: str, timeout: float | None = 600.0):
        self.address = address
        self.timeout = timeout
        self._channel = grpc.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.RolloutServiceStub(self._channel)

    def generate(
        self,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        *,
        request_id: str = "",
        session_id: str = "",
        timeout: float | None = None,
        **sampling,
    ) -> list[Completion]:
        """One Completion per prompt, in order (text prompts first, then token-id prompts)."""
        request = build_request(prompts, prompt_token_ids, request_id, sampling, session_id)
        try:
            return _completions(self._stub.Generate(request, timeout=timeout or self.timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def generate_stream(
        self,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        *,
        request_id: str = "",
        session_id: str = "",
        timeout: float | None = None,
        **sampling,
    ) -> Iterator[Completion]:
        """Completions as each prompt finishes (see Completion.prompt_index)."""
        request = build_request(prompts, prompt_token_ids, request_id, sampling, session_id)
        call = self._stub.GenerateStream(request, timeout=timeout or self.timeout)
        try:
            for response in call:
                yield from _completions(response)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()  # the caller stopped early: the server aborts the prompts still running

    def push_weights(
        self,
        weights: Mapping[str, Any] | Iterable[tuple[str, Any]],
        *,
        chunk_bytes: int = push.DEFAULT_CHUNK_BYTES,
        expected_version: int | None = None,
        label: str = "",
        inflight: str = "",
        progress: bool = False,
        timeout: float | None = None,
    ) -> PushResult:
        """Stream new weights (a state_dict, a dict of numpy/torch tensors, or an iterable of
        (name, tensor)) into the server; returns once they serve as the new version.

        `expected_version`: fail (FailedPrecondition) unless the server serves this version.
        `inflight`: "drain" | "abort" | "continue" for this push (default: the server's setting).
        """
        start = time.perf_counter()
        stream = push.requests(
            weights, chunk_bytes=chunk_bytes, expected_version=expected_version, label=label,
            inflight=inflight, progress=progress,
        )
        try:
            response = self._stub.PushWeights(stream, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return push.result_from_proto(response, time.perf_counter() - start)

    def status(self, timeout: float | None = None) -> pb.GetStatusResponse:
        """Model, settings, current weight version and counters."""
        try:
            return self._stub.GetStatus(pb.GetStatusRequest(), timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRolloutClient:
    """asyncio client with the same methods as RolloutClient."""

    def __init__(self, address: str, timeout: float | None = 600.0):
        self.address = address
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.RolloutServiceStub(self._channel)

    async def generate(
        self,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        *,
        request_id: str = "",
        session_id: str = "",
        timeout: float | None = None,
        **sampling,
    ) -> list[Completion]:
        request = build_request(prompts, prompt_token_ids, request_id, sampling, session_id)
        try:
            return _completions(await self._stub.Generate(request, timeout=timeout or self.timeout))
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def generate_stream(
        self,
        prompts: Sequence[str] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        *,
        request_id: str = "",
        session_id: str = "",
        timeout: float | None = None,
        **sampling,
    ) -> AsyncIterator[Completion]:
        request = build_request(prompts, prompt_token_ids, request_id, sampling, session_id)
        call = self._stub.GenerateStream(request, timeout=timeout or self.timeout)
        try:
            async for response in call:
                for c in _completions(response):
                    yield c
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def push_weights(
        self,
        weights: Mapping[str, Any] | Iterable[tuple[str, Any]],
        *,
        chunk_bytes: int = push.DEFAULT_CHUNK_BYTES,
        expected_version: int | None = None,
        label: str = "",
        inflight: str = "",
        progress: bool = False,
        timeout: float | None = None,
    ) -> PushResult:
        start = time.perf_counter()
        stream = push.requests(
            weights, chunk_bytes=chunk_bytes, expected_version=expected_version, label=label,
            inflight=inflight, progress=progress,
        )
        try:
            response = await self._stub.PushWeights(stream, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return push.result_from_proto(response, time.perf_counter() - start)

    async def status(self, timeout: float | None = None) -> pb.GetStatusResponse:
        try:
            return await self._stub.GetStatus(pb.GetStatusRequest(), timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncRolloutClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
