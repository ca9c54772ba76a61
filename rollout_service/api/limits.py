"""What one call may ask of the server, checked by every front end before any work.

Generate: `check_generate` is the one validation of a request against the server's settings
(ServerConfig: max_prompts_per_call, max_samples_per_call, max_prompt_tokens, max_tokens_per_sample,
max_logprobs) and the served model (context length, vocabulary, end-of-sequence ids, read from the
checkpoint); `check_generate_message` checks a protobuf's counts before anything is copied out of
it. Pushes: `PushBudget` (max_push_mib). Each refusal names the field and the limit. The per-key
caps are in api/access.py and the request-body limit in the front ends.
"""

from __future__ import annotations

import functools
import json
import math
import struct
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rollout_service.config import ServerConfig
from rollout_service.errors import InvalidArgument, TooLarge
from rollout_service.types import (
    MAX_ALLOWED_TOKEN_IDS,
    MAX_ID_CHARS,
    MAX_LOGIT_BIAS_TOKENS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS_WITH_MIN_TOKENS,
    GenerateRequest,
    SamplingOptions,
)
from rollout_service.weights.manifest import TensorSpec

MIB = 1024 * 1024
# A prompt text is refused before tokenizing when it is this many characters a token over the
# limit: no tokenizer makes tokens that long, so the limit cannot be dodged with long text.
CHARS_PER_TOKEN_BOUND = 64
# Twice the model at float32: room for a tied LM head sent as its own copy and any float32 extras a
# trainer's state_dict holds, while a runaway push (a wrong model, a loop) is still refused.
PUSH_MARGIN = 2.0


@dataclass(frozen=True)
class ModelLimits:
    """What the served model bounds in a request, read from its checkpoint's files (no engine is
    needed: the Serve ingress checks requests before any replica sees them). The context is the
    configured max_model_len, which both servers set at start to what vLLM serves
    (engine.with_context); only a config that never went through a start falls back to config.json's
    max_position_embeddings."""

    context: int  # max_model_len: prompt + generated tokens
    vocab_size: int  # token ids are in [0, vocab_size), as the engine's embedding has them
    eos_ids: frozenset[int]  # what min_tokens holds back besides a request's stop ids


@functools.cache
def model_limits(model: Path, max_model_len: int | None) -> ModelLimits:
    hf = json.loads((model / "config.json").read_text())
    text = hf.get("text_config", hf)  # a multimodal config nests the language model's
    context = max_model_len or int(text.get("max_position_embeddings") or text.get("n_positions") or 2048)
    return ModelLimits(context, int(text["vocab_size"]), _eos_ids(model, hf, text))


