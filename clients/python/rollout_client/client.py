"""RolloutClient (blocking) and AsyncRolloutClient (asyncio) for rollout.v1.RolloutService.

    client = RolloutClient("localhost:50051", timeout=60)
    completions = client.generate(["The trainer"], n=4, max_tokens=32, temperature=0.7)
    completions[0].samples[0].logprobs   # exact per-token logprobs, numpy float32
    client.push_weights(model.state_dict(), label="step 1")   # -> PushResult(version=1, ...)

`timeout` is every call's default deadline in seconds (each method takes its own `timeout=`);
idempotent calls are retried on UNAVAILABLE with backoff (`retry=`, see channel.RetryPolicy).
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import time
import warnings
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc
from rollout_client import push, shared
from rollout_client.blocking_push import BlockingPush
from rollout_client.channel import ChannelOptions, RetryPolicy
from rollout_client.errors import DeadlineExceededError, DeltaBaseError, RolloutClientError, from_rpc_error
from rollout_client.push import PushResult
from rollout_client.types import Completion, Sample, completion_from_proto, joined

WAIT_POLL_S = 0.5
# wait_for_version's last status call may outlast its deadline by this much, rather than fail with
# a deadline too short to reach the server (its own DEADLINE_EXCEEDED would hide the version served).
MIN_STATUS_TIMEOUT_S = 1.0
# A push whose version some replicas load from the weight store (they failed to load the push)
# returns once they serve it, so the caller's next samples are of the version it pushed.
CATCH_UP_WAIT_S = 300.0
SAMPLING_FIELDS = tuple(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)
# GenerateRequest fields the generate methods take among their keyword arguments, beside sampling's.
VERSION_FIELDS = ("min_weight_version", "max_staleness")


def build_request(
    prompts: Sequence[str] | None, prompt_token_ids: Sequence[Sequence[int]] | None, request_id: str, sampling: dict,
    session_id: str = "",
) -> pb.GenerateRequest:
    """A GenerateRequest from text prompts and/or token-id prompts plus SamplingParams fields, and
    the version fields: `min_weight_version` (sample only with this version or newer; the server
    holds the call until it serves it, within the call's deadline) and `max_staleness` (at most this
    many versions behind the newest committed one)."""
    versions = {k: sampling.pop(k) for k in VERSION_FIELDS if sampling.get(k) is not None}
    unknown = sorted(set(sampling) - set(SAMPLING_FIELDS))
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; known: {list(SAMPLING_FIELDS)} and {list(VERSION_FIELDS)}")
    batch = [pb.Prompt(text=t) for t in prompts or ()]
    batch += [pb.Prompt(token_ids=ids) for ids in prompt_token_ids or ()]
    params = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    return pb.GenerateRequest(prompts=batch, sampling=params, request_id=request_id, session_id=session_id, **versions)


def continuation(completion: Completion, sample: Sample, max_tokens: int, sampling: dict) -> dict | None:
    """The generate() arguments that continue an aborted `sample` from its tokens (resume()), or
    None when there is nothing to continue: it was not aborted, or has max_tokens tokens."""
    left = max_tokens - len(sample.token_ids)
    if sample.finish_reason != "aborted" or left <= 0:
        return None
    args = {**sampling, "prompt_token_ids": [completion.prompt_token_ids + sample.token_ids], "max_tokens": left, "n": 1}
    if args.get("min_tokens"):
        args["min_tokens"] = max(0, args["min_tokens"] - len(sample.token_ids))
    return args


def _completions(response: pb.GenerateResponse) -> list[Completion]:
    return [completion_from_proto(c) for c in response.completions]


def _show_progress(progress: bool | None) -> bool:
    """None (the default) shows the push bar only when stderr is a terminal."""
    return sys.stderr.isatty() if progress is None else progress


def _still_catching_up(response: pb.PushWeightsResponse, exc: Exception) -> None:
    """The push is committed (its result says so and a fenced trainer must record it), but some
    replicas still load it: say so rather than fail."""
    warnings.warn(
        f"weight version {response.version} is committed, but replica(s) {list(response.replicas_catching_up)} "
        f"still load it from the weight store ({exc}); they serve older samples until then",
        stacklevel=3,
    )


def _version_reached(status: pb.GetStatusResponse, version: int) -> bool:
    return status.weight_version >= version


class _Connection:
    """What both clients hold: the channel (blocking or asyncio), its stub, call metadata and the
    default deadline.

    address: "host:port". timeout: default deadline of every call, seconds (None: no deadline).
    retry: how idempotent calls retry on UNAVAILABLE (channel.NO_RETRY turns it off).
    tls / root_certificates / api_key / client_certificate / client_key: see channel.ChannelOptions.
    """

    _asyncio = False

    def __init__(
        self,
        address: str,
        timeout: float | None = 600.0,
        *,
        retry: RetryPolicy = RetryPolicy(),
        tls: bool = False,
        root_certificates: bytes | str | None = None,
        api_key: str | None = None,
        client_certificate: bytes | str | None = None,
        client_key: bytes | str | None = None,
    ):
        self.address = address
        self.timeout = timeout
        options = ChannelOptions(
            retry=retry, tls=tls, root_certificates=root_certificates, api_key=api_key,
            client_certificate=client_certificate, client_key=client_key,
        )
        self._options = options
        self._metadata = options.metadata()
        self._channel = options.aio_channel(address) if self._asyncio else options.channel(address)
        self._stub = pb_grpc.RolloutServiceStub(self._channel)
        # What delta pushes encode against (a bf16 copy of the tensors they pushed).
        self.delta_base = push.DeltaBase()
        self._delta_codecs: list[str] | None = None  # the server's, read with its status
        self._shared_memory: pb.SharedMemory | None = None  # the server's, read on the first push
        self._shared_seen = False  # this process saw that directory at the last push

    def _status_needed(self, delta: bool | None, shared_memory: bool | None) -> str:
        """Whether a push reads the server's status first: "required" (delta=True and its delta
        codecs are not known yet; shared memory is required), "optional" (to look for shared memory
        and, for the default delta choice, the codecs: where the status call fails, the push streams
        whole tensors), or "" (known: the first push read it, and the directory seen at the last
        push is still usable, or none was seen)."""
        if (delta and self._delta_codecs is None) or shared_memory:
            return "required"
        if delta is None and self._delta_codecs is None:
            return "optional"
        if shared_memory is False:
            return ""
        known = self._shared_memory
        return "optional" if known is None or (self._shared_seen and not shared.sees(known)) else ""

    def _push_setup(
        self, delta: bool | None, shared_memory: bool | None, status: pb.GetStatusResponse | None
    ) -> tuple[push.DeltaPlan | None, shared.SharedWriter | None]:
        """A push's delta plan and shared-memory writer (None: whole tensors; streamed)."""
        if status is not None:
            self._shared_memory = pb.SharedMemory()
            self._shared_memory.CopyFrom(status.shared_memory)
            if delta is not False:  # read again with each status: a restarted server may run another dtype
                self._delta_codecs = list(status.delta_codecs)
                if delta and not self._delta_codecs:
                    warnings.warn("this server takes no delta pushes (its engine does not run bfloat16): pushing whole tensors", stacklevel=4)
        plan = writer = None
        self._shared_seen = self._shared_memory is not None and shared.sees(self._shared_memory)
        if delta is None:
            # Deltas pay where bytes cross a link; through shared memory the wire is nearly free and
            # the encoding only adds work (BENCHMARKS.md: 0.79-0.86x a whole push on one host).
            delta = not (self._shared_seen and shared_memory is not False)
        if delta and self._delta_codecs:
            plan = push.DeltaPlan(self.delta_base, "zlib" if "zlib" in self._delta_codecs else self._delta_codecs[0])
        if shared_memory is not False:
            if self._shared_seen:
                writer = shared.SharedWriter(Path(self._shared_memory.dir))
            elif shared_memory:
                where = self._shared_memory.dir if self._shared_memory is not None and self._shared_memory.dir else None
                raise ValueError(
                    "shared_memory=True, but " + (
                        f"this process does not see the server's shared-memory directory {where} (another host or "
                        "/dev/shm, another user, or its server is gone)" if where else "the server takes no tensors in shared memory"
                    )
                )
        return plan, writer

    def _whole_after(
        self, refused: push.DeltaPlan, exc: DeltaBaseError, items: Iterator, options: dict, source: push.SourceErrors
    ) -> tuple[push.DeltaPlan, push.SourceErrors]:
        """The whole push that follows a refused delta push (whose request stream has stopped): the
        tensors it took, then the rest of the caller's, recorded as the new base."""
        warnings.warn(f"delta push refused ({exc.details}); pushing whole tensors instead", stacklevel=3)
        source.close()
        self.delta_base.version = None  # the base matches no version the server holds: record anew
        plan = push.DeltaPlan(self.delta_base, refused.codec)
        writer = source.shared.again() if source.shared is not None else None
        stream = push.requests(itertools.chain(refused.resent(), items), plan=plan, shared=writer, **options)
        return plan, push.SourceErrors(stream, writer)

    def _deadline(self, timeout: float | None) -> float | None:
        return timeout if timeout is not None else self.timeout


