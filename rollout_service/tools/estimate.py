"""`rollout-service estimate`: GPU memory, replicas per GPU and rough cost of a deployment.

Memory of one engine replica, in bytes:
    weights  = quantized params x 1 (int8/fp8) + the rest x 2 (bf16) + one float32 scale per
               output row of each quantized weight (per-channel formats)
    kv cache = 2 (K and V) x layers x kv_heads x head_dim x 2 (bf16) x max_model_len x concurrency
    staging  = push_buffer_mib (pushed tensors being converted; ServerConfig.push_buffer_mib)
    runtime  = RUNTIME_RESERVE_GIB (CUDA context, activations, CUDA graphs; a rough constant)
A replica fits a GPU when the sum is within gpu_memory_utilization of its memory; otherwise it
needs tensor parallelism over the smallest power of two of GPUs whose share fits (weights and KV
split, staging and runtime per GPU). Quantized parameters follow the default recipe (every
linear weight of the decoder layers; embeddings, norms and lm_head stay bf16).

With `--model DIR` every figure comes from the checkpoint's config.json and safetensors headers.
With `--params 32B` the architecture (layers, KV heads, head dim, embedding share) is taken from
the nearest Qwen2.5 size in QWEN25 below, and the parameter count from the argument.
Prices are rough on-demand list prices per GPU-hour (PRICES); pass --price to use your own.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from rollout_service.quant.registry import FORMATS

GIB = 1024**3
MIB = 1024**2
RUNTIME_RESERVE_GIB = 2.0


@dataclass(frozen=True)
class Gpu:
    memory_mib: int  # as nvidia-smi reports it
    usd_per_hour: float  # rough on-demand list price, 2025


GPUS = {
    "a100": Gpu(81920, 1.80),  # A100 80GB SXM
    "h100": Gpu(81559, 3.00),  # H100 80GB SXM
    "h200": Gpu(143771, 3.80),  # H200 141GB SXM
}


@dataclass(frozen=True)
class Arch:
    params: float
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    vocab: int
    tied: bool

    @property
    def embedding_params(self) -> float:
        return self.vocab * self.hidden * (1 if self.tied else 2)


# Public Qwen2.5 configs (config.json of Qwen/Qwen2.5-*), the reference shapes for --params.
QWEN25 = {
    "0.5B": Arch(0.494e9, 24, 2, 64, 896, 151936, True),
    "1.5B": Arch(1.54e9, 28, 2, 128, 1536, 151936, True),
    "3B": Arch(3.09e9, 36, 2, 128, 2048, 151936, True),
    "7B": Arch(7.62e9, 28, 4, 128, 3584, 152064, False),
    "14B": Arch(14.7e9, 48, 8, 128, 5120, 152064, False),
    "32B": Arch(32.8e9, 64, 8, 128, 5120, 152064, False),
    "72B": Arch(72.7e9, 80, 8, 128, 8192, 152064, False),
}


@dataclass(frozen=True)
class Shape:
    """What the memory arithmetic needs to know about a model."""

    params: float
    quantizable_params: float  # linear weights of the decoder layers
    quantized_rows: float  # output rows of those weights (one scale each, per-channel)
    layers: int
    kv_heads: int
    head_dim: int
    source: str


@dataclass(frozen=True)
class Estimate:
    gpu: str
    quantization: str
    weights_gib: float
    kv_cache_gib: float
    staging_gib: float
    runtime_gib: float
    total_gib: float
    usable_gib_per_gpu: float
    gpus_per_replica: int
    replicas_per_gpu: int
    usd_per_replica_hour: float
    source: str

    def to_dict(self) -> dict:
        return asdict(self)


def parse_params(text: str) -> float:
    """'32B', '7.6b', '500M' -> parameter count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bBmM])\s*", text)
    if not m:
        raise ValueError(f"--params {text!r}: expected a count like 32B, 7.6B or 500M")
    return float(m.group(1)) * (1e9 if m.group(2) in "bB" else 1e6)


