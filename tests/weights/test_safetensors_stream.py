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
    with pytest.raises(InvalidArgument, match="body.a: dtype 'I64'"):
        _parse(save({"a": torch.zeros(4, dtype=torch.int64)}))


def _with_header(header) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(64)


@pytest.mark.parametrize(
    "header, field, words",
    [
        (b"\xff\xfe not utf-8", "body", "not valid JSON"),
        (b"[" * 100_000, "body", "not valid JSON"),  # nesting beyond the parser's stack
        ([1, 2], "body", "JSON list, not an object"),
        ({"a": 5}, "body.a", "expected an object"),
        ({"a": {"dtype": 7, "shape": [1], "data_offsets": [0, 4]}}, "body.a", "dtype 7"),
        ({"a": {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]}}, "body.a", "shape '1'"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, "body.a", "non-negative"),
        ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "body.a", "non-negative"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, "body.a", r"is not \[begin, end\]"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, "body.a", "begin <= end"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, "body.a", "span 4 bytes"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, "body.a", "expected 0"),
        ({"__metadata__": [1]}, "body.__metadata__", "object of strings"),
        ({"__metadata__": {"crc32": "{"}}, "body.__metadata__.crc32", "JSON object"),
        ({"__metadata__": {"crc32": '{"a": -1}'}}, "body.__metadata__.crc32", "CRC-32"),
    ],
)
def test_a_malformed_header_is_invalid_argument_naming_the_entry(header, field, words):
    with pytest.raises(InvalidArgument, match=words) as info:
        _parse(_with_header(header))
    assert info.value.field == field


@pytest.mark.parametrize("seed", range(3))
def test_mutated_headers_are_refused_with_client_errors_only(seed):
    """Random byte flips, cuts and splices of a real header: every outcome is a parse or a client error."""
    rng = random.Random(seed)
    good = save({"w": torch.zeros(3, 5), "b": torch.zeros(5).to(torch.bfloat16)}, metadata={"crc32": '{"w": 1}'})
    size = int.from_bytes(good[:8], "little")
    header = good[8 : 8 + size]
    for _ in range(300):
        mutated = bytearray(header)
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(mutated))
            choice = rng.random()
            if choice < 0.5:
                mutated[at] = rng.randrange(256)
            elif choice < 0.75:
                del mutated[at : at + rng.randint(1, 8)]
            else:
                mutated[at:at] = rng.choice([b"[", b"{", b'"', b"-1", b"1e999", b"null", b",", b"\\u0000"])
        try:
            _parse(_with_header(bytes(mutated)), seed)
        except (InvalidArgument, DataLoss):
            pass
