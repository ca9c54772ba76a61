"""Parsing a safetensors body as it streams in (HTTP pushes)."""

from __future__ import annotations

import asyncio
import json
import random
import zlib

import pytest
import torch
from safetensors.torch import save

from rollout_service.errors import DataLoss, InvalidArgument
from rollout_service.weights.safetensors_stream import SafetensorsStream


async def _pieces(body: bytes, seed: int):
    rng = random.Random(seed)
    i = 0
    while i < len(body):
        n = rng.randint(1, 5000)
        yield body[i : i + n]
        i += n


def _parse(body: bytes, seed: int = 0):
    async def run():
        stream = SafetensorsStream(_pieces(body, seed))
        header = await stream.header(3, "lbl", "abort")
        chunks = [c async for c in stream.chunks()]
        return header, chunks

    return asyncio.run(run())


@pytest.mark.parametrize("seed", range(5))
def test_chunks_reassemble_every_tensor_whatever_the_piece_boundaries(seed):
    tensors = {"a": torch.randn(40, 30), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(3, 3).half()}
    crcs = {"a": zlib.crc32(tensors["a"].numpy().tobytes())}
    header, chunks = _parse(save(tensors, metadata={"crc32": json.dumps(crcs)}), seed)
    assert (header.expected_version, header.label, header.inflight) == (3, "lbl", "abort")
    by_name = {t.name: t for t in header.tensors}
    assert by_name["a"].crc32 == crcs["a"] and by_name["b"].crc32 is None
    assert by_name["b"].dtype == "bfloat16" and by_name["c"].shape == (3, 3)
    assembled = {t.name: bytearray() for t in header.tensors}
    for index, offset, data in chunks:
        buf = assembled[header.tensors[index].name]
        assert offset == len(buf)
        buf += bytes(data)
    for name, t in tensors.items():
        assert bytes(assembled[name]) == t.contiguous().view(torch.uint8).numpy().tobytes()


def test_bytes_after_the_last_tensor_are_data_loss():
    with pytest.raises(DataLoss, match="3 byte"):
        _parse(save({"a": torch.zeros(4)}) + b"xyz")


def test_a_body_cut_inside_the_header_is_data_loss():
    with pytest.raises(DataLoss, match="inside the safetensors header"):
        _parse(save({"a": torch.zeros(4)})[:20])


def test_unsupported_dtypes_are_named():
    with pytest.raises(InvalidArgument, match="a: dtype I64"):
        _parse(save({"a": torch.zeros(4, dtype=torch.int64)}))
