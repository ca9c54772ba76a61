"""An independent reference for returned logprobs: transformers forward pass + our own
re-implementation of the sampling transforms, in vLLM's order: allowed token ids, min_tokens,
logit bias, penalties (repetition, frequency, presence), then temperature, min-p, top-k, top-p."""

from __future__ import annotations

import torch


def process_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Logits of the distribution a token is sampled from. Greedy (temperature 0) samples from the
    argmax, and its reported logprob is the plain log-softmax (temperature treated as 1)."""
    x = logits.float().clone()
    if temperature == 0:
        return x
    x = x / temperature
    if min_p > 0:
        probs = x.softmax(-1)
        x[probs < min_p * probs.max(-1, keepdim=True).values] = float("-inf")
    if top_k > 0:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x[x < kth] = float("-inf")
    if top_p < 1:
        sorted_x, order = x.sort(-1)  # ascending, as vLLM does
        drop = sorted_x.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1] = False  # the most likely token always stays
        x[order[drop]] = float("-inf")
    return x


def adjust_logits(logits: torch.Tensor, prompt: list[int], before: list[int], *, allowed_token_ids=(),
                  min_tokens: int = 0, stop_ids=(), logit_bias=None, repetition_penalty: float = 1.0,
                  frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> torch.Tensor:
    """The logits of the next token after prompt + `before` (the sample so far) once the options
    that act before temperature are applied. `stop_ids`: the ids min_tokens holds back (the stop
    token ids and end-of-sequence)."""
    x = logits.float().clone()
    if allowed_token_ids:
        keep = torch.zeros_like(x, dtype=torch.bool)
        keep[list(allowed_token_ids)] = True
        x[~keep] = float("-inf")
    if len(before) < min_tokens:
        x[list(stop_ids)] = float("-inf")
    for token, bias in (logit_bias or {}).items():
        x[token] += bias
    seen = set(prompt) | set(before)
    if repetition_penalty != 1.0 and seen:
        ids = torch.tensor(sorted(seen))
        x[ids] = torch.where(x[ids] > 0, x[ids] / repetition_penalty, x[ids] * repetition_penalty)
    counts = torch.bincount(torch.tensor(before, dtype=torch.long), minlength=x.numel()).float() if before else torch.zeros_like(x)
    return x - frequency_penalty * counts - presence_penalty * (counts > 0).float()


def hf_token_logprobs(model, prompt: list[int], completion: list[int], *, raw: bool = False,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                      fp32_head: bool = False, **adjust) -> torch.Tensor:
    """logprob of each completion token given everything before it, per the reference. `adjust`:
    adjust_logits' options (none by default)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        if fp32_head:
            hidden = model.model(ids).last_hidden_state
            logits = hidden.float() @ model.lm_head.weight.float().T
        else:
            logits = model(ids).logits
    # Position p predicts token p + 1.
    logits = logits[0, len(prompt) - 1 : len(prompt) + len(completion) - 1].float()
    if not raw:
        if adjust:
            logits = torch.stack([adjust_logits(row, prompt, completion[:i], **adjust) for i, row in enumerate(logits)])
        logits = torch.stack([process_logits(row, temperature, top_k, top_p, min_p) for row in logits])
    logprobs = logits.log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(completion)[:, None])[:, 0]



