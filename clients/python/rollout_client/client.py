"""RolloutClient (blocking) and AsyncRolloutClient (asyncio) for rollout.v1.RolloutService.

    client = RolloutClient("localhost:50051", timeout=60)
    completions = client.generate(["The trainer"], n=4, max_tokens=32, temperature=0.7)
    completions[0].samples[0].logprobs   # exact per-token logprobs, numpy float32
    client.push_weights(model.state_dict(), label="step 1")   # -> PushResult(version=1, ...)

`timeout` is every call's default deadline in seconds (each method takes its own `timeout=`);
idempotent calls are retried on UNAVAILABLE with backoff (`retry=`, see channel.RetryPolicy).

Each method is written once, in calls.py, as a generator of steps (steps.py: an RPC, a push, a
sleep): requests are built and replies parsed there. The two clients here are thin transports
that carry the steps out, one in place and one awaited: `_do` (a branch per kind of step) and
`_stream`. That, rather than a sync copy generated from the async code (httpx's unasync), because
the clients differ in more than `await`: the asyncio client pushes over a blocking channel of its
own (blocking_push), waits for gRPC's push thread off the event loop, and lets that wait finish
when its task is cancelled. A generated copy would need a rewrite rule for each of those and a
second file kept current beside the first; here each difference stands once, in the branch that
has it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import typing
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

import grpc

from rollout_client import calls
from rollout_client.blocking_push import BlockingPush
# build_request, continuation and SAMPLING_FIELDS live with the calls; importable from here as before.
from rollout_client.calls import SAMPLING_FIELDS, build_request, continuation  # noqa: F401
from rollout_client.client_base import ClientBase
from rollout_client.errors import from_rpc_error
from rollout_client.steps import Done, Push, Rpc, Sleep, Step, Steps, StopStream, Stream, advance

P = ParamSpec("P")
T = TypeVar("T")
F = TypeVar("F", bound=Callable)


def _as_method(owner: str, call: Callable, method: F, result: Callable[[Any], Any] = lambda t: t) -> F:
    """`method`, which runs `call` on class `owner`, as help(), inspect and typing.get_type_hints
    see a method: the call's name and docstring, its parameters with `self` first, and
    `result(T)` returned for a call that makes a T (Steps[T] or Stream[T])."""
    hints = typing.get_type_hints(call)
    returns = result(typing.get_args(hints["return"])[-1])
    signature = inspect.signature(call)
    first, *rest = signature.parameters.values()
    hints.pop(first.name)  # the client: the method's self
    this = first.replace(name="self", annotation=inspect.Parameter.empty)
    method.__signature__ = signature.replace(parameters=[this, *rest], return_annotation=returns)
    method.__annotations__ = {**hints, "return": returns}
    method.__name__, method.__qualname__, method.__doc__ = call.__name__, f"{owner}.{call.__name__}", call.__doc__
    return method


def _blocking(call: Callable[Concatenate[Any, P], Steps[T]]) -> Callable[Concatenate[RolloutClient, P], T]:
    """`call` as a RolloutClient method: its steps carried out in place."""

    def method(self: RolloutClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return self._run(call(self, *args, **kwargs))

    return _as_method("RolloutClient", call, method)


def _blocking_stream(call: Callable[Concatenate[Any, P], Stream[T]]) -> Callable[Concatenate[RolloutClient, P], Iterator[T]]:
    """`call` as a RolloutClient method iterating its stream."""

    def method(self: RolloutClient, *args: P.args, **kwargs: P.kwargs) -> Iterator[T]:
        yield from self._stream(call(self, *args, **kwargs))  # a generator: nothing is checked or sent before it is read

    return _as_method("RolloutClient", call, method, lambda t: Iterator[t])


class RolloutClient(ClientBase):
    """Blocking client (constructor arguments: see ClientBase)."""

    generate = _blocking(calls.generate)
    resume = _blocking(calls.resume)
    generate_stream = _blocking_stream(calls.generate_stream)
    push_weights = _blocking(calls.push_weights)
    load_weights = _blocking(calls.load_weights)
    rollback = _blocking(calls.rollback)
    status = _blocking(calls.status)
    list_versions = _blocking(calls.list_versions)
    wait_for_version = _blocking(calls.wait_for_version)

    def _run(self, steps: Steps[T]) -> T:
        step = advance(steps)
        while not isinstance(step, Done):
            step = advance(steps, *self._settle(step))
        return step.result

    def _settle(self, step: Step) -> tuple[Any, BaseException | None]:
        """The step's reply, or the exception it raised (KeyboardInterrupt too: the call cleans up)."""
        try:
            return self._do(step), None
        except BaseException as exc:
            return None, exc

    def _do(self, step: Step) -> Any:
        match step:
            case Rpc(method, request, timeout):
                try:
                    return self._invoke(method, request, timeout)
                except grpc.RpcError as err:
                    raise from_rpc_error(err) from None
            case Push(source, timeout):
                try:
                    return self._invoke("PushWeights", source, timeout)
                except grpc.RpcError as err:
                    raise (source.error or from_rpc_error(err)) from None
            case StopStream(source):
                source.stop()
            case Sleep(seconds):
                time.sleep(seconds)

    def _stream(self, stream: Stream[T]) -> Iterator[T]:
        call = self._invoke(stream.method, stream.request, stream.timeout)
        try:
            for response in call:
                yield from stream.parse(response)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()  # the caller stopped early: the server aborts the prompts still running

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RolloutClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _awaited(
    call: Callable[Concatenate[Any, P], Steps[T]],
) -> Callable[Concatenate[AsyncRolloutClient, P], Coroutine[Any, Any, T]]:
    """`call` as an AsyncRolloutClient method: its steps awaited."""

    async def method(self: AsyncRolloutClient, *args: P.args, **kwargs: P.kwargs) -> T:
        return await self._run(call(self, *args, **kwargs))

    return _as_method("AsyncRolloutClient", call, method)


