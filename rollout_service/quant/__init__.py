"""Weight quantizers (pure torch, no vLLM): the same code quantizes a checkpoint at load and each
pushed tensor on arrival, so both paths give bitwise-identical weights."""

from rollout_service.quant.formats import QuantFormat, quantize_weight
from rollout_service.quant.recipe import Recipe, is_quantized_param

__all__ = ["QuantFormat", "Recipe", "is_quantized_param", "quantize_weight"]
