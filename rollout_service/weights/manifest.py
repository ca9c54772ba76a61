"""What a push declares (one TensorSpec per tensor) and the checks against the served model."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from rollout_client.delta import CODECS, raw_size
from rollout_service.errors import InvalidArgument
from rollout_service.weights.names import Mapping, NameMap, UnknownName
from rollout_service.weights.store import safetensors_header

# Wire dtypes a push may use; each is converted to the engine's dtype on arrival.
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# safetensors' names for them (HTTP pushes send safetensors).
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True, slots=True)
class DeltaSpec:
    """How a delta tensor's bytes encode it against its base (rollout_client.delta)."""

    codec: str
    base_crc32: int
    changed: int
    wire_nbytes: int


@dataclass(frozen=True, slots=True)
class SharedBytes:
    """Where a tensor's bytes lie in the server's shared-memory directory (weights/shared.py)."""

    file: str
    offset: int


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int  # of the whole tensor, also when it comes as a delta
    crc32: int | None = None  # of the whole tensor
    delta: DeltaSpec | None = None
    shared: SharedBytes | None = None  # its bytes are in shared memory, not in chunks

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def wire_nbytes(self) -> int:
        """Bytes its chunks (or its shared memory) carry."""
        return self.delta.wire_nbytes if self.delta is not None else self.nbytes


@dataclass(frozen=True, slots=True)
class PushHeader:
    tensors: tuple[TensorSpec, ...]
    expected_version: int | None = None
    label: str = ""
    inflight: str = ""
    delta_base_version: int | None = None
    loaded_from: str = ""  # the checkpoint the server read the push from (LoadWeights); "" for a pushed one


# Reads a push's header (its first message, a safetensors header): called once the push lock is
# held, so a second pusher's announcement is not even parsed while a push runs.
HeaderReader = Callable[[], Awaitable[PushHeader]]


class ParamTable:
    """The served model's parameters in checkpoint naming (name -> shape, read from the safetensors
    headers of the checkpoint the server started from; no tensor data is read), and the checks of a
    push against them, in the names trainers send (weights/names.py)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], tied: bool = False):
        self.shapes = shapes
        self.names = NameMap(shapes, tied)

    @classmethod
    def from_checkpoint(cls, model: Path) -> ParamTable:
        shapes: dict[str, tuple[int, ...]] = {}
        for f in sorted(model.glob("*.safetensors")):
            for name, info in safetensors_header(f).items():
                shapes[name] = tuple(info["shape"])
        return cls(shapes, tied=ties_embeddings(model))

    def check_header(self, header: PushHeader, inflight_policies: tuple[str, ...]) -> None:
        if header.inflight and header.inflight not in inflight_policies:
            raise InvalidArgument("header.inflight", f"{header.inflight!r} is not one of {', '.join(inflight_policies)}")

    def check_tensor(self, index: int, spec: TensorSpec, claimed: dict[str, int], declared: list[TensorSpec]) -> Mapping:
        """The mapping of tensor `spec` (declared as number `index`), or InvalidArgument naming it
        and its problem. `claimed` maps the checkpoint names earlier tensors write to their index
        and gains this tensor's; `declared` are the earlier tensors."""
        field = f"tensors[{index}]"
        try:
            mapping = self.names.resolve(spec.name)
        except UnknownName as exc:
            raise InvalidArgument(f"{field}.name", str(exc)) from None
        for target in mapping.targets:
            if target in claimed:
                other = declared[claimed[target]]
                if other.name == spec.name:
                    raise InvalidArgument(f"{field}.name", f"{spec.name!r} is declared twice (also tensors[{claimed[target]}])")
                if mapping.alias_of is None and self.names.resolve(other.name).alias_of is None:
                    raise InvalidArgument(
                        f"{field}.name",
                        f"{spec.name!r} and tensors[{claimed[target]}] {other.name!r} are the same parameter {target!r}",
                    )
        if spec.dtype not in DTYPES:
            raise InvalidArgument(f"{field}.dtype", f"{spec.name}: dtype {spec.dtype!r} is not one of {', '.join(DTYPES)}")
        if spec.shape != mapping.shape:
            raise InvalidArgument(
                f"{field}.shape", f"{spec.name}: shape {list(spec.shape)} does not match the model's {list(mapping.shape)}"
            )
        size = math.prod(spec.shape) * spec.torch_dtype.itemsize
        if spec.nbytes != size:
            raise InvalidArgument(
                f"{field}.nbytes",
                f"{spec.name}: nbytes={spec.nbytes} but shape {list(spec.shape)} of {spec.dtype} takes {size} bytes",
            )
        if spec.delta is not None:
            self._check_delta(field, spec)
        for target in mapping.targets:
            claimed.setdefault(target, index)
        return mapping

    def _check_delta(self, field: str, spec: TensorSpec) -> None:
        delta = spec.delta
        if spec.dtype != "bfloat16":
            raise InvalidArgument(f"{field}.dtype", f"{spec.name}: a delta tensor is bfloat16, not {spec.dtype}")
        if delta.codec not in CODECS:
            raise InvalidArgument(f"{field}.delta.codec", f"{spec.name}: {delta.codec!r} is not one of {', '.join(CODECS)}")
        if delta.changed > math.prod(spec.shape):
            raise InvalidArgument(
                f"{field}.delta.changed", f"{spec.name}: {delta.changed} changed elements in a tensor of {math.prod(spec.shape)}"
            )
        if spec.crc32 is None:
            raise InvalidArgument(f"{field}.crc32", f"{spec.name}: a delta tensor needs the CRC-32 of the whole tensor it rebuilds")
        # What the chunks carry is bounded like the tensor itself (the push's memory and size
        # limits count nbytes): a delta is never larger than the tensor, and "none" is exact.
        raw = raw_size(math.prod(spec.shape), delta.changed)
        if not 1 <= delta.wire_nbytes <= spec.nbytes or (delta.codec == "none" and delta.wire_nbytes != raw):
            bound = f"exactly {raw} for codec 'none'" if delta.codec == "none" else f"1..{spec.nbytes} (the tensor's nbytes)"
            raise InvalidArgument(f"{field}.delta.wire_nbytes", f"{spec.name}: {delta.wire_nbytes} is not {bound}")


def ties_embeddings(model: Path) -> bool:
    """Whether the served model's LM head is its input embedding (`tie_word_embeddings`, with the
    family's default where config.json leaves it out, e.g. Gemma)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model)
    return bool(getattr(config.get_text_config(), "tie_word_embeddings", False))
