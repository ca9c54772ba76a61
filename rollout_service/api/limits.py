"""Size limits on what one call may ask of the server, checked by both front ends before any work.

Each refusal names the field and the limit (ServerConfig: max_prompts_per_call, max_samples_per_call,
max_prompt_tokens, max_tokens_per_sample, max_push_mib); the per-key concurrency caps are in
api/access.py and the request-body limit in the front ends.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

from rollout_service.config import ServerConfig
from rollout_service.errors import InvalidArgument, TooLarge
from rollout_service.types import GenerateRequest
from rollout_service.weights.manifest import TensorSpec

MIB = 1024 * 1024
# A prompt text is refused before tokenizing when it is this many characters a token over the
# limit: no tokenizer makes tokens that long, so the limit cannot be dodged with long text.
CHARS_PER_TOKEN_BOUND = 64
# Twice the model at float32: room for a tied LM head sent as its own copy and any float32 extras a
# trainer's state_dict holds, while a runaway push (a wrong model, a loop) is still refused.
PUSH_MARGIN = 2.0


@functools.cache
def context_length(model: Path, max_model_len: int | None) -> int:
    if max_model_len is not None:
        return max_model_len
    hf = json.loads((model / "config.json").read_text())
    hf = hf.get("text_config", hf)
    return int(hf.get("max_position_embeddings") or hf.get("n_positions") or 2048)


@functools.cache
def checkpoint_fp32_bytes(model: Path) -> int:
    """The checkpoint's parameters at 4 bytes each, from its safetensors headers (no tensor is read)."""
    total = 0
    for path in model.glob("*.safetensors"):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        total += sum(4 * math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


def max_push_bytes(config: ServerConfig) -> int:
    if config.max_push_mib is not None:
        return config.max_push_mib * MIB
    return max(int(checkpoint_fp32_bytes(config.model) * PUSH_MARGIN), 64 * MIB)


def check_generate(req: GenerateRequest, config: ServerConfig) -> None:
    if len(req.prompts) > config.max_prompts_per_call:
        raise InvalidArgument("prompts", f"{len(req.prompts)} prompts exceed max_prompts_per_call={config.max_prompts_per_call}")
    samples = len(req.prompts) * req.sampling.n
    if samples > config.max_samples_per_call:
        raise InvalidArgument(
            "sampling.n", f"{len(req.prompts)} prompts x n={req.sampling.n} = {samples} samples exceed "
            f"max_samples_per_call={config.max_samples_per_call}"
        )
    # Unset, the token limits are the context's, which the engine enforces itself (a prompt that
    # leaves no room is refused naming max_model_len; generation stops at the context's end).
    limit = config.max_tokens_per_sample
    if limit is not None and req.sampling.max_tokens > limit:
        raise InvalidArgument("sampling.max_tokens", f"{req.sampling.max_tokens} exceeds max_tokens_per_sample={limit}")
    limit = config.max_prompt_tokens
    max_prompt = limit or context_length(config.model, config.max_model_len)
    for i, prompt in enumerate(req.prompts):
        if limit is not None and prompt.token_ids is not None and len(prompt.token_ids) > limit:
            raise InvalidArgument(f"prompts[{i}].token_ids", f"{len(prompt.token_ids)} tokens exceed max_prompt_tokens={limit}")
        if prompt.text is not None and len(prompt.text) > max_prompt * CHARS_PER_TOKEN_BOUND:
            raise InvalidArgument(
                f"prompts[{i}].text", f"{len(prompt.text)} characters are beyond any tokenization within {max_prompt} tokens"
            )


class PushBudget:
    """The bytes a push has declared so far, against max_push_mib."""

    def __init__(self, config: ServerConfig):
        self.limit = max_push_bytes(config)
        self.declared = 0

    def add(self, tensors: Iterable[TensorSpec]) -> None:
        self.declared += sum(t.nbytes for t in tensors)
        if self.declared > self.limit:
            raise TooLarge(
                f"the push declares {self.declared / MIB:.1f} MiB, over max_push_mib ({self.limit / MIB:.1f} MiB)"
            )
