"""A tiny model taught to act: a few seconds of fine-tuning (transformers, float32, on this CPU)
make it answer given prompts with given completions under greedy decoding, e.g. a Hermes-style
tool call. Pushed into a server, it lets agent tests run real tool-calling episodes: the calls
are sampled by the engine and parsed by the frameworks, not scripted."""

from __future__ import annotations

from pathlib import Path

import torch

TOOL_CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 2}}\n</tool_call>'
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add", "description": "Add two integers.",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                       "required": ["a", "b"]},
    },
}


def taught(model_dir: Path, examples: list[tuple[list[int], list[int]]], max_steps: int = 400) -> dict[str, torch.Tensor]:
    """bf16 weights of the model at `model_dir` trained until its greedy continuation of each
    prompt is its target (token ids, ending with the end-of-sequence id). Raises AssertionError if
    it has not learned them within `max_steps`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch = []
    for prompt, target in examples:
        ids = torch.tensor([prompt + target])
        labels = ids.clone()
        labels[0, : len(prompt)] = -100  # the loss is on the completion only
        batch.append((ids, labels))
    for step in range(max_steps):
        model.train()
        optimizer.zero_grad()
        loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in batch)
        loss.backward()
        optimizer.step()
        if step % 20 == 19 and _learned(model, examples):
            weights = {k: v.detach().to(torch.bfloat16) for k, v in model.state_dict().items()}
            model.load_state_dict({k: v.float() for k, v in weights.items()})
            if _learned(model, examples):  # greedy still holds with the weights rounded to bf16
                return weights
    raise AssertionError(f"the model did not learn its {len(examples)} completions in {max_steps} steps (loss {loss.item():.3f})")


@torch.no_grad()
def _learned(model, examples) -> bool:
    model.eval()
    for prompt, target in examples:
        logits = model(input_ids=torch.tensor([prompt + target[:-1]])).logits[0, len(prompt) - 1 :]
        top2 = logits.topk(2, dim=-1)
        margin = top2.values[:, 0] - top2.values[:, 1]
        # The right token first, by a margin no bf16 engine's rounding can overturn.
        if top2.indices[:, 0].tolist() != target or bool((margin < 2.0).any()):
            return False
    return True
