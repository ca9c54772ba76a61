"""The client's PushWeights stream, without a server: what goes on the wire."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from rollout_client.push import as_bytes, requests


def _split(messages):
    kinds = [m.WhichOneof("kind") for m in messages]
    return kinds, messages


def test_a_state_dict_becomes_header_declares_chunks_commit():
    sd = {"a": torch.randn(100, 10).to(torch.bfloat16), "b": np.arange(6, dtype=np.float32).reshape(2, 3)}
    kinds, msgs = _split(list(requests(sd, chunk_bytes=512, expected_version=4, label="x", inflight="abort")))
    assert kinds[0] == "header" and kinds[-1] == "commit"
    assert msgs[0].header.expected_version == 4 and msgs[0].header.label == "x" and msgs[0].header.inflight == "abort"
    declared = [t for m in msgs if m.HasField("declare") for t in m.declare.tensors]
    assert [(t.name, t.dtype, tuple(t.shape), t.nbytes) for t in declared] == [
        ("a", "bfloat16", (100, 10), 2000), ("b", "float32", (2, 3), 24)
    ]
    data = {0: b"", 1: b""}
    for m in msgs:
        if m.HasField("chunk"):
            assert m.chunk.offset == len(data[m.chunk.tensor_index]) and len(m.chunk.data) <= 512
            data[m.chunk.tensor_index] += m.chunk.data
    assert data[0] == sd["a"].view(torch.uint8).numpy().tobytes() and data[1] == sd["b"].tobytes()
    assert declared[0].crc32 == zlib.crc32(data[0]) and declared[1].crc32 == zlib.crc32(data[1])


def test_an_iterator_is_consumed_one_bucket_at_a_time():
    produced = []

    def layers():
        for i in range(6):
            produced.append(i)
            yield f"l{i}", torch.ones(4)  # 16 bytes each

    stream = requests(layers(), bucket_bytes=32)
    next(stream)  # header
    first = next(stream)
    assert [t.name for t in first.declare.tensors] == ["l0", "l1"]
    assert produced == [0, 1]  # nothing beyond the first bucket materialized yet
    declares = [m for m in stream if m.HasField("declare")]
    assert [[t.name for t in m.declare.tensors] for m in declares] == [["l2", "l3"], ["l4", "l5"]]


def test_chunk_indices_continue_across_buckets():
    sd = {f"t{i}": torch.full((3,), float(i)) for i in range(5)}
    msgs = list(requests(sd, bucket_bytes=20))
    order = [m.chunk.tensor_index for m in msgs if m.HasField("chunk")]
    assert order == [0, 1, 2, 3, 4]
    for m in msgs:
        if m.HasField("chunk"):
            assert np.frombuffer(m.chunk.data, np.float32).tolist() == [float(m.chunk.tensor_index)] * 3


def test_non_float_tensors_are_refused_with_their_name():
    with pytest.raises(TypeError, match="x: dtype torch.int64"):
        as_bytes("x", torch.zeros(2, dtype=torch.int64))
    with pytest.raises(TypeError, match="y: dtype float64"):
        as_bytes("y", np.zeros(2))
