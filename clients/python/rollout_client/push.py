"""The PushWeights request stream, built from a state_dict or any iterable of (name, tensor).

Tensors are declared (PushDeclare, with their CRC-32) a bucket at a time, right before their
chunks, so only the bucket being sent is touched: an iterator that gathers or materializes
tensors one by one is streamed without a second copy of the model. Bytes go as they are in memory (little-endian, row-major);
no pickle. torch tensors (bfloat16/float16/float32) and numpy arrays (float16/float32, or
ml_dtypes' bfloat16) are accepted; torch is only imported if the caller passes torch tensors.

Delta pushes (`push_weights`' default when it streams; see rollout_client.delta): the client keeps a
copy of the bf16 bits it last pushed (`DeltaBase`) and sends each tensor that had one as its changes
against it, declaring the whole tensor's CRC-32 so the server's rebuild is checked end to end.
"""

from __future__ import annotations

import sys
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rollout_client import delta
from rollout_client.shared import Full, SharedWriter, Stopped
from rollout_client.proto.rollout.v1 import rollout_pb2 as pb

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024
_TORCH_DTYPES = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}
_NUMPY_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


@dataclass
class PushResult:
    """What the server reports for a committed push."""

    version: int
    bytes_received: int
    tensors_applied: int
    receive_s: float
    requantize_s: float
    apply_s: float
    pause_ms: float
    drain_ms: float
    label: str
    seconds: float  # wall time of the whole call, measured by the client
    samples_in_flight: int = 0  # samples in the engine when generation paused for the push
    # Replicas that loaded the committed version from the store instead; the client waited for them.
    replicas_catching_up: list[str] = field(default_factory=list)
    dense_bytes: int = 0  # the tensors whole; bytes_received is what went on the wire
    delta_tensors: int = 0  # tensors sent as deltas
    fell_back: str = ""  # why a delta push went whole instead (the server's refusal), if it did
    shared_bytes: int = 0  # of bytes_received, those handed over in shared memory (same host)
    # What failed on the server after the commit point without undoing it (logged as warnings).
    warnings: list[str] = field(default_factory=list)

    @property
    def gbps(self) -> float:
        """The tensors' whole size per second: how fast the model was synced."""
        return (self.dense_bytes or self.bytes_received) / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def wire_ratio(self) -> float:
        """Bytes on the wire / the tensors' whole size (1.0 for a push of whole tensors)."""
        return self.bytes_received / self.dense_bytes if self.dense_bytes else 1.0

    def __str__(self) -> str:
        wire = f", {self.bytes_received / 1e9:.3f} GB on the wire ({self.delta_tensors} deltas)" if self.delta_tensors else ""
        if self.shared_bytes:
            wire += f", {self.shared_bytes / 1e9:.3f} GB through shared memory"
        return (
            f"pushed {self.tensors_applied} tensors, {(self.dense_bytes or self.bytes_received) / 1e9:.3f} GB{wire} "
            f"in {self.seconds:.2f} s ({self.gbps:.2f} GB/s) -> version {self.version} (apply {self.apply_s * 1e3:.0f} ms, "
            f"generation paused {self.pause_ms:.0f} ms"
            + (f" after a {self.drain_ms:.0f} ms drain" if self.drain_ms >= 1 else "")
            + f", {self.samples_in_flight} samples in flight)"
        )