def _awaited_stream(
    call: Callable[Concatenate[Any, P], Stream[T]],
) -> Callable[Concatenate[AsyncRolloutClient, P], AsyncIterator[T]]:
    """`call` as an AsyncRolloutClient method iterating its stream (`async for`)."""

    async def method(self: AsyncRolloutClient, *args: P.args, **kwargs: P.kwargs) -> AsyncIterator[T]:
        async for item in self._stream(call(self, *args, **kwargs)):
            yield item

    return _as_method("AsyncRolloutClient", call, method, lambda t: AsyncIterator[t])


class AsyncRolloutClient(ClientBase):
    """asyncio client with the same methods and options as RolloutClient. Its pushes run on a
    blocking channel of their own (see blocking_push: grpc.aio misreports a refused push)."""

    _asyncio = True

    def __init__(self, address: str, *args, **kwargs):
        super().__init__(address, *args, **kwargs)
        self._push = BlockingPush(self._options, address)

    generate = _awaited(calls.generate)
    resume = _awaited(calls.resume)
    generate_stream = _awaited_stream(calls.generate_stream)
    push_weights = _awaited(calls.push_weights)
    load_weights = _awaited(calls.load_weights)
    rollback = _awaited(calls.rollback)
    status = _awaited(calls.status)
    list_versions = _awaited(calls.list_versions)
    wait_for_version = _awaited(calls.wait_for_version)

    async def _run(self, steps: Steps[T]) -> T:
        step = advance(steps)
        while not isinstance(step, Done):
            step = advance(steps, *await self._settle(step))
        return step.result

    async def _settle(self, step: Step) -> tuple[Any, BaseException | None]:
        """The step's reply, or the exception it raised (CancelledError too: the call cleans up)."""
        try:
            return await self._do(step), None
        except BaseException as exc:
            return None, exc

    async def _do(self, step: Step) -> Any:
        match step:
            case Rpc(method, request, timeout):
                try:
                    return await self._invoke(method, request, timeout)
                except grpc.RpcError as err:
                    raise from_rpc_error(err) from None
            case Push(source, timeout):
                try:
                    return await self._push(source, timeout=self._deadline(timeout), metadata=self._metadata)
                except (grpc.RpcError, asyncio.CancelledError) as err:
                    if source.error is not None:
                        raise source.error from None
                    if isinstance(err, asyncio.CancelledError):
                        raise
                    raise from_rpc_error(err) from None
            case StopStream(source):
                # gRPC's thread may be inside the caller's generator: wait off the loop, to the end.
                await asyncio.shield(asyncio.to_thread(source.stop))
            case Sleep(seconds):
                await asyncio.sleep(seconds)

    async def _stream(self, stream: Stream[T]) -> AsyncIterator[T]:
        call = self._invoke(stream.method, stream.request, stream.timeout)
        try:
            async for response in call:
                for item in stream.parse(response):
                    yield item
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()
        self._push.close()

    async def __aenter__(self) -> AsyncRolloutClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