def shape_from_params(params: float) -> Shape:
    name, arch = min(QWEN25.items(), key=lambda kv: abs(math.log(kv[1].params / params)))
    share = 1 - arch.embedding_params / arch.params  # everything but embeddings: ~all linear weights
    quantizable = params * share
    return Shape(
        params=params, quantizable_params=quantizable,
        quantized_rows=quantizable / arch.hidden,  # rows of [out, in] weights with in ~ hidden
        layers=arch.layers, kv_heads=arch.kv_heads, head_dim=arch.head_dim,
        source=f"{params / 1e9:g}B parameters, shapes of Qwen2.5-{name}",
    )


def shape_from_model(model: Path) -> Shape:
    from safetensors import safe_open

    from rollout_service.quant.recipe import is_quantized_param

    path = model / "config.json"
    if not path.is_file():
        raise ValueError(f"--model {str(model)!r} is not a checkpoint directory (no config.json)")
    config = json.loads(path.read_text())
    shards = sorted(model.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"--model {str(model)!r} has no *.safetensors weights")
    params = quantizable = rows = 0
    for shard in shards:
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                shape = f.get_slice(name).get_shape()
                n = math.prod(shape)
                params += n
                if is_quantized_param(name, len(shape)):
                    quantizable += n
                    rows += shape[0]
    heads = config["num_attention_heads"]
    return Shape(
        params=params, quantizable_params=quantizable, quantized_rows=rows, layers=config["num_hidden_layers"],
        kv_heads=config.get("num_key_value_heads", heads),
        head_dim=config.get("head_dim") or config["hidden_size"] // heads, source=f"{model} ({params:,} parameters)",
    )


def estimate(
    shape: Shape, quantization: str, gpu: str, max_model_len: int, concurrency: int,
    push_buffer_mib: int = 256, gpu_memory_utilization: float = 0.85, price: float | None = None,
) -> Estimate:
    if gpu not in GPUS:
        raise ValueError(f"--gpu {gpu!r} is not one of {', '.join(GPUS)}")
    if quantization != "none" and quantization not in FORMATS:
        raise ValueError(f"--quantization {quantization!r} is not one of none, {', '.join(FORMATS)}")
    if max_model_len < 1 or concurrency < 1:
        raise ValueError(f"--max-model-len ({max_model_len}) and --concurrency ({concurrency}) must be positive")
    if quantization == "none":
        weights = shape.params * 2
    else:
        scales = shape.quantized_rows * 4 if FORMATS[quantization].strategy == "channel" else 0.0  # per-tensor: one number
        weights = shape.quantizable_params * 1 + (shape.params - shape.quantizable_params) * 2 + scales
    kv = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2 * max_model_len * concurrency
    staging = push_buffer_mib * MIB
    runtime = RUNTIME_RESERVE_GIB * GIB
    usable = GPUS[gpu].memory_mib * MIB * gpu_memory_utilization
    gpus = 1
    while (weights + kv) / gpus + staging + runtime > usable:
        gpus *= 2
        if gpus > 64:
            raise ValueError(f"the model does not fit 64 {gpu} GPUs per replica at these settings")
    per_gpu = (weights + kv) / gpus + staging + runtime
    replicas = max(1, int(usable // per_gpu)) if gpus == 1 else 1
    hourly = (price if price is not None else GPUS[gpu].usd_per_hour) * gpus / replicas
    return Estimate(
        gpu=gpu, quantization=quantization, weights_gib=weights / GIB, kv_cache_gib=kv / GIB,
        staging_gib=staging / GIB, runtime_gib=runtime / GIB, total_gib=(weights + kv + (staging + runtime) * gpus) / GIB,
        usable_gib_per_gpu=usable / GIB, gpus_per_replica=gpus, replicas_per_gpu=replicas,
        usd_per_replica_hour=hourly, source=shape.source,
    )