def result_from_proto(msg: pb.PushWeightsResponse, seconds: float, fell_back: str = "", stacklevel: int = 4) -> PushResult:
    """The client's PushResult of the server's reply; each warning the server sent (something that
    failed after the commit point without undoing it) is also raised as a Python warning.

    Args:
        msg: the server's reply.
        seconds: the push's wall time, measured by the client.
        fell_back: why a delta push went whole instead, if it did.
        stacklevel: where the warnings point, counted from this function (as warnings.warn's).
    """
    for text in msg.warnings:
        warnings.warn(f"push committed as version {msg.version}, with a problem: {text}", stacklevel=stacklevel)
    return PushResult(
        version=msg.version,
        bytes_received=msg.bytes_received,
        tensors_applied=msg.tensors_applied,
        receive_s=msg.receive_s,
        requantize_s=msg.requantize_s,
        apply_s=msg.apply_s,
        pause_ms=msg.pause_ms,
        drain_ms=msg.drain_ms,
        label=msg.label,
        seconds=seconds,
        samples_in_flight=msg.samples_in_flight,
        replicas_catching_up=list(msg.replicas_catching_up),
        dense_bytes=msg.dense_bytes,
        delta_tensors=msg.delta_tensors,
        fell_back=fell_back,
        shared_bytes=msg.shared_bytes,
        warnings=list(msg.warnings),
    )


class DeltaBase:
    """What a client's delta pushes encode against: the bf16 bits of each tensor its delta pushes
    sent, as of weight version `version` (None until such a push commits). It costs one
    bf16 copy of the pushed model in host memory (2 bytes per parameter: 15 GB for a 7B model).
    Updated in place as a push encodes; dropped if a push fails other than by its base. One push
    at a time uses it: don't run two pushes of one client concurrently (the server refuses the
    second anyway, ABORTED; the base is then dropped and the next delta push goes whole)."""

    def __init__(self) -> None:
        self.version: int | None = None
        self.tensors: dict[str, np.ndarray] = {}  # name -> its bf16 bits, uint16 in its shape
        self.crc32: dict[str, int] = {}

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def clear(self) -> None:
        self.version = None
        self.tensors.clear()
        self.crc32.clear()


@dataclass
class DeltaPlan:
    """One push's use of a DeltaBase: the codec the server takes, and the tensors taken from the
    caller so far, in order (a refused delta push is sent again whole from them, then the rest of
    the caller's tensors). With no base version yet, every tensor goes whole and is recorded."""

    base: DeltaBase
    codec: str
    taken: list[tuple[str, _Held | None]] = field(default_factory=list)  # None: as in the base

    @property
    def base_version(self) -> int | None:
        return self.base.version

    def encode(self, name: str, dtype: str, shape: tuple[int, ...], flat: np.ndarray, crc: int) -> tuple[pb.DeltaSpec | None, np.ndarray]:
        """(its DeltaSpec and payload, or None and `flat` to send it whole), recording it."""
        if dtype != "bfloat16":  # not kept (numpy float32): any older bf16 copy is now stale
            self.base.tensors.pop(name, None)
            self.base.crc32.pop(name, None)
            self.taken.append((name, _Held(dtype, shape, flat)))
            return None, flat
        self.taken.append((name, None))
        bits = flat.view(np.uint16)
        old = self.base.tensors.get(name)
        if old is None or old.shape != shape:
            self.base.tensors[name] = bits.reshape(shape).copy()
            self.base.crc32[name] = crc
            return None, flat
        old = old.reshape(-1)
        spec = None
        if self.base_version is not None:
            payload, changed = delta.encode(old, bits, self.codec)
            if len(payload) <= delta.MAX_RATIO * flat.nbytes:
                spec = pb.DeltaSpec(codec=self.codec, base_crc32=self.base.crc32[name], changed=changed, wire_nbytes=len(payload))
                flat = np.frombuffer(payload, dtype=np.uint8)
        np.copyto(old, bits)
        self.base.crc32[name] = crc
        return spec, flat

    def resent(self) -> Iterator[tuple[str, _Held]]:
        """Every tensor taken so far, whole, as it was taken (bf16 ones from the base)."""
        for name, held in self.taken:
            if held is None:
                bits = self.base.tensors[name]
                held = _Held("bfloat16", bits.shape, bits.reshape(-1).view(np.uint8))
            yield name, held


@dataclass
class _Held:
    """A tensor's bytes as taken from the caller (sent again whole after a refused delta push)."""

    dtype: str
    shape: tuple[int, ...]
    flat: np.ndarray


