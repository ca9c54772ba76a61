"""One push being received: chunks are assembled per tensor; each finished tensor is checked
(size, CRC-32, finite values) and converted on a worker thread while further chunks arrive, so
generation and receiving go on while tensors are requantized.

Memory is bounded: tensors being assembled or waiting for conversion take at most `buffer_bytes`
(one tensor larger than that is taken alone); beyond it `add_chunk` waits for conversions, which
slows the sender through gRPC / TCP flow control instead of growing memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
import warnings
import zlib
from collections.abc import Callable

import torch

from rollout_service.errors import DataLoss, InvalidArgument
from rollout_service.types import ApplyStats, PushResult
from rollout_service.weights.delta import DeltaBase, rebuild
from rollout_service.weights.manifest import ParamTable, PushHeader, TensorSpec
from rollout_service.weights.names import Mapping
from rollout_service.weights.staging import ShardWriter
from rollout_service.weights.versions import crc32_of

Converter = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


class PushSession:
    def __init__(self, header: PushHeader, table: ParamTable, convert: Converter, spool: ShardWriter, buffer_bytes: int,
                 base: DeltaBase | None = None):
        self.header = header
        self._base = base  # what delta tensors apply to (header.delta_base_version)
        self.tensors: list[TensorSpec] = []
        self._table = table
        self._mappings: list[Mapping] = []
        self._claimed: dict[str, int] = {}  # checkpoint name -> the declared tensor writing it
        # A tied LM head sent beside its embedding writes nothing; the two must be equal. Checked
        # by the CRC-32 of their bytes (computed anyway): a trainer that unties them by mistake
        # is caught with certainty but for a 2^-32 collision. Tensor index -> CRC-32.
        self._embedding_crc: dict[int, int] = {}
        self.spool = spool
        self._convert = convert
        self._budget = buffer_bytes
        self._received: list[int] = []
        self._chunks: dict[int, list[bytes]] = {}
        self._in_use = 0
        self._space = asyncio.Condition()
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="push-convert")
        self._pending: list[asyncio.Future] = []
        self.started = time.monotonic()
        self.bytes_received = 0
        self.shared_bytes = 0  # of bytes_received, those handed over in shared memory
        self.convert_s = 0.0
        self.crc32: dict[str, int] = {}  # checkpoint name -> CRC-32 of the tensor staged for it
        self.committed = False
        self.declare(header.tensors)

    def declare(self, specs: tuple[TensorSpec, ...] | list[TensorSpec]) -> None:
        """Add tensors to the push (the header's, then any PushDeclare's), checked against the model."""
        for spec in specs:
            if spec.delta is not None and self._base is None:
                raise InvalidArgument(f"tensors[{len(self.tensors)}].delta", f"{spec.name}: a delta tensor needs header.delta_base_version")
            self._mappings.append(self._table.check_tensor(len(self.tensors), spec, self._claimed, self.tensors))
            self.tensors.append(spec)
            self._received.append(0)

    async def add_chunk(self, index: int, offset: int, data: bytes) -> None:
        self._raise_conversion_error()
        if not 0 <= index < len(self.tensors):
            raise InvalidArgument(
                "chunk.tensor_index", f"{index} names no declared tensor ({len(self.tensors)} are declared)"
            )
        spec = self.tensors[index]
        got, size = self._received[index], spec.wire_nbytes
        if offset != got:
            where = "after the last byte" if got == size else f"where byte {got} was expected"
            raise DataLoss(f"{spec.name}: chunk at offset {offset} {where} (a tensor's chunks arrive in order, without gaps)")
        if got + len(data) > size:
            field = "delta.wire_nbytes" if spec.delta is not None else "nbytes"
            raise DataLoss(f"{spec.name}: {got + len(data) - size} byte(s) beyond its declared {field}={size}")
        if not data:
            return
        if got == 0:
            await self._reserve(_cost(spec))
            self._chunks[index] = []
        # The chunks are kept as received and joined on the conversion thread: no copy on the loop.
        self._chunks[index].append(data)
        self._received[index] = got + len(data)
        self.bytes_received += len(data)
        if self._received[index] == size:
            chunks = self._chunks.pop(index)
            future = asyncio.get_running_loop().run_in_executor(self._pool, self._finish_tensor, index, chunks)
            future.add_done_callback(lambda _f, n=_cost(spec): asyncio.ensure_future(self._release(n)))
            self._pending.append(future)

    async def add_shared(self, index: int, data: memoryview) -> None:
        """A tensor's bytes handed over in shared memory (TensorSpec.shared): its one chunk."""
        await self.add_chunk(index, 0, data)
        self.shared_bytes += len(data)

    @property
    def path(self) -> str:
        """How its bytes came, for the metrics: "load" (read by the server, LoadWeights), "delta"
        (a tensor sent as a delta), "shared_memory" (a tensor handed over in it), else "stream"."""
        if self.header.loaded_from:
            return "load"
        if any(t.delta is not None for t in self.tensors):
            return "delta"
        return "shared_memory" if self.shared_bytes else "stream"

    def result(
        self, version: int, receive_s: float, prepare_s: float, applied: list[ApplyStats], catching_up: list[str],
        warnings: list[str] | None = None,
    ) -> PushResult:
        """What this push reports once committed as `version`: its receive and preparation times
        and what loading it cost the engines that did (each figure's maximum over them, samples in
        flight summed), with the replicas still catching up."""
        return PushResult(
            version=version,
            bytes_received=self.bytes_received,
            dense_bytes=sum(t.nbytes for t in self.tensors),
            delta_tensors=sum(t.delta is not None for t in self.tensors),
            shared_bytes=self.shared_bytes,
            tensors_applied=len(self.tensors),
            receive_s=receive_s,
            requantize_s=self.convert_s + prepare_s,
            apply_s=max((a.apply_s for a in applied), default=0.0),
            pause_ms=max((a.pause_ms for a in applied), default=0.0),
            drain_ms=max((a.drain_ms for a in applied), default=0.0),
            label=self.header.label,
            samples_in_flight=sum(a.samples_in_flight for a in applied),
            replicas_catching_up=catching_up,
            warnings=warnings or [],
        )

    async def finish(self) -> None:
        """At the commit: every tensor complete, checked, converted and on disk."""
        if not self.tensors:
            raise InvalidArgument("tensors", "the push declared no tensor")
        for spec, got in zip(self.tensors, self._received):
            if got != spec.wire_nbytes:
                raise DataLoss(f"{spec.name}: {got} of {spec.wire_nbytes} bytes received before the commit")
        await asyncio.gather(*self._pending)
        self._check_aliases()
        await asyncio.get_running_loop().run_in_executor(self._pool, self.spool.flush)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- internals ------------------------------------------------------------------------------

    def _writer(self, index: int) -> bool:
        """Whether tensor `index` is the one its checkpoint names are staged from (not a tied LM
        head's second copy)."""
        return all(self._claimed[t] == index for t in self._mappings[index].targets)

    def _check_aliases(self) -> None:
        """A tied LM head and its embedding sent together must be equal (the model has one tensor)."""
        for index, crc in self._embedding_crc.items():
            writer = self._claimed[self._mappings[index].targets[0]]
            a, b = self.tensors[writer], self.tensors[index]
            if self._embedding_crc[writer] != crc or a.dtype != b.dtype:
                raise InvalidArgument(
                    f"tensors[{index}]",
                    f"{b.name!r} and {a.name!r} differ, but the served model ties them (one tensor, "
                    "tie_word_embeddings): send one of them, or both equal",
                )

    def _finish_tensor(self, index: int, chunks: list[bytes]) -> None:
        """On the conversion thread: join (or rebuild from a delta), check, convert, stage."""
        start = time.perf_counter()
        spec, mapping = self.tensors[index], self._mappings[index]
        tensor = None
        if spec.delta is not None:
            tensor, crc = rebuild(spec, b"".join(chunks), *self._base.read(mapping)), spec.crc32
        else:
            crc = 0
            for c in chunks:
                crc = zlib.crc32(c, crc)
            if spec.crc32 is not None and crc != spec.crc32:
                raise DataLoss(f"{spec.name}: CRC-32 of the received bytes is {crc:#010x}, the header declared {spec.crc32:#010x}")
        if mapping.targets == (self._table.names.embedding,):  # maybe one of a tied pair
            self._embedding_crc[index] = crc
        if not self._writer(index):
            self.convert_s += time.perf_counter() - start
            return
        if tensor is None:
            tensor = _joined(spec, chunks)
        for target, part in mapping.split(tensor).items():
            # One target is the received tensor itself (renamed at most); a split needs its own.
            self.crc32[target] = crc if len(mapping.targets) == 1 else crc32_of(part)
            self.spool.add(self._convert(target, part))
        self.convert_s += time.perf_counter() - start

    def _raise_conversion_error(self) -> None:
        for f in self._pending:
            if f.done() and f.exception() is not None:
                raise f.exception()

    async def _reserve(self, nbytes: int) -> None:
        async with self._space:
            await self._space.wait_for(lambda: self._in_use == 0 or self._in_use + nbytes <= self._budget)
            self._in_use += nbytes

    async def _release(self, nbytes: int) -> None:
        async with self._space:
            self._in_use -= nbytes
            self._space.notify_all()


