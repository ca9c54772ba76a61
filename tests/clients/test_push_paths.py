"""The ways through push_weights that only the server can choose (a delta base it no longer holds,
replicas still loading the version, a problem after the commit point), taken the same way by the
blocking and the asyncio client, against a test-double servicer that plays each on cue."""

from __future__ import annotations

import asyncio
import threading
import warnings
import grpc
import numpy as np
import pytest

from rollout_client import AsyncRolloutClient, RolloutClient
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb
from rollout_client.proto.rollout.v1 import rollout_pb2_grpc as pb_grpc
from tests.clients.test_channel_behaviour import serve  # noqa: F401  (its test-double server fixture)

WEIGHTS = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}


class ScriptedServicerForClientUnitTest(pb_grpc.RolloutServiceServicer):
    """Takes deltas (zlib) over the wire; records each push's header and tensor names. On cue:
    refuses every push on a delta base, names a replica still catching up, reports a problem after
    the commit point, fails GetStatus."""

    def __init__(self, refuse_delta_base=False, catching_up=(), problems=(), status_fails=False):
        self.refuse_delta_base = refuse_delta_base
        self.catching_up = list(catching_up)
        self.problems = list(problems)
        self.status_fails = status_fails
        self.version = 0
        self.pushes: list[tuple[pb.PushHeader, list[str]]] = []
        self.lock = threading.Lock()
        self.streaming = threading.Event()  # set at the first tensor declared

    def GetStatus(self, request, context):
        if self.status_fails:
            context.abort(grpc.StatusCode.INTERNAL, "status is down")
        return pb.GetStatusResponse(weight_version=self.version, delta_codecs=["zlib"])

    def PushWeights(self, request_iterator, context):
        header, names, committed = None, [], False
        for request in request_iterator:
            if request.HasField("header"):
                header = request.header
                if self.refuse_delta_base and header.HasField("delta_base_version"):
                    context.set_trailing_metadata((("rollout-error", "delta-base"),))
                    context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"delta base {header.delta_base_version} is gone")
            elif request.HasField("declare"):
                names += [t.name for t in request.declare.tensors]
                self.streaming.set()
            committed = committed or request.HasField("commit")
        if not committed:  # the client gave up (its stream may still look ended here): not a push
            context.abort(grpc.StatusCode.CANCELLED, "the push ended before its commit")
        with self.lock:
            self.pushes.append((header, names))
            self.version += 1
            return pb.PushWeightsResponse(
                version=self.version, tensors_applied=len(names), replicas_catching_up=self.catching_up,
                warnings=self.problems,
            )


def push_sync(address: str, times: int, **options):
    with RolloutClient(address, timeout=10) as client:
        return [client.push_weights(WEIGHTS, progress=False, **options) for _ in range(times)]


async def push_async(address: str, times: int, **options):
    async with AsyncRolloutClient(address, timeout=10) as client:
        return [await client.push_weights(WEIGHTS, progress=False, **options) for _ in range(times)]


async def push(kind: str, address: str, times: int = 1, **options):
    """`times` pushes of WEIGHTS by one client of `kind`; their results."""
    if kind == "async":
        return await push_async(address, times, **options)
    return push_sync(address, times, **options)


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_a_refused_delta_base_pushes_the_same_tensors_whole_and_says_why(serve, kind):
    servicer = ScriptedServicerForClientUnitTest(refuse_delta_base=True)
    with pytest.warns(UserWarning, match=r"delta push refused \(delta base 1 is gone\); pushing whole tensors instead") as caught:
        first, second = await push(kind, serve(servicer), 2, delta=True)
    assert {w.filename for w in caught} == {__file__}  # the pusher's line, not the client's
    assert (first.fell_back, second.fell_back) == ("", "delta base 1 is gone")
    assert second.version == 2 and second.tensors_applied == 2
    # The refused push (its header, base 1), then the same tensors again whole, without a base.
    assert [(h.HasField("delta_base_version"), names) for h, names in servicer.pushes] == [(False, ["a", "b"]), (False, ["a", "b"])]


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_a_push_whose_replicas_cannot_be_seen_catching_up_still_returns_its_version(serve, kind):
    servicer = ScriptedServicerForClientUnitTest(catching_up=["replica-2"], status_fails=True)
    with pytest.warns(UserWarning, match=r"weight version 1 is committed, but replica\(s\) \['replica-2'\] still load it") as caught:
        (result,) = await push(kind, serve(servicer), delta=False, shared_memory=False)
    assert {w.filename for w in caught} == {__file__}
    assert result.version == 1 and result.replicas_catching_up == ["replica-2"]


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_a_push_waits_for_replicas_catching_up_without_a_warning(serve, kind):
    servicer = ScriptedServicerForClientUnitTest(catching_up=["replica-2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (result,) = await push(kind, serve(servicer), delta=False, shared_memory=False)
    assert result.version == 1


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_each_problem_after_the_commit_point_is_a_user_warning(serve, kind):
    servicer = ScriptedServicerForClientUnitTest(problems=["the weight store's directory could not be synced"])
    with pytest.warns(UserWarning, match="push committed as version 1, with a problem: the weight store"):
        (result,) = await push(kind, serve(servicer), delta=False, shared_memory=False)
    assert result.warnings == ["the weight store's directory could not be synced"]


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_a_default_push_streams_whole_tensors_when_the_status_call_fails(serve, kind):
    servicer = ScriptedServicerForClientUnitTest(status_fails=True)
    first, second = await push(kind, serve(servicer), 2)
    assert [h.HasField("delta_base_version") for h, _ in servicer.pushes] == [False, False]
    assert second.delta_tensors == 0 and second.version == 2


def _failing_weights():
    yield "a", np.ones(4, np.float32)
    raise RuntimeError("gather failed at layer 3")


@pytest.mark.parametrize("kind", ["blocking", "async"])
async def test_a_delta_push_that_fails_drops_its_base_and_the_next_one_goes_whole(serve, kind):
    servicer = ScriptedServicerForClientUnitTest()
    client = RolloutClient(serve(servicer), timeout=10) if kind == "blocking" else AsyncRolloutClient(serve(servicer), timeout=10)

    async def push_weights(weights):
        result = client.push_weights(weights, progress=False, delta=True)
        return await result if kind == "async" else result

    await push_weights(WEIGHTS)
    assert client.delta_base.version == 1
    with pytest.raises(RuntimeError, match="gather failed at layer 3"):
        await push_weights(_failing_weights())
    assert client.delta_base.version is None and not client.delta_base.tensors
    await push_weights(WEIGHTS)
    assert [h.HasField("delta_base_version") for h, _ in servicer.pushes] == [False, False]
    await client.close() if kind == "async" else client.close()


async def test_cancelling_an_async_delta_push_drops_its_base(serve):
    servicer = ScriptedServicerForClientUnitTest()

    def endless():
        for i in range(1_000_000):
            yield f"w{i}", np.zeros((256, 256), dtype=np.float32)

    async with AsyncRolloutClient(serve(servicer), timeout=60) as client:
        await client.push_weights(WEIGHTS, progress=False, delta=True)
        servicer.streaming.clear()
        task = asyncio.ensure_future(client.push_weights(endless(), progress=False, delta=True))
        assert await asyncio.to_thread(servicer.streaming.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert client.delta_base.version is None and not client.delta_base.tensors
