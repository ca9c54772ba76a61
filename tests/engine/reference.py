"""An independent reference for returned logprobs: transformers forward pass + our own
re-implementation of the sampling transforms, in vLLM's order (temperature, min-p, top-k, top-p)."""

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


def hf_token_logprobs(model, prompt: list[int], completion: list[int], *, raw: bool = False,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                      fp32_head: bool = False) -> torch.Tensor:
    """logprob of each completion token given everything before it, per the reference."""
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
        logits = torch.stack([process_logits(row, temperature, top_k, top_p, min_p) for row in logits])
    logprobs = logits.log_softmax(-1)
    return logprobs.gather(-1, torch.tensor(completion)[:, None])[:, 0]

