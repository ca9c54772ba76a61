"""Weight quantizers (pure torch, no vLLM): the same code quantizes a checkpoint at load and each
pushed tensor on arrival, so both paths give bitwise-identical weights.

The names below are imported on first use: the config and the CLI read quant/registry.py on
every start, and importing this package must not import torch for them.
"""

from importlib import import_module

_EXPORTS = {
    "QuantFormat": "rollout_service.quant.registry",
    "quantize_weight": "rollout_service.quant.formats",
    "Recipe": "rollout_service.quant.recipe",
    "is_quantized_param": "rollout_service.quant.recipe",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
