"""Which way a push goes, decided from the server's status before any byte is sent: by default
(`delta=None`) deltas when it streams (a server on another host) and whole tensors through shared
memory (same host); `delta=True` / `False` force it. The client's choice alone, on a status it is
given (a real shared-memory directory of a server's kind, no server)."""

from __future__ import annotations

import warnings

import pytest
import torch
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb

from rollout_client import RolloutClient, push
from rollout_service.weights.shared import SharedMemoryDir


@pytest.fixture
def client():
    with RolloutClient("127.0.0.1:1") as c:  # never called: the channel connects lazily
        yield c


@pytest.fixture
def same_host(tmp_path):
    made = SharedMemoryDir(tmp_path)
    yield made
    made.close()


def status(shared: SharedMemoryDir | None, codecs: tuple[str, ...] = ("zlib",)) -> pb.GetStatusResponse:
    info = pb.SharedMemory(dir=str(shared.dir), token=shared.token) if shared is not None else pb.SharedMemory()
    return pb.GetStatusResponse(shared_memory=info, delta_codecs=list(codecs))


@pytest.mark.parametrize(
    "delta, shared_memory, on_same_host, codecs, sends_deltas, through_shared_memory",
    [
        (None, None, True, ("zlib",), False, True),  # same host: whole, through shared memory
        (None, None, False, ("zlib",), True, False),  # another host: deltas, streamed
        (None, False, True, ("zlib",), True, False),  # streamed on request: deltas
        (None, None, False, (), False, False),  # a server that takes no deltas: whole, no warning
        (True, None, True, ("zlib",), True, True),  # forced, through shared memory
        (False, None, False, ("zlib",), False, False),  # never
    ],
)
def test_a_push_sends_deltas_by_default_only_when_it_streams(
    client, same_host, delta, shared_memory, on_same_host, codecs, sends_deltas, through_shared_memory
):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan, writer = client._push_setup(delta, shared_memory, status(same_host if on_same_host else None, codecs))
    assert (plan is not None) == sends_deltas
    assert (writer is not None) == through_shared_memory


def test_forced_deltas_to_a_server_that_takes_none_warn_and_go_whole(client):
    with pytest.warns(UserWarning, match="takes no delta pushes"):
        plan, writer = client._push_setup(True, None, status(None, codecs=()))
    assert plan is None and writer is None


def test_without_the_servers_status_a_default_push_streams_whole_tensors(client):
    assert client._status_needed(True, None) == "required"  # forced deltas need the server's codecs
    assert client._status_needed(None, None) == "optional"  # a failed status call does not fail the push
    plan, writer = client._push_setup(None, None, None)
    assert plan is None and writer is None
    assert client._status_needed(None, None) == "optional"  # asked again at the next push
    client._push_setup(None, None, status(None))
    assert client._status_needed(None, None) == ""  # known now: another host, deltas taken


def test_the_progress_total_counts_the_bytes_sent_after_the_cast_to_bf16():
    weights = {"a": torch.zeros(10, 10), "b": torch.zeros(5, dtype=torch.bfloat16)}
    assert push.total_bytes(weights) == 400 + 10
    assert push.total_bytes(weights, to_bf16=True) == 200 + 10
    assert push.total_bytes(iter(weights.items())) is None
