"""Runs inside vLLM's worker process (`worker_extension_cls`): loads pushed weights into the model.

The server sends a plan, never tensors: a list of (safetensors file, tensor names) in checkpoint
format, already converted to what the engine runs (model dtype, or int8 + `weight_scale`). Tensors
passed through `collective_rpc` itself arrive as lists and kill the engine (../shared/FACTS.md), and
a file read with mmap costs no pickling. Every vLLM module the plan touches is complete in it (the
server fills in the members of a fused module the push did not carry), so each module is rebuilt
whole, one at a time, and memory stays at one module beyond the model.

Two routes, chosen per module:
- vLLM's own layerwise reload (`initialize_layerwise_reload` / `load_weights` /
  `finalize_layerwise_processing`), restricted to the touched modules, for everything vLLM reloads
  correctly: every module of a bf16/fp32 model, and the unquantized modules (embeddings, norms,
  lm_head) of a quantized one.
- `int8_cpu.apply` for W8A8 linear layers on vLLM's CPU kernel, which that reload leaves with NaN
  outputs (see int8_cpu.py).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from safetensors import safe_open
from safetensors.torch import save

from rollout_service.engine import int8_cpu, moe_cpu
from rollout_service.weights.store import Plan, module_of

_PROBE_ROWS = 4


class RolloutWorkerExtension:
    """Methods added to vLLM's worker; called with `collective_rpc("rollout_...")`."""

    def rollout_describe(self) -> dict:
        """What the server needs to plan pushes: how checkpoint modules fuse into vLLM's."""
        model = self.model_runner.get_model()
        packed = {k: list(v) for k, v in getattr(model, "packed_modules_mapping", {}).items()}
        return {"packed_modules_mapping": packed}

    @torch.inference_mode()
    def rollout_apply(self, plan: Plan) -> int:
        """Load the plan's tensors into the model; returns the number of tensors loaded."""
        model = self.model_runner.get_model()
        packed = self.rollout_describe()["packed_modules_mapping"]
        by_module: dict[str, list[tuple[str, str]]] = defaultdict(list)
        for path, names in plan:
            for name in names:
                by_module[module_of(name, packed)].append((path, name))
        generic: list[str] = []
        for module_name, entries in by_module.items():
            layer = model.get_submodule(module_name)
            if int8_cpu.handles(layer):
                leaf = module_name.rpartition(".")[2]
                int8_cpu.apply(layer, module_name, packed.get(leaf, [leaf]), _read(entries))
            else:
                generic.append(module_name)
        if generic:
            _layerwise_reload(self.vllm_config, model, [(m, by_module[m]) for m in generic])
        return sum(len(names) for _, names in plan)

    @torch.inference_mode()
    def rollout_snapshot(self) -> bytes:
        """The model as the engine holds it, for equality tests: every parameter vLLM keeps, and for
        every linear layer (whose weights CPU kernels prepack out of reach) its output on a fixed
        input, a deterministic function of exactly the weights it computes with. safetensors bytes."""
        model = self.model_runner.get_model()
        out = {name: p.detach().clone() for name, p in model.named_parameters() if p is not None and p.numel()}
        generator = torch.Generator().manual_seed(0)
        dtype = self.vllm_config.model_config.dtype
        for name, layer in model.named_modules():
            size = getattr(layer, "input_size_per_partition", None)
            method = getattr(layer, "quant_method", None)
            if size is None or method is None:
                continue
            x = torch.randn(_PROBE_ROWS, size, generator=generator).to(dtype)
            out[f"{name}.probe"] = method.apply(layer, x, None).detach().clone()
        return save({k: v.contiguous() for k, v in out.items()})


def _layerwise_reload(vllm_config, model, modules: list[tuple[str, list[tuple[str, str]]]]) -> None:
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_processing, initialize_layerwise_reload

    layers = [model.get_submodule(name) for name, _ in modules]
    tied = _sharing(model, layers)
    with set_current_vllm_config(vllm_config):
        for layer in layers:
            moe_cpu.prepare_reload(layer)
            initialize_layerwise_reload(layer)
        try:
            # One module at a time, so vLLM processes each as soon as it is complete.
            for _, entries in modules:
                model.load_weights(_read(entries).items())
        finally:
            for layer in layers:
                finalize_layerwise_processing(layer, vllm_config.model_config)
            for owner in tied:
                owner.quant_method.process_weights_after_loading(owner)


def _sharing(model, layers) -> list:
    """The modules outside `layers` that hold one of their parameters: a tied LM head holds the
    embedding's Parameter (vLLM's `tie_weights`). The reload refills that Parameter in place, but
    on CPU the head computes with its own prepacked copy (`cpu_linear`, built when its weights were
    processed), so the head is processed again. Measured without: a pushed tied Qwen2/Qwen3/Llama
    served logprobs 0.3-1.4 off, from the old head."""
    reloaded = {id(p) for layer in layers for p in layer.parameters()}
    inside = {id(m) for layer in layers for m in layer.modules()}
    return [
        owner for owner in model.modules()
        if id(owner) not in inside and getattr(owner, "quant_method", None) is not None
        and any(id(p) in reloaded for p in owner.parameters(recurse=False))
    ]


def _read(entries: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    by_file: dict[str, list[str]] = defaultdict(list)
    for path, name in entries:
        by_file[path].append(name)
    tensors = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                tensors[name] = f.get_tensor(name)
    return tensors
