"""Requests and results of the core, shared by the gRPC and HTTP APIs.

Requests are pydantic models: the HTTP API takes them as its JSON body and the gRPC API builds
them from protobuf, so both get the same checks and the same messages. Results are plain
dataclasses (built once per sample on the hot path, where validation would only cost time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rollout_service.errors import InvalidArgument

FinishReason = Literal["stop", "length", "aborted"]


class Prompt(BaseModel):
    """One prompt: exactly one of `text` or `token_ids`."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="Prompt text, tokenized with the model's tokenizer.")
    token_ids: list[int] | None = Field(None, description="Prompt token ids, each in [0, vocab_size).")

    @model_validator(mode="after")
    def _exactly_one(self) -> Prompt:
        if bool(self.text) == bool(self.token_ids):
            raise ValueError("set exactly one of text or token_ids (non-empty)")
        return self


class SamplingOptions(BaseModel):
    """Sampling parameters applied to every prompt of a request (see protos/rollout/v1/rollout.proto)."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(1, ge=1, le=256, description="Samples per prompt.")
    max_tokens: int = Field(16, ge=1, description="Most generated tokens per sample.")
    temperature: float = Field(1.0, ge=0.0, description="Softmax temperature; 0 is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass, in (0, 1].")
    top_k: int = Field(0, ge=0, description="Keep the top_k most likely tokens; 0 = no limit.")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p x the top token's probability.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (not returned).")
    stop_token_ids: list[int] = Field(default_factory=list, description="Stop token ids (returned).")
    seed: int | None = Field(None, description="Per-request seed: same seed + same request = same tokens.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    logprobs: int = Field(0, ge=0, description="Top alternatives per generated token; 0 = sampled token only.")
    prompt_logprobs: int | None = Field(None, ge=0, description="When set: prompt token logprobs, with this many alternatives.")
    detokenize: bool = Field(True, description="Decode samples into text; false: token ids and logprobs only.")
    min_tokens: int = Field(0, ge=0, description="End-of-sequence and stop token ids get probability 0 until a sample has this many tokens.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="Logits of tokens in the prompt or sample: positive / it, negative x it; 1 = off.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from the logit of every token the sample contains.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit once per time the sample contains it.")
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(
        default_factory=dict, description="Added to the logits of these token ids.")
    allowed_token_ids: list[int] = Field(default_factory=list, description="When not empty: only these token ids can be sampled.")

    @model_validator(mode="after")
    def _consistent(self) -> SamplingOptions:
        if self.temperature == 0 and self.n > 1:
            raise InvalidArgument("sampling.n", f"n={self.n} with temperature=0: greedy samples are identical; use n=1")
        if self.stop and not self.detokenize:
            raise InvalidArgument("sampling.stop", "stop strings are matched in decoded text: they need detokenize=true")
        if self.min_tokens > self.max_tokens:
            raise InvalidArgument("sampling.min_tokens", f"min_tokens={self.min_tokens} is above max_tokens={self.max_tokens}")
        return self


class GenerateRequest(BaseModel):
    """A batch of prompts sharing sampling parameters."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[Prompt] = Field(min_length=1, description="The batch; at least one prompt.")
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    request_id: str = Field("", description="Client-chosen id, echoed in every completion.")
    session_id: str = Field(
        "", description="Requests with the same session id go to the same replica (its prefix cache)."
    )
    min_weight_version: int = Field(
        0, ge=0, description="Sample only with this weight version or a newer one: a replica on an older version "
        "holds the request until it serves it (the call's deadline bounds the wait)."
    )
    max_staleness: int | None = Field(
        None, ge=0, description="Sample only with a version at most this many behind the newest committed one "
        "(raises min_weight_version when the call arrives)."
    )

    def at_least(self, committed: Callable[[], int]) -> GenerateRequest:
        """This request with max_staleness turned into a min_weight_version against `committed()`,
        the newest committed version (the backends call it as the request arrives)."""
        if self.max_staleness is None:
            return self
        floor = max(self.min_weight_version, committed() - self.max_staleness)
        return self.model_copy(update={"min_weight_version": floor, "max_staleness": None})

    @classmethod
    def parse(cls, data: dict) -> GenerateRequest:
        """Validate `data`, raising InvalidArgument that names the first offending field and value."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:  # our own InvalidArgument (from a validator) passes through
            raise invalid_argument_from(exc.errors(include_url=False)) from None


def field_path(loc: tuple) -> str:
    """('prompts', 2, 'token_ids', 5) -> 'prompts[2].token_ids[5]'. A map's key is bracketed too:
    pydantic names it as a string ('logit_bias', '7'; not an identifier), followed by '[key]' when
    the key itself is bad."""
    path = ""
    for i, part in enumerate(loc):
        if part == "[key]":
            continue
        key = isinstance(part, int) or not part.isidentifier() or loc[i + 1 : i + 2] == ("[key]",)
        path += f"[{part}]" if key else (f".{part}" if path else str(part))
    return path or "request"


def invalid_argument_from(errors: list[dict]) -> InvalidArgument:
    """InvalidArgument for the first of pydantic's `errors` (also FastAPI's, whose paths start at 'body')."""
    err = errors[0]
    if err["type"] == "json_invalid":
        return InvalidArgument("body", f"invalid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    loc = tuple(p for p in err["loc"] if p != "body")
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("missing", "model_type") and not isinstance(err.get("input"), dict):
        message = f"{message} (got {err.get('input')!r})"
    return InvalidArgument(field_path(loc), message)


@dataclass(slots=True)
class TopLogprobs:
    """The top alternatives at one position, most likely first."""

    token_ids: list[int]
    logprobs: list[float]


@dataclass(slots=True)
class Sample:
    """One sampled completion; `logprobs[i]` belongs to `token_ids[i]`."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason
    weight_version: int
    stop_reason: str = ""
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    # Differs from weight_version only when a push was applied mid-sample ("continue" policy).
    first_weight_version: int = 0
    # The version of every token as runs [version, count], in order (one run unless a push landed
    # mid-sample); the counts add up to len(token_ids).
    token_weight_versions: list[list[int]] = field(default_factory=list)


