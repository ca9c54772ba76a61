"""Requests and results of the core, shared by the gRPC and HTTP APIs.

Requests are pydantic models: the HTTP API takes them as its JSON body and the gRPC API builds
them from protobuf, so both get the same checks and the same messages. Results are plain
dataclasses (built once per sample on the hot path, where validation would only cost time).
"""

from __future__ import annotations

import contextlib
import json
from array import array
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from rollout_service.errors import InvalidArgument

FinishReason = Literal["stop", "length", "aborted"]

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT32_MAX, UINT64_MAX = 2**32 - 1, 2**64 - 1
# What vLLM's GPU model runner holds per request in fixed-size arrays, and treats an overflow of
# as fatal in EngineCore.step (vllm/v1/worker/gpu/sample/logit_bias.py: MAX_NUM_ALLOWED_TOKEN_IDS,
# MAX_NUM_LOGIT_BIAS_TOKENS, MAX_NUM_STOP_TOKEN_IDS; tests/test_types.py checks they still agree).
# The CPU runner has no such arrays, which is why a CPU test suite never sees the crash.
MAX_ALLOWED_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_TOKENS = 1024
MAX_STOP_TOKEN_IDS_WITH_MIN_TOKENS = 128  # stop ids and end-of-sequence ids together, when min_tokens > 0
# Stop strings are matched in the front end's output processor at every step of every sample:
# thousands of them would slow every caller's stream (OpenAI takes 4).
MAX_STOP_STRINGS = 128
MIN_TEMPERATURE = 0.01  # vLLM's smallest non-greedy temperature
MAX_STOP_CHARS = 1024
# A request id is copied into every engine request and every completion of its call, a session id
# into every routing decision: a megabyte of one would cost a megabyte a prompt.
MAX_ID_CHARS = 256


def token_id_array(value: Iterable[int]) -> array:
    """Token ids as a compact int32 array: 4 bytes a token where a list of Python ints takes 36, so
    a large batch costs about its wire size in memory, not ten times it. Raises ValueError naming
    the first element that is not an int32."""
    if isinstance(value, array) and value.typecode == "i":
        return value
    if isinstance(value, (str, bytes, dict)):
        raise ValueError(f"expected a list of token ids, got {type(value).__name__}")
    try:
        return array("i", value)
    except (TypeError, OverflowError):
        pass
    for j, token in enumerate(value):
        if isinstance(token, bool) or not isinstance(token, int) or not -(2**31) <= token <= INT32_MAX:
            raise ValueError(f"token_ids[{j}]={token!r} is not a token id (a 32-bit integer)") from None
    raise ValueError("expected a list of token ids")


# A list of ints on the wire (JSON, protobuf, Python callers), an int32 array in memory.
TokenIds = Annotated[
    array,
    PlainValidator(token_id_array),
    PlainSerializer(lambda ids: ids.tolist(), return_type=list[int]),
    WithJsonSchema({"type": "array", "items": {"type": "integer"}}),
]