# What rebuilding a delta tensor allocates, in its dense bytes: its base read from the store (1), a
# fused-experts base joined (1), and the decode with its result (1.9 at its peak, traced on an 8 MiB
# bf16 tensor with a tenth of its elements changed: tests/weights/test_session.py checks it).
DELTA_REBUILD_FACTOR = 4


def _cost(spec: TensorSpec) -> int:
    """The memory a tensor takes from the push buffer until it is converted: its bytes, or for a
    delta its wire bytes and what rebuilding it allocates."""
    return spec.nbytes if spec.delta is None else spec.wire_nbytes + DELTA_REBUILD_FACTOR * spec.nbytes


def _joined(spec: TensorSpec, chunks: list[bytes]) -> torch.Tensor:
    """A dense tensor from its chunks (the one chunk's bytes as they are, read-only: only read or
    copied by the conversion)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if len(chunks) == 1:
            flat = torch.frombuffer(chunks[0], dtype=torch.uint8)
        else:
            flat = torch.empty(spec.nbytes, dtype=torch.uint8)
            pos = 0
            for c in chunks:
                flat[pos : pos + len(c)].copy_(torch.frombuffer(c, dtype=torch.uint8))
                pos += len(c)
    return flat.view(spec.torch_dtype).reshape(spec.shape)
