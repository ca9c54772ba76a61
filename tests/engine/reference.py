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

