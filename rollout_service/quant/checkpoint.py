"""Quantize a bf16/fp16/fp32 Hugging Face checkpoint into a compressed-tensors one vLLM loads.

`serve --quantization FORMAT` (quant/registry.py) runs this at start with `quantize_weight`, the code
that requantizes pushed tensors, so a server started from weights W and one that received W by
push hold the same quantized tensors. Output is cached under a fingerprint of the source files
and the format, so a restart reuses it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from rollout_service.quant.formats import quantize_weight
from rollout_service.quant.recipe import Recipe, quantization_config

# Bump when the quantized output of the same input would change.
QUANTIZER_VERSION = 1


def fingerprint(model: Path, recipe: Recipe) -> str:
    """Changes whenever a source weight file, the recipe or the quantizer changes."""
    h = hashlib.sha256(f"{QUANTIZER_VERSION}:{recipe.fingerprint()}".encode())
    for f in sorted(model.glob("*.safetensors")) + [model / "config.json"]:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def is_prequantized(model: Path) -> bool:
    return "quantization_config" in json.loads((model / "config.json").read_text())


def quantize_checkpoint(
    src: Path, dst: Path, recipe: Recipe, progress: Callable[[str], None] | None = None
) -> Path:
    """Write the quantized checkpoint of `src` to `dst` (one output shard per input shard)."""
    fmt = recipe.fn
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{src} has no *.safetensors weights")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():  # tokenizer, generation settings, index: everything but weights/config
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy2(f, tmp / f.name)
    quantized: set[str] = set()
    for i, shard in enumerate(shards):
        if progress:
            progress(f"quantizing {shard.name} to {fmt} ({i + 1}/{len(shards)})")
        out = {}
        with safe_open(shard, framework="pt") as reader:
            for name in reader.keys():
                tensor = reader.get_tensor(name)
                if recipe.quantizes(name, tensor.ndim):
                    out[name], out[name + "_scale"] = quantize_weight(tensor, fmt)
                    quantized.add(name)
                else:
                    out[name] = tensor
        save_file(out, tmp / shard.name, metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config(fmt, recipe.ignore)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    index = tmp / "model.safetensors.index.json"
    if index.exists():  # the weight map gains the scale tensors
        data = json.loads(index.read_text())
        weight_map = data["weight_map"]
        for name in quantized:
            weight_map[name + "_scale"] = weight_map[name]
        index.write_text(json.dumps(data, indent=2))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)
    return dst


def cached_quantized_checkpoint(
    model: Path, recipe: Recipe, cache_dir: Path, progress: Callable[[str], None] | None = None
) -> Path:
    """The quantized checkpoint of `model`, made once per fingerprint under `cache_dir`."""
    dst = cache_dir / "quantized" / f"{model.resolve().name}-{recipe.fn}-{fingerprint(model, recipe)}"
    if not (dst / "config.json").exists():
        quantize_checkpoint(model, dst, recipe, progress)
    return dst
