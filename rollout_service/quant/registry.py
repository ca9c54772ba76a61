"""The weight formats a quantized engine runs, declared once.

Every place that names a format reads this table: the config's `quantization` choices and their
help, the `serve` / `profile` / `estimate` / `report` options, FlashRL's `fn` names, the quantizer,
the compressed-tensors config a quantized checkpoint carries, the profile's reading of one, and
the engine's CPU check. Adding a format is a row here plus its arithmetic in quant/formats.py.

No torch here: the CLI and the config import this module on every start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class QuantFormatSpec:
    """One weight format, in compressed-tensors' terms (8-bit, symmetric, dynamic per-token activations)."""

    name: str
    summary: str  # one phrase for --help and the README
    number: Literal["int", "float"]  # compressed-tensors QuantizationType of weights and activations
    strategy: Literal["channel", "tensor"]  # weight scales: one per output row, or one per tensor
    cpu: bool  # vLLM's CPU backend has kernels for it
    flashrl_names: tuple[str, ...]  # FlashRL `fn` names that mean this format


FORMATS: dict[str, QuantFormatSpec] = {
    spec.name: spec
    for spec in (
        QuantFormatSpec(
            "int8", "W8A8: per-channel int8 weights, dynamic per-token int8 activations",
            number="int", strategy="channel", cpu=True, flashrl_names=("int8",),
        ),
        QuantFormatSpec(
            "fp8", "e4m3 weights with one per-tensor scale", number="float", strategy="tensor", cpu=False,
            flashrl_names=("fp8", "fp8_vllm", "fp8_tensor"),
        ),
        QuantFormatSpec(
            "fp8_channel", "e4m3 weights with a per-channel scale", number="float", strategy="channel", cpu=False,
            flashrl_names=("fp8_channel",),
        ),
    )
}

# The names as a type, for pydantic and typer (which list its values as the choices). Built from
# the table rather than written out so that the names exist once; static checkers see a plain str.
QuantFormat = Literal[tuple(FORMATS)]  # type: ignore[valid-type]


def by_scheme(num_bits: int, number: str, strategy: str) -> QuantFormatSpec | None:
    """The format of a compressed-tensors weight scheme; None when none here matches."""
    if num_bits != 8:
        return None
    return next((s for s in FORMATS.values() if (s.number, s.strategy) == (number, strategy)), None)


def describe() -> str:
    """The formats in one line, e.g. for the config's `quantization` description."""
    return "; ".join(f"'{s.name}': {s.summary}{'' if s.cpu else ' (GPU only)'}" for s in FORMATS.values())
