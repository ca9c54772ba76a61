"""Reading a safetensors body as it streams in (HTTP pushes), never holding it whole; and the
header parser that checkpoint loads (weights/checkpoint_source.py) share.

safetensors layout: 8-byte little-endian header size, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the tensors' bytes back to back.
Optional checksums travel in the metadata as {"crc32": "<JSON object name -> CRC-32>"}, since
safetensors itself has none.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import AsyncIterator

from rollout_service.errors import DataLoss, InvalidArgument, TooLarge
from rollout_service.weights.manifest import DTYPES, SAFETENSORS_DTYPES, PushHeader, TensorSpec

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class SafetensorsStream:
    def __init__(self, body: AsyncIterator[bytes], max_header: int = MAX_HEADER_BYTES):
        self._body = aiter(body)
        self._max_header = max_header
        self._buffer = bytearray()
        self._spans: list[tuple[int, int]] = []  # [begin, end) of each declared tensor, in order

    async def _take(self, n: int, what: str) -> bytes:
        while len(self._buffer) < n:
            piece = await anext(self._body, None)
            if piece is None:
                raise DataLoss(f"the body ended inside the safetensors {what} ({len(self._buffer)} of {n} bytes)")
            self._buffer += piece
        out = bytes(self._buffer[:n])
        del self._buffer[:n]
        return out

    async def header(self, expected_version: int | None, label: str, inflight: str) -> PushHeader:
        (size,) = struct.unpack("<Q", await self._take(8, "header size"))
        if size > self._max_header:
            raise TooLarge(f"a safetensors header of {size} bytes is over this server's limit of {self._max_header} bytes")
        tensors, self._spans = parse_header(await self._take(size, "header"), "body")
        return PushHeader(tuple(tensors), expected_version, label, inflight)

    async def chunks(self) -> AsyncIterator[tuple[int, int, bytes]]:
        """(tensor index, offset in the tensor, bytes) for the data section, as it arrives."""
        total = self._spans[-1][1] if self._spans else 0
        position = 0
        index = 0
        pending = memoryview(bytes(self._buffer))
        self._buffer.clear()
        while True:
            if not pending:
                piece = await anext(self._body, None)
                if piece is None:
                    return  # a short body shows as incomplete tensors at the commit
                pending = memoryview(piece)
            if position + len(pending) > total:
                raise DataLoss(f"the body carries {position + len(pending) - total} byte(s) after the last tensor")
            while pending:
                begin, end = self._spans[index]
                take = min(len(pending), end - position)
                yield index, position - begin, pending[:take]
                pending = pending[take:]
                position += take
                if position == end:
                    index += 1


def parse_header(raw: bytes, where: str, sep: str = ".") -> tuple[list[TensorSpec], list[tuple[int, int]]]:
    """The tensors a safetensors header (its JSON bytes) declares, in the order of their bytes, and
    each one's [begin, end) in the data section; every field checked, refusals naming `where`
    (the body, or a checkpoint's file) and the tensor as f"{where}{sep}{name}"."""
    try:
        parsed = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidArgument(where, f"the safetensors header is not valid JSON: {str(exc)[:200]}") from None
    if not isinstance(parsed, dict):
        raise InvalidArgument(where, f"the safetensors header is a JSON {type(parsed).__name__}, not an object")
    checksums = _checksums(parsed.pop("__metadata__", None) or {}, f"{where}{sep}__metadata__")
    entries = sorted(((name, _entry(info, f"{where}{sep}{name}")) for name, info in parsed.items()), key=lambda e: e[1][2])
    tensors, spans = [], []
    position = 0
    for name, (dtype, shape, begin, end) in entries:
        if begin != position:
            raise InvalidArgument(f"{where}{sep}{name}", f"data_offsets begin at {begin}, expected {position} (no gaps)")
        tensors.append(TensorSpec(name, dtype, shape, end - begin, checksums.get(name)))
        spans.append((begin, end))
        position = end
    return tensors, spans


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry(info, where: str) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one header entry (`where` names it), every field checked."""
    if not isinstance(info, dict):
        raise InvalidArgument(where, "expected an object with dtype, shape and data_offsets")
    dtype = SAFETENSORS_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise InvalidArgument(where, f"dtype {info.get('dtype')!r} is not one of {', '.join(SAFETENSORS_DTYPES)}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise InvalidArgument(where, f"shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
        raise InvalidArgument(where, f"data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise InvalidArgument(where, f"data_offsets {offsets} need 0 <= begin <= end")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise InvalidArgument(where, f"data_offsets span {end - begin} bytes; shape {shape} of {dtype} is {expected}")
    return dtype, tuple(shape), begin, end


def _checksums(metadata, where: str) -> dict[str, int]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InvalidArgument(where, "must be an object of strings")
    try:
        checksums = json.loads(metadata.get("crc32", "{}"))
    except (ValueError, RecursionError):
        raise InvalidArgument(f"{where}.crc32", "is not a JSON object of name -> CRC-32") from None
    if not isinstance(checksums, dict) or not all(_is_int(v) and 0 <= v < 2**32 for v in checksums.values()):
        raise InvalidArgument(f"{where}.crc32", "is not a JSON object of name -> CRC-32 (0 <= crc < 2**32)")
    return checksums