class RolloutClient(_Connection):
    """Blocking client (constructor arguments: see _Connection)."""

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
        """One Completion per prompt, in order (text prompts first, then token-id prompts).
        `sampling`: SamplingParams fields, and min_weight_version / max_staleness (build_request)."""
        request = build_request(prompts, prompt_token_ids, request_id, sampling, session_id)
        try:
            response = self._stub.Generate(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return _completions(response)

    def resume(self, completion: Completion, sample: Sample, *, max_tokens: int, timeout: float | None = None, **sampling) -> Sample:
        """Continue `sample` (one of `completion`'s, aborted by a push) from its tokens on the
        weights served now: one token-in call with the prompt + the sample's tokens, for the
        `max_tokens` the original call asked for less what it has (min_tokens likewise). Returns
        the whole sample (see types.joined): its per-token versions say which tokens came from
        which version. A sample that was not aborted is returned as it is. Pass the original
        call's sampling options (with another seed, or none, to draw fresh randomness);
        min_weight_version / max_staleness work as in generate(). vLLM's presence and frequency
        penalties count the sample's tokens only from where the continuation starts."""
        args = continuation(completion, sample, max_tokens, sampling)
        if args is None:
            return sample
        (rest,) = self.generate(**args, timeout=timeout)
        return joined(sample, rest.samples[0])

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
        call = self._stub.GenerateStream(request, timeout=self._deadline(timeout), metadata=self._metadata)
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
        bucket_bytes: int = push.DEFAULT_BUCKET_BYTES,
        expected_version: int | None = None,
        label: str = "",
        inflight: str = "",
        progress: bool | None = None,
        timeout: float | None = None,
        delta: bool | None = None,
        shared_memory: bool | None = None,
    ) -> PushResult:
        """Stream new weights (a state_dict, a dict of numpy/torch tensors, or an iterable of
        (name, tensor), e.g. a generator gathering sharded parameters one by one) into the server;
        returns once they serve as the new version. Never retried: a failed push changed nothing.

        `expected_version`: fail (FailedPrecondition) unless this is the last committed version.
        `inflight`: "drain" | "abort" | "continue" for this push (default: the server's setting).
        `progress`: a byte progress bar (needs tqdm) and a one-line summary on stderr; by default
        only when stderr is a terminal.
        `delta`: send each tensor this client's last delta push sent as its changes since then,
        against the version that push made (`delta_base`, one bf16 copy of the pushed tensors kept
        here: 2 bytes per parameter of host memory); float32/float16 torch tensors are cast to
        bfloat16 first, as the server casts them for a bf16 engine. The first such push sends
        everything whole. If the server no longer has that version, the push goes whole by
        itself, with a warning (`PushResult.fell_back` says why). The served weights are bitwise
        those of a push of the same tensors whole. By default (None) a push is a delta push
        whenever it streams to a server that takes them (another host: the bytes cross a link),
        and whole through shared memory; True: always (a warning where the server takes none);
        False: never. A push without deltas drops the copy (it no longer matches the server).
        `shared_memory`: hand the tensors over as files in the server's shared memory instead of
        streaming them (one copy, no serialization); by default whenever this process sees the
        server's directory (same host, same /dev/shm, same user); True: required (ValueError
        where it cannot be); False: always stream.
        """
        show = _show_progress(progress)
        start = time.perf_counter()
        status, needed = None, self._status_needed(delta, shared_memory)
        if needed:
            try:
                status = self.status(timeout)
            except RolloutClientError:
                if needed == "required":
                    raise
        plan, writer = self._push_setup(delta, shared_memory, status)
        options = dict(chunk_bytes=chunk_bytes, bucket_bytes=bucket_bytes, expected_version=expected_version, label=label,
                       inflight=inflight, progress=show, total=push.total_bytes(weights, plan is not None) if show else None)
        items, fell_back = push.items(weights), ""
        source = push.SourceErrors(push.requests(items, plan=plan, shared=writer, **options), writer)
        try:
            try:
                response = self._send(source, timeout)
            except DeltaBaseError as exc:
                if plan is None:
                    raise
                source.stop()  # gRPC's thread may still be taking tensors: let it finish first
                (plan, source), fell_back = self._whole_after(plan, exc, items, options, source), exc.details
                response = self._send(source, timeout)
        except BaseException:
            if plan is not None:  # updated in place as far as the push went: no longer any version's
                source.stop()
                self.delta_base.clear()
            raise
        finally:
            source.close()
        if plan is not None:
            self.delta_base.version = response.version
        else:  # the copy matches no version this push leaves: free it (the next delta push goes whole)
            self.delta_base.clear()
        if response.replicas_catching_up:  # committed; the version is served once they have it
            try:
                self.wait_for_version(response.version, timeout=CATCH_UP_WAIT_S)
            except RolloutClientError as exc:  # the push is committed: never fail it now
                _still_catching_up(response, exc)
        result = push.result_from_proto(response, time.perf_counter() - start, fell_back)
        if show:
            print(result, file=sys.stderr)
        return result

    def _send(self, source: push.SourceErrors, timeout: float | None) -> pb.PushWeightsResponse:
        try:
            return self._stub.PushWeights(source, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise (source.error or from_rpc_error(err)) from None

    def status(self, timeout: float | None = None) -> pb.GetStatusResponse:
        """Model, settings, current weight version, replicas and counters."""
        try:
            return self._stub.GetStatus(pb.GetStatusRequest(), timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def wait_for_version(self, version: int, timeout: float = 300.0, poll_s: float = WAIT_POLL_S) -> pb.GetStatusResponse:
        """Block until the server serves weight version >= `version` (for example a version pushed
        by another process); returns that status. DeadlineExceededError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(timeout=max(deadline - time.monotonic(), MIN_STATUS_TIMEOUT_S))
            if _version_reached(status, version):
                return status
            if time.monotonic() + poll_s > deadline:
                raise DeadlineExceededError(
                    f"weight version {version} not served after {timeout:g} s (serving {status.weight_version})"
                )
            time.sleep(poll_s)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncRolloutClient(_Connection):
    """asyncio client with the same methods and options as RolloutClient. Its pushes run on a
    blocking channel of their own (see blocking_push: grpc.aio misreports a refused push)."""

    _asyncio = True

    def __init__(self, address: str, *args, **kwargs):
        super().__init__(address, *args, **kwargs)
        self._push = BlockingPush(self._options, address)

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
            response = await self._stub.Generate(request, timeout=self._deadline(timeout), metadata=self._metadata)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        return _completions(response)

    async def resume(
        self, completion: Completion, sample: Sample, *, max_tokens: int, timeout: float | None = None, **sampling
    ) -> Sample:
        """As RolloutClient.resume."""
        args = continuation(completion, sample, max_tokens, sampling)
        if args is None:
            return sample
        (rest,) = await self.generate(**args, timeout=timeout)
        return joined(sample, rest.samples[0])

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
        call = self._stub.GenerateStream(request, timeout=self._deadline(timeout), metadata=self._metadata)
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
        bucket_bytes: int = push.DEFAULT_BUCKET_BYTES,
        expected_version: int | None = None,
        label: str = "",
        inflight: str = "",
        progress: bool | None = None,
        timeout: float | None = None,
        delta: bool | None = None,
        shared_memory: bool | None = None,
    ) -> PushResult:
        """See RolloutClient.push_weights."""
        show = _show_progress(progress)
        start = time.perf_counter()
        status, needed = None, self._status_needed(delta, shared_memory)
        if needed:
            try:
                status = await self.status(timeout)
            except RolloutClientError:
                if needed == "required":
                    raise
        plan, writer = self._push_setup(delta, shared_memory, status)
        options = dict(chunk_bytes=chunk_bytes, bucket_bytes=bucket_bytes, expected_version=expected_version, label=label,
                       inflight=inflight, progress=show, total=push.total_bytes(weights, plan is not None) if show else None)
        items, fell_back = push.items(weights), ""
        source = push.SourceErrors(push.requests(items, plan=plan, shared=writer, **options), writer)
        try:
            try:
                response = await self._send(source, timeout)
            except DeltaBaseError as exc:
                if plan is None:
                    raise
                # gRPC's thread may still be taking tensors: let it finish first (off the loop).
                await asyncio.to_thread(source.stop)
                (plan, source), fell_back = self._whole_after(plan, exc, items, options, source), exc.details
                response = await self._send(source, timeout)
        except BaseException:
            if plan is not None:  # updated in place as far as the push went: no longer any version's
                await asyncio.shield(asyncio.to_thread(source.stop))
                self.delta_base.clear()
            raise
        finally:
            source.close()
        if plan is not None:
            self.delta_base.version = response.version
        else:  # the copy matches no version this push leaves: free it (the next delta push goes whole)
            self.delta_base.clear()
        if response.replicas_catching_up:  # committed; the version is served once they have it
            try:
                await self.wait_for_version(response.version, timeout=CATCH_UP_WAIT_S)
            except RolloutClientError as exc:  # the push is committed: never fail it now
                _still_catching_up(response, exc)
        result = push.result_from_proto(response, time.perf_counter() - start, fell_back)
        if show:
            print(result, file=sys.stderr)
        return result

    async def _send(self, source: push.SourceErrors, timeout: float | None) -> pb.PushWeightsResponse:
        try:
            return await self._push(source, timeout=self._deadline(timeout), metadata=self._metadata)
        except (grpc.RpcError, asyncio.CancelledError) as err:
            if source.error is not None:
                raise source.error from None
            if isinstance(err, asyncio.CancelledError):
                raise
            raise from_rpc_error(err) from None

    async def status(self, timeout: float | None = None) -> pb.GetStatusResponse:
        try:
            return await self._stub.GetStatus(
                pb.GetStatusRequest(), timeout=self._deadline(timeout), metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    async def wait_for_version(
        self, version: int, timeout: float = 300.0, poll_s: float = WAIT_POLL_S
    ) -> pb.GetStatusResponse:
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status(timeout=max(deadline - time.monotonic(), MIN_STATUS_TIMEOUT_S))
            if _version_reached(status, version):
                return status
            if time.monotonic() + poll_s > deadline:
                raise DeadlineExceededError(
                    f"weight version {version} not served after {timeout:g} s (serving {status.weight_version})"
                )
            await asyncio.sleep(poll_s)

    async def close(self) -> None:
        await self._channel.close()
        self._push.close()

    async def __aenter__(self) -> AsyncRolloutClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