def as_bytes(name: str, tensor: Any, to_bf16: bool = False) -> tuple[str, tuple[int, ...], np.ndarray]:
    """(dtype name, shape, flat uint8 view) of a tensor, without copying when it is contiguous on
    CPU. `to_bf16`: torch float32/float16 tensors cast to bfloat16 first (the cast the server makes
    for a bf16 engine, so the same bits)."""
    if isinstance(tensor, _Held):
        return tensor.dtype, tensor.shape, tensor.flat
    if type(tensor).__module__.startswith("torch"):
        dtype = _TORCH_DTYPES.get(str(tensor.dtype))
        if dtype is None:
            raise TypeError(f"{name}: dtype {tensor.dtype} is not one of bfloat16, float16, float32")
        import torch

        t = tensor.detach().to("cpu")
        if to_bf16 and dtype != "bfloat16":
            t, dtype = t.to(torch.bfloat16), "bfloat16"
        t = t.contiguous()
        return dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy()
    array = np.asarray(tensor)
    dtype = _NUMPY_DTYPES.get(array.dtype.name)
    if dtype is None:
        raise TypeError(f"{name}: dtype {array.dtype} is not one of bfloat16, float16, float32")
    array = np.ascontiguousarray(array)
    return dtype, tuple(array.shape), array.reshape(-1).view(np.uint8)


def total_bytes(weights: Any, to_bf16: bool = False) -> int | None:
    """The bytes a push sends of a state_dict's tensors (None for an iterator: not known before it
    ends); `to_bf16` as in `as_bytes`: torch tensors then count 2 bytes an element."""
    if not isinstance(weights, Mapping):
        return None

    def size(t: Any) -> int:
        torch_float = to_bf16 and type(t).__module__.startswith("torch") and t.is_floating_point()
        return int(np.prod(getattr(t, "shape", ()))) * (2 if torch_float else _itemsize(t))

    return sum(size(t) for t in weights.values())