# --- W8A8 (INT8 weights x INT8 activations) forward, written in plain torch ---------------------
#
# The arithmetic an int8 engine serves, from its definitions: compressed-tensors' scheme in the
# checkpoint's config (int8 weights [N, K], symmetric, one float32 scale per output channel [N, 1];
# activations quantized dynamically, symmetric, one scale per token) and vLLM 0.32's CPU kernels
# (csrc/cpu/dnnl_kernels.cpp `dynamic_scaled_int8_quant_impl` + `onednn_scaled_mm`):
#   scale_x = max|x| / 127 per token (float32); q_x = x * float32(1.0 / scale_x), clamped to
#   [-128, 127] and rounded to nearest even; out = (q_x @ q_w^T) * scale_w * scale_x + bias.
# Multiplying by the reciprocal (vLLM) instead of dividing (compressed-tensors) moves a value only
# where it lies within a float32 ulp of a .5 boundary. The integer product is exact here (float64
# holds |sum| <= 128 * 127 * K exactly), so this is no imitation of a kernel's summation order.


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                quantize_activations: bool = True) -> torch.Tensor:
    """y = x W^T (+ bias) with int8 `weight` [N, K] and float32 `weight_scale` [N, 1], in x's dtype.
    `quantize_activations=False` keeps x unquantized (a weight-only variant, to show a test can
    tell the two apart)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    if quantize_activations:
        scale = rows.abs().amax(-1, keepdim=True) / 127
        q = (rows * (1.0 / scale.double()).float()).clamp(-128, 127).round()  # round(): half to even
        out = (q.double() @ weight.double().T) * weight_scale.double().T * scale.double()
    else:
        out = rows.double() @ (weight.double() * weight_scale.double()).T
    out = out.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])


class W8A8Linear(torch.nn.Module):
    """A quantized Linear as the engine holds it: no float weight left."""

    def __init__(self, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None, quantize_activations: bool):
        super().__init__()
        self.register_buffer("weight_q", weight)
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("bias", bias)
        self.quantize_activations = quantize_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return w8a8_linear(x, self.weight_q, self.weight_scale, self.bias, self.quantize_activations)


def _check_w8a8_scheme(quantized_dir) -> None:
    """Refuse a checkpoint whose scheme is not the one w8a8_linear computes."""
    import json
    from pathlib import Path

    config = json.loads((Path(quantized_dir) / "config.json").read_text())["quantization_config"]
    (group,) = config["config_groups"].values()
    w, a = group["weights"], group["input_activations"]
    scheme = (config["format"], w["type"], w["num_bits"], w["strategy"], w["symmetric"], w["dynamic"],
              a["type"], a["num_bits"], a["strategy"], a["symmetric"], a["dynamic"])
    expected = ("int-quantized", "int", 8, "channel", True, False, "int", 8, "token", True, True)
    if scheme != expected:
        raise ValueError(f"{quantized_dir}: quantization scheme {scheme} is not W8A8 {expected}")


def w8a8_model(source_dir, quantized_dir, dtype: torch.dtype, *, quantize_activations: bool = True,
               per_tensor_weights: bool = False):
    """The transformers model of `source_dir` holding the weights of the compressed-tensors
    checkpoint `quantized_dir`: every int8 Linear computes with w8a8_linear from the checkpoint's
    int8 weight and scale, everything else (embeddings, norms, rotary, attention, the `ignore`d
    lm_head) is transformers' own code in `dtype` on the checkpoint's other tensors.

    `quantize_activations=False` and `per_tensor_weights=True` (the weights requantized with one
    scale per tensor) are deliberately wrong variants, to show a comparison can fail."""
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _check_w8a8_scheme(quantized_dir)
    model = AutoModelForCausalLM.from_pretrained(source_dir, dtype=dtype).eval()
    params = dict(model.named_parameters())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(quantized_dir).glob("*.safetensors")):
        tensors.update(load_file(shard))
    replaced = 0
    with torch.no_grad():
        for name, t in tensors.items():
            if name.endswith("_scale"):
                continue
            if t.dtype != torch.int8:
                params[name].copy_(t)  # KeyError: a checkpoint tensor the model does not have
                continue
            module_name = name.removesuffix(".weight")
            linear = model.get_submodule(module_name)
            scale = tensors[name + "_scale"].float()
            assert isinstance(linear, torch.nn.Linear) and tuple(t.shape) == tuple(linear.weight.shape), name
            assert tuple(scale.shape) == (t.shape[0], 1), f"{name}_scale {tuple(scale.shape)}: not one scale per output channel"
            if per_tensor_weights:
                w = t.float() * scale
                scale = (w.abs().max() / 127.5).expand_as(scale).contiguous()  # compressed-tensors' range / 2
                t = (w / scale).clamp(-128, 127).round().to(torch.int8)
            bias = None if linear.bias is None else tensors[module_name + ".bias"].float()
            model.set_submodule(module_name, W8A8Linear(t, scale, bias, quantize_activations))
            replaced += 1
    assert replaced > 0, f"{quantized_dir} holds no int8 weight"
    return model