def _eos_ids(model: Path, *configs: dict) -> frozenset[int]:
    """The end-of-sequence ids vLLM adds to a request's stop ids (SamplingParams
    .update_from_generation_config): the tokenizer's, config.json's and generation_config.json's."""
    generation = model / "generation_config.json"
    if generation.is_file():
        configs += (json.loads(generation.read_text()),)
    ids: set[int] = set()
    for c in configs:
        eos = c.get("eos_token_id")
        ids |= {eos} if isinstance(eos, int) else set(eos or ())
    tokenizer_config = model / "tokenizer_config.json"
    eos_token = json.loads(tokenizer_config.read_text()).get("eos_token") if tokenizer_config.is_file() else None
    if isinstance(eos_token, dict):
        eos_token = eos_token.get("content")
    if eos_token and (model / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        found = Tokenizer.from_file(str(model / "tokenizer.json")).token_to_id(eos_token)
        ids |= {found} if found is not None else set()
    elif eos_token:
        ids.add(-1)  # a tokenizer without tokenizer.json: count its end-of-sequence token unseen
    return frozenset(ids)


@functools.cache
def _checkpoint_headers(model: Path) -> tuple[int, int, int]:
    """(parameters at 4 bytes each, tensors, header bytes) of the checkpoint's safetensors shards,
    read from their headers (no tensor is read)."""
    fp32 = tensors = header_bytes = 0
    for path in model.glob("*.safetensors"):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        fp32 += sum(4 * math.prod(v["shape"]) for v in header.values())
        tensors += len(header)
        header_bytes += size
    return fp32, tensors, header_bytes


def checkpoint_fp32_bytes(model: Path) -> int:
    """The checkpoint's parameters at 4 bytes each."""
    return _checkpoint_headers(model)[0]


def max_push_tensors(config: ServerConfig) -> int:
    """The most tensors a push may declare: PUSH_MARGIN x the checkpoint's (a trainer's state_dict
    may split or fuse some), at least 1,024. Each declared tensor costs the server a few hundred
    bytes before any of its data arrives."""
    return max(int(_checkpoint_headers(config.model)[1] * PUSH_MARGIN), 1024)


def max_push_header_bytes(config: ServerConfig) -> int:
    """The largest safetensors header an HTTP push may send: 8x the checkpoint's own headers (long
    names, CRC-32s in the metadata), at least 1 MiB; safetensors' own limit, 100 MiB of JSON, would
    cost the server over a gigabyte to parse."""
    return max(8 * _checkpoint_headers(config.model)[2], MIB)


def max_push_bytes(config: ServerConfig) -> int:
    if config.max_push_mib is not None:
        return config.max_push_mib * MIB
    return max(int(checkpoint_fp32_bytes(config.model) * PUSH_MARGIN), 64 * MIB)


def check_generate(req: GenerateRequest, config: ServerConfig) -> None:
    """Every bound of a Generate call that needs the server's settings or the model: counts, token
    lengths, token ids within the vocabulary, and the sampling options within the context, the
    vocabulary and what vLLM's runners hold (types.SamplingOptions has the bounds that need
    neither). The one check every front end calls (gRPC, /v1/generate, the OpenAI routes)."""
    model = model_limits(config.model, config.max_model_len)
    if len(req.prompts) > config.max_prompts_per_call:
        raise InvalidArgument("prompts", f"{len(req.prompts)} prompts exceed max_prompts_per_call={config.max_prompts_per_call}")
    opts = req.sampling
    samples = len(req.prompts) * opts.n
    if samples > config.max_samples_per_call:
        raise InvalidArgument(
            "sampling.n", f"{len(req.prompts)} prompts x n={opts.n} = {samples} samples exceed "
            f"max_samples_per_call={config.max_samples_per_call}"
        )
    _check_sampling(opts, config, model)
    max_prompt = prompt_token_limit(config)
    for i, prompt in enumerate(req.prompts):
        if prompt.token_ids is not None:
            _check_prompt_length(i, len(prompt.token_ids), config, model)
            _check_vocab(f"prompts[{i}].token_ids", prompt.token_ids, model)
        elif len(prompt.text) > max_prompt * CHARS_PER_TOKEN_BOUND:
            raise InvalidArgument(
                f"prompts[{i}].text", f"{len(prompt.text)} characters are beyond any tokenization within {max_prompt} tokens"
            )


def check_whole(req: GenerateRequest) -> None:
    """A call that answers with whole completions (Generate, /v1/generate) cannot stream tokens."""
    if req.stream_tokens:
        raise InvalidArgument(
            "stream_tokens", "true, but this call returns whole completions: stream tokens with GenerateStream"
        )


def prompt_token_limit(config: ServerConfig) -> int:
    """The longest prompt in tokens: max_prompt_tokens, and at most the context less one token."""
    context = model_limits(config.model, config.max_model_len).context
    return min(config.max_prompt_tokens or context, context - 1)


def _check_prompt_length(index: int, length: int, config: ServerConfig, model: ModelLimits) -> None:
    if config.max_prompt_tokens is not None and length > config.max_prompt_tokens:
        raise InvalidArgument(
            f"prompts[{index}].token_ids", f"{length} prompt tokens exceed max_prompt_tokens={config.max_prompt_tokens}"
        )
    if length >= model.context:
        raise InvalidArgument(
            f"prompts[{index}]", f"{length} prompt tokens leave no room to generate: the context holds max_model_len={model.context} "
            "tokens (prompt + generated)"
        )


def _check_sampling(opts: SamplingOptions, config: ServerConfig, model: ModelLimits) -> None:
    limit = config.max_tokens_per_sample
    if limit is not None and opts.max_tokens > limit:
        raise InvalidArgument("sampling.max_tokens", f"{opts.max_tokens} exceeds max_tokens_per_sample={limit}")
    if opts.max_tokens > model.context:
        raise InvalidArgument(
            "sampling.max_tokens", f"{opts.max_tokens} exceeds the context: max_model_len={model.context} (prompt + generated)"
        )
    if opts.top_k > model.vocab_size:
        raise InvalidArgument("sampling.top_k", f"{opts.top_k} exceeds the vocabulary size {model.vocab_size} (0 = no limit)")
    for name, asked in (("logprobs", opts.logprobs), ("prompt_logprobs", opts.prompt_logprobs or 0)):
        if asked > config.max_logprobs:
            raise InvalidArgument(f"sampling.{name}", f"{asked} exceeds the server's max_logprobs={config.max_logprobs}")
    if len(opts.stop_token_ids) > model.vocab_size:
        raise InvalidArgument(
            "sampling.stop_token_ids", f"{len(opts.stop_token_ids)} ids: more than the vocabulary's {model.vocab_size} tokens"
        )
    _check_vocab("sampling.stop_token_ids", opts.stop_token_ids, model)
    _check_vocab("sampling.allowed_token_ids", opts.allowed_token_ids, model)
    for token in opts.logit_bias:  # a map: named by its key
        if not 0 <= token < model.vocab_size:
            raise InvalidArgument(f"sampling.logit_bias[{token}]", f"token id {token} is outside the vocabulary [0, {model.vocab_size})")
    held_back = set(opts.stop_token_ids) | model.eos_ids
    if opts.min_tokens and len(held_back) > MAX_STOP_TOKEN_IDS_WITH_MIN_TOKENS:
        raise InvalidArgument(
            "sampling.stop_token_ids", f"with min_tokens > 0, at most {MAX_STOP_TOKEN_IDS_WITH_MIN_TOKENS} stop ids and "
            f"end-of-sequence ids ({len(model.eos_ids)} of this model) together; got {len(held_back)}"
        )
    if opts.min_tokens and opts.allowed_token_ids and set(opts.allowed_token_ids) <= held_back:
        # vLLM would sample from a row of -inf logits (a token outside the allowed ids, NaN logprob).
        raise InvalidArgument(
            "sampling.min_tokens",
            f"min_tokens={opts.min_tokens}, but every allowed token id {sorted(opts.allowed_token_ids)} is a stop or "
            "end-of-sequence token, which min_tokens holds back: nothing could be sampled",
        )


def _check_vocab(field: str, ids: Sequence[int], model: ModelLimits) -> None:
    if not ids:
        return
    if isinstance(ids, array):  # a prompt's int32 array: checked in numpy, without a Python int per token
        values = np.frombuffer(ids, np.int32)
        low, high = int(values.min()), int(values.max())
    else:
        low, high = min(ids), max(ids)
    if low >= 0 and high < model.vocab_size:
        return
    for j, token in enumerate(ids):
        if not 0 <= token < model.vocab_size:
            raise InvalidArgument(f"{field}[{j}]", f"token id {token} is outside the vocabulary [0, {model.vocab_size})")


def check_generate_message(msg, config: ServerConfig) -> None:
    """The counts of a GenerateRequest protobuf message, checked before anything is copied out of it
    (a message within max_request_mib may still hold far more prompts, tokens or list entries than
    allowed)."""
    vocab = model_limits(config.model, config.max_model_len).vocab_size
    counted = (
        ("sampling.allowed_token_ids", len(msg.sampling.allowed_token_ids), MAX_ALLOWED_TOKEN_IDS),
        ("sampling.logit_bias", len(msg.sampling.logit_bias), MAX_LOGIT_BIAS_TOKENS),
        ("sampling.stop", len(msg.sampling.stop), MAX_STOP_STRINGS),
        ("sampling.stop_token_ids", len(msg.sampling.stop_token_ids), vocab),
        ("request_id", len(msg.request_id), MAX_ID_CHARS),
        ("session_id", len(msg.session_id), MAX_ID_CHARS),
    )
    for field, count, limit in counted:
        if count > limit:
            raise InvalidArgument(field, f"{count} entries (characters for an id): at most {limit}")
    if len(msg.prompts) > config.max_prompts_per_call:
        raise InvalidArgument("prompts", f"{len(msg.prompts)} prompts exceed max_prompts_per_call={config.max_prompts_per_call}")
    max_prompt = prompt_token_limit(config)
    for i, prompt in enumerate(msg.prompts):
        if len(prompt.token_ids) > max_prompt:
            _check_prompt_length(i, len(prompt.token_ids), config, model_limits(config.model, config.max_model_len))
        elif len(prompt.text) > max_prompt * CHARS_PER_TOKEN_BOUND:
            raise InvalidArgument(
                f"prompts[{i}].text", f"{len(prompt.text)} characters are beyond any tokenization within {max_prompt} tokens"
            )


class PushBudget:
    """The bytes and tensors a push has declared so far, against max_push_mib and max_push_tensors."""

    def __init__(self, config: ServerConfig):
        self.limit = max_push_bytes(config)
        self.max_tensors = max_push_tensors(config)
        self.declared = 0
        self.tensors = 0

    def count(self, tensors: int) -> None:
        """Refuse `tensors` more before they are converted (TooLarge beyond max_push_tensors)."""
        if self.tensors + tensors > self.max_tensors:
            raise TooLarge(
                f"the push declares {self.tensors + tensors} tensors, more than {self.max_tensors} (twice the served "
                "checkpoint's tensors)"
            )

    def add(self, tensors: Sequence[TensorSpec]) -> None:
        self.count(len(tensors))
        self.tensors += len(tensors)
        self.declared += sum(t.nbytes for t in tensors)
        if self.declared > self.limit:
            raise TooLarge(
                f"the push declares {self.declared / MIB:.1f} MiB, over max_push_mib ({self.limit / MIB:.1f} MiB)"
            )