def items(weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
    return iter(weights.items()) if isinstance(weights, Mapping) else iter(weights)


class _Progress:
    """A tqdm bar over bytes when tqdm is installed and `enabled`; otherwise nothing."""

    def __init__(self, enabled: bool, total: int | None):
        self._bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                print("progress=True needs tqdm (pip install tqdm); pushing without a bar", file=sys.stderr)
            else:
                self._bar = tqdm(total=total, unit="B", unit_scale=True, desc="push", leave=False)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def requests(
    weights: Mapping[str, Any] | Iterable[tuple[str, Any]],
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    expected_version: int | None = None,
    label: str = "",
    inflight: str = "",
    progress: bool = False,
    plan: DeltaPlan | None = None,
    shared: SharedWriter | None = None,
    total: int | None = None,
) -> Iterator[pb.PushWeightsRequest]:
    """The PushWeights messages: header; per bucket a PushDeclare of its tensors and their chunks;
    commit.

    A bucket is consecutive tensors of about `bucket_bytes` (closed once it reaches that size):
    they are copied to host memory together (one declare message per bucket) and released once
    sent, so the client holds at most one bucket beyond the caller's own tensors. With a `plan`,
    tensors are cast to bf16, recorded in its base and sent as deltas where it has them. With
    `shared`, each bucket's bytes go into one shared-memory file instead of chunks.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes={chunk_bytes} must be positive")
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
    if progress and total is None:
        total = total_bytes(weights)
    header = pb.PushHeader(label=label, inflight=inflight)
    if expected_version is not None:
        header.expected_version = expected_version
    if plan is not None and plan.base_version is not None:
        header.delta_base_version = plan.base_version
    yield pb.PushWeightsRequest(header=header)
    bar = _Progress(progress, total)
    index = 0
    try:
        for bucket in _buckets(items(weights), bucket_bytes, to_bf16=plan is not None):
            specs, payloads = [], []
            for name, dtype, shape, flat in bucket:
                spec = pb.TensorSpec(name=name, dtype=dtype, shape=shape, nbytes=flat.nbytes, crc32=zlib.crc32(flat))
                if plan is not None:
                    encoded, flat = plan.encode(name, dtype, shape, flat, spec.crc32)
                    if encoded is not None:
                        spec.delta.CopyFrom(encoded)
                specs.append(spec)
                payloads.append(flat)
            handed = [i for i, flat in enumerate(payloads) if flat.nbytes] if shared is not None else []
            if handed:
                try:
                    file, offsets = shared.write([payloads[i] for i in handed])
                except Full as exc:
                    warnings.warn(f"shared memory is full ({exc}): streaming the rest of this push", stacklevel=2)
                    shared = None
                else:
                    for i, offset in zip(handed, offsets):
                        specs[i].shared.CopyFrom(pb.SharedBytes(file=file, offset=offset))
                        payloads[i] = payloads[i][:0]  # no chunks
            yield pb.PushWeightsRequest(declare=pb.PushDeclare(tensors=specs))
            for spec, flat in zip(specs, payloads):
                for offset in range(0, flat.nbytes, chunk_bytes):
                    piece = flat[offset : offset + chunk_bytes]
                    chunk = pb.PushChunk(tensor_index=index, offset=offset, data=piece.tobytes())
                    yield pb.PushWeightsRequest(chunk=chunk)
                    bar.update(piece.nbytes)
                bar.update(spec.nbytes - flat.nbytes)  # the bar counts a delta or shared tensor whole
                index += 1
        yield pb.PushWeightsRequest(commit=pb.PushCommit())
    finally:
        bar.close()


class SourceErrors:
    """Wraps the request stream and keeps the first exception it raised: gRPC reports a failing
    request iterator only as a cancelled call, and the caller should see the real error (a
    tensor's bad dtype, their generator's own exception).

    gRPC draws the stream on a thread of its own, which may still be building a request when the
    call has already failed: `stop` waits for that request and ends the stream, so the caller can
    go on with the tensors it was drawing from (a refused delta push, sent again whole).
    `shared`: the stream's shared-memory files, deleted by `close` where the server left them."""

    def __init__(self, stream: Iterator[pb.PushWeightsRequest], shared: SharedWriter | None = None):
        self._stream = stream
        self._lock = threading.Lock()
        self._stopped = False
        self.shared = shared
        self.error: BaseException | None = None

    def __iter__(self) -> SourceErrors:
        return self

    def __next__(self) -> pb.PushWeightsRequest:
        with self._lock:
            if self._stopped:
                raise StopIteration
            try:
                return next(self._stream)
            except StopIteration:
                raise
            except Stopped:
                raise StopIteration from None
            except Exception as exc:
                self.error = exc
                raise

    def stop(self) -> None:
        if self.shared is not None:
            self.shared.stop()  # the stream may be waiting for the server to take a file
        with self._lock:
            self._stopped = True

    def close(self) -> None:
        """After the call: delete the shared-memory files the server did not take. Does not wait
        for gRPC's thread, which may be inside the caller's generator (itself maybe waiting for
        this push to end)."""
        if self.shared is not None:
            self.shared.close()


def _buckets(
    items: Iterator[tuple[str, Any]], bucket_bytes: int, to_bf16: bool = False
) -> Iterator[list[tuple[str, str, tuple[int, ...], np.ndarray]]]:
    """Consecutive (name, dtype, shape, host bytes) groups; a group is closed as soon as it holds
    `bucket_bytes`, so no tensor is pulled from `items` before the previous bucket is sent."""
    bucket: list[tuple[str, str, tuple[int, ...], np.ndarray]] = []
    size = 0
    for name, tensor in items:
        dtype, shape, flat = as_bytes(name, tensor, to_bf16)
        bucket.append((name, dtype, shape, flat))
        size += flat.nbytes
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _itemsize(tensor: Any) -> int:
    size = getattr(tensor, "itemsize", None)  # numpy; torch >= 2.1
    return int(size) if size is not None else tensor.element_size()
