"""Reading a safetensors body as it streams in (HTTP pushes), never holding it whole.

safetensors layout: 8-byte little-endian header size, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the tensors' bytes back to back.
Optional checksums travel in the metadata as {"crc32": "<JSON object name -> CRC-32>"}, since
safetensors itself has none.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator

from rollout_service.errors import DataLoss, InvalidArgument
from rollout_service.weights.manifest import SAFETENSORS_DTYPES, PushHeader, TensorSpec

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class SafetensorsStream:
    def __init__(self, body: AsyncIterator[bytes]):
        self._body = aiter(body)
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
        if size > MAX_HEADER_BYTES:
            raise InvalidArgument("body", f"safetensors header of {size} bytes exceeds {MAX_HEADER_BYTES}")
        try:
            raw = json.loads(await self._take(size, "header"))
            checksums = json.loads(raw.pop("__metadata__", {}).get("crc32", "{}"))
        except (json.JSONDecodeError, AttributeError) as exc:
            raise InvalidArgument("body", f"the safetensors header is not valid JSON: {exc}") from None
        entries = sorted(raw.items(), key=lambda kv: kv[1]["data_offsets"][0])
        tensors = []
        position = 0
        for name, info in entries:
            begin, end = info["data_offsets"]
            if begin != position:
                raise InvalidArgument(f"body.{name}", f"data_offsets begin at {begin}, expected {position} (no gaps)")
            dtype = SAFETENSORS_DTYPES.get(info["dtype"])
            if dtype is None:
                raise InvalidArgument(
                    f"body.{name}", f"{name}: dtype {info['dtype']} is not one of {', '.join(SAFETENSORS_DTYPES)}"
                )
            shape = tuple(info["shape"])
            tensors.append(TensorSpec(name, dtype, shape, end - begin, checksums.get(name)))
            self._spans.append((begin, end))
            position = end
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
