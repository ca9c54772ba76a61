"""Which parameters are quantized, and the checkpoint config that tells vLLM how.

Rule (decoder-only transformers such as Qwen2 / Llama): every 2-D `*.weight` inside the decoder
layers (`model.layers.N.*`) is a linear layer's weight and is quantized; embeddings, norms,
biases and `lm_head` stay in high precision, as in llm-compressor's default recipes.
"""

from __future__ import annotations

import re

from rollout_service.quant.formats import QuantFormat

_LAYER_WEIGHT = re.compile(r"^model\.layers\.\d+\..+\.weight$")


def is_quantized_param(name: str, ndim: int) -> bool:
    """Whether the checkpoint parameter `name` (of `ndim` dimensions) is quantized."""
    return ndim == 2 and bool(_LAYER_WEIGHT.match(name))


def quantization_config(fmt: QuantFormat) -> dict:
    """The `quantization_config` entry of config.json for a compressed-tensors checkpoint."""
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStrategy,
        QuantizationType,
    )

    kind = QuantizationType.INT if fmt == "int8" else QuantizationType.FLOAT
    weights = QuantizationArgs(
        num_bits=8,
        type=kind,
        strategy=QuantizationStrategy.TENSOR if fmt == "fp8" else QuantizationStrategy.CHANNEL,
        symmetric=True,
        dynamic=False,
    )
    activations = QuantizationArgs(
        num_bits=8, type=kind, strategy=QuantizationStrategy.TOKEN, symmetric=True, dynamic=True
    )
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights, input_activations=activations)},
        format="int-quantized" if fmt == "int8" else "float-quantized",
        quantization_status="compressed",
        ignore=["lm_head"],
    )
    return config.model_dump(exclude_none=True)
