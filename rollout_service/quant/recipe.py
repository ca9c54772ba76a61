"""Which parameters are quantized, and the checkpoint config that tells vLLM how.

Default rule (decoder-only transformers such as Qwen2 / Llama): every 2-D `*.weight` inside the
decoder layers (`model.layers.N.*`) is a linear layer's weight and is quantized; embeddings,
norms, biases and `lm_head` stay in high precision, as in llm-compressor's default recipes.

A `Recipe` is that decision made explicit, per parameter: what `rollout-service profile` writes
(profile.pt) after reading a quantized checkpoint, and what the server follows when it quantizes
at load and requantizes pushed tensors (`serve --profile`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from rollout_service.quant.registry import FORMATS, QuantFormat

PROFILE_VERSION = 1

_LAYER_WEIGHT = re.compile(r"^model\.layers\.\d+\..+\.weight$")


def is_quantized_param(name: str, ndim: int) -> bool:
    """Whether the checkpoint parameter `name` (of `ndim` dimensions) is quantized."""
    return ndim == 2 and bool(_LAYER_WEIGHT.match(name))


@dataclass(frozen=True)
class Recipe:
    """How a quantized engine holds each parameter: the content of a profile."""

    fn: QuantFormat
    # Checkpoint names of the quantized parameters; None: the default rule above.
    quantized: tuple[str, ...] | None = None
    # Modules left unquantized (compressed-tensors' `ignore`), e.g. ["lm_head"].
    ignore: tuple[str, ...] = ("lm_head",)
    # Where it came from, for humans ("derived from MODEL with --fn int8", "profiled ...").
    source: str = ""

    def __post_init__(self) -> None:
        if self.fn not in FORMATS:
            raise ValueError(f"fn={self.fn!r} is not one of {', '.join(FORMATS)}")

    def quantizes(self, name: str, ndim: int) -> bool:
        """Whether parameter `name` is held quantized."""
        if self.quantized is None:
            return is_quantized_param(name, ndim)
        return name in self.quantized

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["quantized"] = list(self.quantized) if self.quantized is not None else None
        d["ignore"] = list(self.ignore)
        return {"profile_version": PROFILE_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict, origin: str = "profile") -> Recipe:
        if not isinstance(d, dict) or d.get("profile_version") != PROFILE_VERSION:
            raise ValueError(f"{origin}: not a rollout-service profile (version {PROFILE_VERSION} expected)")
        quantized = d.get("quantized")
        return cls(
            fn=d["fn"], quantized=tuple(quantized) if quantized is not None else None,
            ignore=tuple(d.get("ignore", ())), source=d.get("source", ""),
        )

    def save(self, path: Path) -> Path:
        """A torch-loadable (weights_only) profile file, as FlashRL's profile.pt."""
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: Path) -> Recipe:
        import torch

        if not path.is_file():
            raise FileNotFoundError(f"profile {str(path)!r} does not exist")
        try:
            data = torch.load(path, weights_only=True)
        except Exception as exc:
            raise ValueError(f"profile {str(path)!r} is not a readable profile file: {exc}") from None
        return cls.from_dict(data, origin=f"profile {str(path)!r}")


def quantization_config(fmt: QuantFormat, ignore: tuple[str, ...] = ("lm_head",)) -> dict:
    """The `quantization_config` entry of config.json for a compressed-tensors checkpoint;
    `ignore`: Linear modules left unquantized."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStrategy,
        QuantizationType,
    )

    spec = FORMATS[fmt]
    kind = QuantizationType(spec.number)
    weights = QuantizationArgs(
        num_bits=8,
        type=kind,
        strategy=QuantizationStrategy(spec.strategy),
        symmetric=True,
        dynamic=False,
    )
    activations = QuantizationArgs(
        num_bits=8, type=kind, strategy=QuantizationStrategy.TOKEN, symmetric=True, dynamic=True
    )
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)},
        format=f"{spec.number}-quantized",
        quantization_status="compressed",
        ignore=list(ignore),
    )
    return config.model_dump(exclude_none=True)
