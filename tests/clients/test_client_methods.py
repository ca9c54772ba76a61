"""Both clients show each call as a method of their own: one parameter list and docstring for both,
a blocking result on RolloutClient and a coroutine (or async iterator) of it on AsyncRolloutClient,
as inspect, help() and typing.get_type_hints read them."""

from __future__ import annotations

import inspect
import typing
from collections.abc import AsyncIterator, Iterator

import pytest

from rollout_client import AsyncRolloutClient, Completion, PushResult, RolloutClient, Sample
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb

RESULTS = {
    "generate": list[Completion],
    "resume": Sample,
    "push_weights": PushResult,
    "load_weights": PushResult,
    "rollback": PushResult,
    "status": pb.GetStatusResponse,
    "list_versions": list[pb.StoredVersion],
    "wait_for_version": pb.GetStatusResponse,
}


@pytest.mark.parametrize("name", [*RESULTS, "generate_stream"])
def test_each_call_has_one_parameter_list_and_docstring_on_both_clients(name):
    blocking, awaited = getattr(RolloutClient, name), getattr(AsyncRolloutClient, name)
    assert list(inspect.signature(blocking).parameters)[0] == "self"
    assert inspect.signature(blocking).parameters == inspect.signature(awaited).parameters
    assert blocking.__doc__ and blocking.__doc__ == awaited.__doc__
    assert (blocking.__qualname__, awaited.__qualname__) == (f"RolloutClient.{name}", f"AsyncRolloutClient.{name}")


@pytest.mark.parametrize("name, result", RESULTS.items())
def test_a_call_returns_its_result_blocking_and_a_coroutine_of_it_awaited(name, result):
    blocking, awaited = getattr(RolloutClient, name), getattr(AsyncRolloutClient, name)
    assert typing.get_type_hints(blocking)["return"] == typing.get_type_hints(awaited)["return"] == result
    assert not inspect.iscoroutinefunction(blocking) and inspect.iscoroutinefunction(awaited)


def test_the_stream_is_an_iterator_blocking_and_an_async_iterator_awaited():
    blocking, awaited = RolloutClient.generate_stream, AsyncRolloutClient.generate_stream
    assert typing.get_type_hints(blocking)["return"] == Iterator[Completion]
    assert typing.get_type_hints(awaited)["return"] == AsyncIterator[Completion]
    assert inspect.isgeneratorfunction(blocking) and inspect.isasyncgenfunction(awaited)
