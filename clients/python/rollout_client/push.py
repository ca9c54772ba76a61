"""The PushWeights request stream, built from a state_dict or any iterable of (name, tensor).

Tensors are declared (PushDeclare, with their CRC-32) a bucket at a time, right before their
chunks, so only the bucket being sent is touched: an iterator that gathers or materializes
tensors one by one is streamed without a second copy of the model. Bytes go as they are in memory (little-endian, row-major);
no pickle. torch tensors (bfloat16/float16/float32) and numpy arrays (float16/float32, or
ml_dtypes' bfloat16) are accepted; torch is only imported if the caller passes torch tensors.
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rollout_client._proto.rollout.v1 import rollout_pb2 as pb

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

    @property
    def gbps(self) -> float:
        return self.bytes_received / self.seconds / 1e9 if self.seconds else 0.0

    def __str__(self) -> str:
        return (
            f"pushed {self.tensors_applied} tensors, {self.bytes_received / 1e9:.3f} GB in {self.seconds:.2f} s "
            f"({self.gbps:.2f} GB/s) -> version {self.version} (apply {self.apply_s * 1e3:.0f} ms, "
            f"generation paused {self.pause_ms:.0f} ms"
            + (f" after a {self.drain_ms:.0f} ms drain" if self.drain_ms >= 1 else "")
            + f", {self.samples_in_flight} samples in flight)"
        )


def result_from_proto(msg: pb.PushWeightsResponse, seconds: float) -> PushResult:
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
    )


def as_bytes(name: str, tensor: Any) -> tuple[str, tuple[int, ...], np.ndarray]:
    """(dtype name, shape, flat uint8 view) of a tensor, without copying when it is contiguous on CPU."""
    if type(tensor).__module__.startswith("torch"):
        dtype = _TORCH_DTYPES.get(str(tensor.dtype))
        if dtype is None:
            raise TypeError(f"{name}: dtype {tensor.dtype} is not one of bfloat16, float16, float32")
        t = tensor.detach().to("cpu").contiguous()
        import torch

        return dtype, tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy()
    array = np.asarray(tensor)
    dtype = _NUMPY_DTYPES.get(array.dtype.name)
    if dtype is None:
        raise TypeError(f"{name}: dtype {array.dtype} is not one of bfloat16, float16, float32")
    array = np.ascontiguousarray(array)
    return dtype, tuple(array.shape), array.reshape(-1).view(np.uint8)


def _items(weights: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> Iterator[tuple[str, Any]]:
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
) -> Iterator[pb.PushWeightsRequest]:
    """The PushWeights messages: header; per bucket a PushDeclare of its tensors and their chunks;
    commit.

    A bucket is consecutive tensors of about `bucket_bytes` (closed once it reaches that size):
    they are copied to host memory together (one declare message per bucket) and released once
    sent, so the client holds at most one bucket beyond the caller's own tensors.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes={chunk_bytes} must be positive")
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
    total = None
    if progress and isinstance(weights, Mapping):
        total = sum(int(np.prod(getattr(t, "shape", ()))) * _itemsize(t) for t in weights.values())
    header = pb.PushHeader(label=label, inflight=inflight)
    if expected_version is not None:
        header.expected_version = expected_version
    yield pb.PushWeightsRequest(header=header)
    bar = _Progress(progress, total)
    index = 0
    try:
        for bucket in _buckets(_items(weights), bucket_bytes):
            specs = [
                pb.TensorSpec(name=name, dtype=dtype, shape=shape, nbytes=flat.nbytes, crc32=zlib.crc32(flat))
                for name, dtype, shape, flat in bucket
            ]
            yield pb.PushWeightsRequest(declare=pb.PushDeclare(tensors=specs))
            for _, _, _, flat in bucket:
                for offset in range(0, flat.nbytes, chunk_bytes):
                    piece = flat[offset : offset + chunk_bytes]
                    chunk = pb.PushChunk(tensor_index=index, offset=offset, data=piece.tobytes())
                    yield pb.PushWeightsRequest(chunk=chunk)
                    bar.update(piece.nbytes)
                index += 1
        yield pb.PushWeightsRequest(commit=pb.PushCommit())
    finally:
        bar.close()


class SourceErrors:
    """Wraps the request stream and keeps the first exception it raised: gRPC reports a failing
    request iterator only as a cancelled call, and the caller should see the real error (a
    tensor's bad dtype, their generator's own exception)."""

    def __init__(self, stream: Iterator[pb.PushWeightsRequest]):
        self._stream = stream
        self.error: BaseException | None = None

    def __iter__(self) -> Iterator[pb.PushWeightsRequest]:
        try:
            yield from self._stream
        except Exception as exc:
            self.error = exc
            raise


def _buckets(
    items: Iterator[tuple[str, Any]], bucket_bytes: int
) -> Iterator[list[tuple[str, str, tuple[int, ...], np.ndarray]]]:
    """Consecutive (name, dtype, shape, host bytes) groups; a group is closed as soon as it holds
    `bucket_bytes`, so no tensor is pulled from `items` before the previous bucket is sent."""
    bucket: list[tuple[str, str, tuple[int, ...], np.ndarray]] = []
    size = 0
    for name, tensor in items:
        dtype, shape, flat = as_bytes(name, tensor)
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
