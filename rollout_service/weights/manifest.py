"""What a push declares (one TensorSpec per tensor) and the checks against the served model."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from rollout_service.errors import InvalidArgument
from rollout_service.weights.store import safetensors_header

# Wire dtypes a push may use; each is converted to the engine's dtype on arrival.
DTYPES: dict[str, torch.dtype] = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# safetensors' names for them (HTTP pushes send safetensors).
SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    crc32: int | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True, slots=True)
class PushHeader:
    tensors: tuple[TensorSpec, ...]
    expected_version: int | None = None
    label: str = ""
    inflight: str = ""


class ParamTable:
    """The served model's parameters in checkpoint naming: name -> shape, read from the safetensors
    headers of the checkpoint the server started from (no tensor data is read)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes

    @classmethod
    def from_checkpoint(cls, model: Path) -> ParamTable:
        shapes: dict[str, tuple[int, ...]] = {}
        for f in sorted(model.glob("*.safetensors")):
            for name, info in safetensors_header(f).items():
                shapes[name] = tuple(info["shape"])
        return cls(shapes)

    def check_header(self, header: PushHeader, inflight_policies: tuple[str, ...]) -> None:
        if header.inflight and header.inflight not in inflight_policies:
            raise InvalidArgument("header.inflight", f"{header.inflight!r} is not one of {', '.join(inflight_policies)}")

    def check_tensor(self, index: int, spec: TensorSpec, seen: dict[str, int]) -> None:
        """Raise InvalidArgument naming the tensor (declared as number `index`) and its problem;
        `seen` maps the names declared so far to their index and gains this one."""
        field = f"tensors[{index}]"
        if spec.name in seen:
            raise InvalidArgument(f"{field}.name", f"{spec.name!r} is declared twice (also tensors[{seen[spec.name]}])")
        if spec.name not in self.shapes:
            raise InvalidArgument(f"{field}.name", f"{spec.name!r} is not a parameter of the served model")
        if spec.dtype not in DTYPES:
            raise InvalidArgument(f"{field}.dtype", f"{spec.name}: dtype {spec.dtype!r} is not one of {', '.join(DTYPES)}")
        expected = self.shapes[spec.name]
        if spec.shape != expected:
            raise InvalidArgument(
                f"{field}.shape", f"{spec.name}: shape {list(spec.shape)} does not match the model's {list(expected)}"
            )
        size = math.prod(spec.shape) * spec.torch_dtype.itemsize
        if spec.nbytes != size:
            raise InvalidArgument(
                f"{field}.nbytes",
                f"{spec.name}: nbytes={spec.nbytes} but shape {list(spec.shape)} of {spec.dtype} takes {size} bytes",
            )
        seen[spec.name] = index