class Prompt(BaseModel):
    """One prompt: exactly one of `text` or `token_ids`."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="Prompt text, tokenized with the model's tokenizer.")
    token_ids: TokenIds | None = Field(None, description="Prompt token ids, each in [0, vocab_size).")

    @model_validator(mode="after")
    def _exactly_one(self) -> Prompt:
        if bool(self.text) == bool(self.token_ids):
            raise ValueError("set exactly one of text or token_ids (non-empty)")
        return self


class SamplingOptions(BaseModel):
    """Sampling parameters applied to every prompt of a request (see protos/rollout/v1/rollout.proto).

    The bounds here need no model: they keep every value within what vLLM's runners store it in
    (int32 / int64 arrays, the GPU runner's fixed-size per-request arrays). The bounds that depend
    on the served model (context length, vocabulary, max_logprobs, end-of-sequence ids) are
    checked with it by api/limits.check_generate, which every front end calls.
    """

    # No infinities or NaNs: a NaN passes no bound but poisons every logit it touches.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    n: int = Field(1, ge=1, le=256, description="Samples per prompt.")
    max_tokens: int = Field(16, ge=1, le=INT32_MAX, description="Most generated tokens per sample (at most the context length).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="Softmax temperature; 0 is greedy (vLLM takes [0, 2]).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass, in (0, 1].")
    top_k: int = Field(0, ge=0, le=INT32_MAX, description="Keep the top_k most likely tokens; 0 = no limit (at most the vocabulary size).")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="Drop tokens below min_p x the top token's probability.")
    stop: list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOP_STRINGS,
        description=f"Stop strings (not returned); at most {MAX_STOP_STRINGS}, each at most {MAX_STOP_CHARS} characters.",
    )
    stop_token_ids: list[int] = Field(default_factory=list, description="Stop token ids (returned).")
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX, description="Per-request seed (an int64): same seed + same request = same tokens.")
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")
    logprobs: int = Field(0, ge=0, le=INT32_MAX, description="Top alternatives per generated token; 0 = sampled token only (at most the server's max_logprobs).")
    prompt_logprobs: int | None = Field(
        None, ge=0, le=INT32_MAX, description="When set: prompt token logprobs, with this many alternatives (at most max_logprobs)."
    )
    detokenize: bool = Field(True, description="Decode samples into text; false: token ids and logprobs only.")
    skip_special_tokens: bool = Field(
        True, description="Leave special tokens out of the text (vLLM's); the chat route keeps them for a tool-call "
        "parser whose markers are special tokens, as vLLM's server does."
    )
    min_tokens: int = Field(
        0, ge=0, le=INT32_MAX,
        description="End-of-sequence and stop token ids get probability 0 until a sample has this many tokens (at most max_tokens).",
    )
    # Bounded so that a logit divided or multiplied by it stays finite in float32 (1e-45 is 0 there).
    repetition_penalty: float = Field(
        1.0, ge=0.01, le=100.0,
        description="Logits of tokens in the prompt or sample: positive / it, negative x it; 1 = off; in [0.01, 100].",
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from the logit of every token the sample contains.")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="Subtracted from a token's logit once per time the sample contains it.")
    logit_bias: dict[int, Annotated[float, Field(ge=-100.0, le=100.0)]] = Field(
        default_factory=dict, max_length=MAX_LOGIT_BIAS_TOKENS,
        description=f"Added to the logits of these token ids; at most {MAX_LOGIT_BIAS_TOKENS} entries.",
    )
    allowed_token_ids: list[int] = Field(
        default_factory=list, max_length=MAX_ALLOWED_TOKEN_IDS,
        description=f"When not empty: only these token ids can be sampled; at most {MAX_ALLOWED_TOKEN_IDS}.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> SamplingOptions:
        if self.temperature == 0 and self.n > 1:
            raise InvalidArgument("sampling.n", f"n={self.n} with temperature=0: greedy samples are identical; use n=1")
        if self.stop and not self.detokenize:
            raise InvalidArgument("sampling.stop", "stop strings are matched in decoded text: they need detokenize=true")
        if self.min_tokens > self.max_tokens:
            raise InvalidArgument("sampling.min_tokens", f"min_tokens={self.min_tokens} is above max_tokens={self.max_tokens}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            # vLLM would raise it to 0.01 (sampling_params._MAX_TEMP) and return the logprobs of that
            # distribution, not of the one asked for, which a trainer then scores wrongly.
            raise InvalidArgument(
                "sampling.temperature", f"{self.temperature} is below {MIN_TEMPERATURE}, which vLLM samples with "
                "instead: use 0 for greedy, or at least 0.01"
            )
        return self


class GenerateRequest(BaseModel):
    """A batch of prompts sharing sampling parameters."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[Prompt] = Field(min_length=1, description="The batch; at least one prompt.")
    sampling: SamplingOptions = Field(default_factory=SamplingOptions)
    request_id: str = Field(
        "", max_length=MAX_ID_CHARS, description=f"Client-chosen id, echoed in every completion (at most {MAX_ID_CHARS} characters)."
    )
    session_id: str = Field(
        "", max_length=MAX_ID_CHARS, description="Requests with the same session id go to the same replica (its prefix cache)."
    )
    min_weight_version: int = Field(
        0, ge=0, le=UINT64_MAX, description="Sample only with this weight version or a newer one: a replica on an "
        "older version holds the request until it serves it (the call's deadline bounds the wait); at most the "
        "version after the newest committed one."
    )
    max_staleness: int | None = Field(
        None, ge=0, le=UINT32_MAX, description="Sample only with a version at most this many behind the newest "
        "committed one (raises min_weight_version when the call arrives)."
    )
    stream_tokens: bool = Field(
        False, description="Streamed calls only (GenerateStream, OpenAI `stream: true`): send each prompt's samples "
        "in pieces as they are sampled, not whole when they finish (see Completion in the proto)."
    )

    def at_least(self, committed: Callable[[], int]) -> GenerateRequest:
        """This request with max_staleness turned into a min_weight_version against `committed()`,
        the newest committed version (the backends call it as the request arrives).

        A min_weight_version beyond the next version (committed + 1) is refused: such a call would
        hold a version-gated slot until max_version_wait_s for a version no push has begun, so a
        few of them could keep every other caller's gated calls out. No trainer needs more: an
        asynchronous trainer (one step off-policy, as verl's and OpenRLHF's async modes run) asks
        for the version its next push will commit, never for one two pushes ahead."""
        if self.max_staleness is None and self.min_weight_version <= 1:
            return self  # within bounds whatever is committed: the store is not read
        newest = committed()
        if self.min_weight_version > newest + 1:
            raise InvalidArgument(
                "min_weight_version", f"{self.min_weight_version} is beyond the next weight version: the newest "
                f"committed is {newest}, so at most {newest + 1} (the one the next push commits) can be waited for"
            )
        if self.max_staleness is None:
            return self
        floor = max(self.min_weight_version, newest - self.max_staleness)
        return self.model_copy(update={"min_weight_version": floor, "max_staleness": None})

    @classmethod
    def parse(cls, data: dict | bytes) -> GenerateRequest:
        """Validate `data` (a dict, or a JSON body as bytes: see `_loads`), raising InvalidArgument
        that names the first offending field and value."""
        if isinstance(data, bytes):
            data = _loads(data)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:  # our own InvalidArgument (from a validator) passes through
            raise invalid_argument_from(exc.errors(include_url=False)) from None


def _compact_prompt(obj: dict) -> dict:
    ids = obj.get("token_ids")
    if type(ids) is list:
        with contextlib.suppress(ValueError):  # left as it is, for the validator to name what is wrong
            obj["token_ids"] = token_id_array(ids)
    return obj


def _loads(body: bytes):
    """A JSON body with every prompt's token ids turned into an int32 array as its object closes, so
    only one prompt's list of Python ints (36 bytes a token) exists at a time. (pydantic's own JSON
    parsing builds the whole document first, about 24 bytes a number: 7x the body in memory.)"""
    try:
        return json.loads(body, object_hook=_compact_prompt)
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of more than 4,300 digits
        raise InvalidArgument("body", f"invalid JSON: {str(exc)[:200]}") from None
    except RecursionError:  # json's C parser recurses once per level of nesting
        raise InvalidArgument("body", "invalid JSON: nested too deeply") from None


def field_path(loc: tuple) -> str:
    """('prompts', 2, 'token_ids', 5) -> 'prompts[2].token_ids[5]'. A map's key is bracketed too:
    pydantic names it as a string ('logit_bias', '7'; not an identifier), followed by '[key]' when
    the key itself is bad."""
    path = ""
    for i, part in enumerate(loc):
        if part == "[key]":
            continue
        key = isinstance(part, int) or not part.isidentifier() or loc[i + 1 : i + 2] == ("[key]",)
        part = str(part) if len(str(part)) <= 40 else f"{str(part)[:40]}..."  # a map key of 5,000 digits
        path += f"[{part}]" if key else (f".{part}" if path else part)
    return path or "request"


def invalid_argument_from(errors: list[dict]) -> InvalidArgument:
    """InvalidArgument for the first of pydantic's `errors` (also FastAPI's, whose paths start where the field was: body, query, path, header)."""
    err = errors[0]
    if err["type"] == "json_invalid":
        return InvalidArgument("body", f"invalid JSON: {err.get('ctx', {}).get('error', err['msg'])}")
    loc = tuple(err["loc"])
    if loc[:1] in (("body",), ("query",), ("path",), ("header",)):  # FastAPI says where a field was: its name is enough
        loc = loc[1:]
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("missing", "model_type") and not isinstance(err.get("input"), dict):
        message = f"{message} (got {_shown(err.get('input'))})"
    return InvalidArgument(field_path(loc), message)


def _shown(value, limit: int = 80) -> str:
    """`value` as an error message shows it: a list of a million ids, or a megabyte of text, as
    its first characters and its size."""
    try:
        text = repr(value)
    except RecursionError:  # JSON nested a thousand levels deep
        return f"a value of type {type(value).__name__} nested too deeply to show"
    if len(text) <= limit:
        return text
    size = f"{len(value)} items" if isinstance(value, (list, tuple, dict, array)) else f"{len(text)} characters"
    return f"{text[:limit]}... ({size})"


@dataclass(slots=True)
class TopLogprobs:
    """The top alternatives at one position, most likely first."""

    token_ids: list[int]
    logprobs: list[float]


@dataclass(slots=True)
class Sample:
    """One sampled completion; `logprobs[i]` belongs to `token_ids[i]`. In a streamed call
    (GenerateRequest.stream_tokens) a piece of one: the tokens sampled since its last piece, with
    finish_reason None until its last piece, which alone carries the versions (of every token)."""

    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: FinishReason | None
    weight_version: int
    stop_reason: str = ""
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    # Differs from weight_version only when a push was applied mid-sample ("continue" policy).
    first_weight_version: int = 0
    # The version of every token as runs [version, count], in order (one run unless a push landed
    # mid-sample); the counts add up to len(token_ids).
    token_weight_versions: list[list[int]] = field(default_factory=list)
    index: int = 0  # which of the prompt's n samples


@dataclass(slots=True)
class Completion:
    """The n samples for one prompt; in a streamed call (GenerateRequest.stream_tokens) a piece of
    them: the samples that advanced, each with its new tokens (the prompt's fields in its first
    piece only)."""

    prompt_index: int
    prompt_token_ids: array  # int32 (a list converts with .tolist(); `as_json` does it)
    samples: list[Sample]
    request_id: str = ""
    prompt_logprobs: list[float] = field(default_factory=list)
    prompt_top_logprobs: list[TopLogprobs] = field(default_factory=list)
    cached_prompt_tokens: int = 0  # prompt tokens whose KV came from the prefix cache

    def as_json(self) -> dict:
        """This completion as the JSON APIs show it (GenerateResponse's shape)."""
        out = asdict(self)
        out["prompt_token_ids"] = self.prompt_token_ids.tolist()
        return out


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
    # What failed after the commit point without undoing it (a sync of the store, say).
    warnings: list[str] = field(default_factory=list)


@dataclass(slots=True)
class ApplyStats:
    """What loading weights into a paused engine cost (one engine; the deployment reports each
    figure's maximum over replicas, and samples_in_flight summed)."""

    apply_s: float = 0.0  # loading the tensors
    pause_ms: float = 0.0  # the engine generated nothing
    drain_ms: float = 0.0  # before the pause, running samples finishing (policy "drain")
    samples_in_flight: int = 0  # samples in the engine (running or queued) when the pause began