@dataclass(slots=True)
class Completion:
    """The n samples for one prompt."""

    prompt_index: int
    prompt_token_ids: list[int]
    samples: list[Sample]
    request_id: str = ""
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache


@dataclass(slots=True)
class Counters:
    """Running counters since start (see Counters in the proto)."""

    requests_total: int = 0
    requests_running: int = 0
    prompts_aborted: int = 0
    sequences_running: int = 0
    tokens_generated: int = 0
    requests_rejected_overload: int = 0
    engine_requests_running: int = 0
    sequences_waiting: int = 0
    requests_awaiting_version: int = 0


@dataclass(slots=True)
class ServerStatus:
    """What GetStatus reports."""

    model: str
    quantization: str
    dtype: str
    weight_version: int
    max_model_len: int
    vocab_size: int
    logprobs_mode: str
    lm_head_fp32: bool
    max_inflight_sequences: int
    engine_version: str
    uptime_s: float
    counters: Counters
    inflight_policy: str
    last_push: PushResult | None = None
    replicas: int = 1
    replica_versions: dict[str, int] = field(default_factory=dict)
    committed_version: int = 0
    delta_codecs: list[str] = field(default_factory=list)


@dataclass(slots=True)
class PushResult:
    """A committed push (see PushWeightsResponse in the proto)."""

    version: int
    bytes_received: int  # on the wire
    tensors_applied: int
    receive_s: float
    requantize_s: float
    apply_s: float
    pause_ms: float
    drain_ms: float = 0.0
    label: str = ""
    samples_in_flight: int = 0
    replicas_catching_up: list[str] = field(default_factory=list)
    dense_bytes: int = 0  # the tensors whole (more than bytes_received when some came as deltas)
    delta_tensors: int = 0
    shared_bytes: int = 0  # of bytes_received, those taken from shared memory (same host)


@dataclass(slots=True)
class ApplyStats:
    """What loading weights into a paused engine cost (one engine; the deployment reports each
    figure's maximum over replicas, and samples_in_flight summed)."""

    apply_s: float = 0.0  # loading the tensors
    pause_ms: float = 0.0  # the engine generated nothing
    drain_ms: float = 0.0  # before the pause, running samples finishing (policy "drain")
    samples_in_flight: int = 0  # samples in the engine (running or queued) when the pause began
