"""RolloutEngine: one vLLM AsyncLLM, with validation, admission, cancellation and counters.

A Generate call becomes one vLLM request per prompt (each with n samples). Completions are yielded
as prompts finish, or in pieces as tokens are sampled when the call streams tokens. If the caller
goes away (gRPC cancel, deadline, HTTP disconnect), the pending prompt tasks are cancelled and
vLLM's generate() aborts each engine request, so nothing leaks: `Counters.engine_requests_running`
returns to 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import uuid
from array import array
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import vllm
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMValidationError
from vllm.platforms import current_platform
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from rollout_service.config import InflightPolicy, ServerConfig
from rollout_service.engine import vllm_io
from rollout_service.engine.admission import SequenceBudget
from rollout_service.errors import ConfigError, DeadlineExceeded, EngineUnavailable, InvalidArgument, Overloaded
from rollout_service.observe import tracing
from rollout_service.types import ApplyStats, Completion, Counters, GenerateRequest, ServerStatus
from rollout_service.weights.store import Plan

if TYPE_CHECKING:
    from opentelemetry.context import Context

log = logging.getLogger(__name__)

# Our in-flight policies in vLLM's pause modes.
_PAUSE_MODE = {"drain": "wait", "abort": "abort", "continue": "keep"}


def resolve_model(config: ServerConfig) -> Path:
    """The checkpoint the engine loads: the configured one, or its quantized copy."""
    from rollout_service.quant.checkpoint import cached_quantized_checkpoint, is_prequantized
    from rollout_service.quant.profile import ProfileError, checkpoint_format
    from rollout_service.quant.registry import FORMATS

    if config.quantization == "none":
        if is_prequantized(config.model):
            raise ConfigError(
                f"{config.model} is a quantized checkpoint: serve it with --quantization set to its format (and "
                "--profile from `rollout-service profile`), so that pushed weights are requantized"
            )
        return config.model
    hf = json.loads((config.model / "config.json").read_text())
    text = hf.get("text_config", hf)  # a multimodal config nests the language model's
    experts = next((text[k] for k in ("num_experts", "num_local_experts", "n_routed_experts") if text.get(k)), None)
    if experts:
        raise ConfigError(
            f"quantization={config.quantization!r}: {config.model} is a mixture of experts ({experts} experts), and "
            "quantized MoE (int8, fp8) is not served: requantizing pushed experts in place is untested (on CPU, "
            "vLLM's int8 MoE kernel needs AMX, Intel Sapphire Rapids or newer; without it vLLM finds no int8 MoE "
            "backend); serve it unquantized"
        )
    if not FORMATS[config.quantization].cpu and current_platform.is_cpu():
        on_cpu = " or ".join(name for name, spec in FORMATS.items() if spec.cpu)
        raise ConfigError(
            f"quantization={config.quantization!r} needs a GPU: vLLM's CPU backend has no kernels for it; use {on_cpu} on CPU"
        )
    recipe = config.recipe()
    if is_prequantized(config.model):
        # A quantized checkpoint (e.g. from llm-compressor) is served as it is; its profile says how
        # pushed bf16 weights are requantized to match it.
        try:
            fn, _ = checkpoint_format(json.loads((config.model / "config.json").read_text()), str(config.model))
        except ProfileError as exc:
            raise ConfigError(str(exc)) from None
        if fn != config.quantization:
            raise ConfigError(f"quantization={config.quantization!r}, but {config.model} is quantized as {fn}")
        if config.profile is None:
            raise ConfigError(
                f"{config.model} is already quantized: give its --profile (`rollout-service profile -m BF16 -qm "
                f"{config.model}`) so that pushes are requantized as it was, or serve the bf16 checkpoint"
            )
        return config.model
    return cached_quantized_checkpoint(config.model, recipe, config.cache_dir, progress=log.info)


def with_context(config: ServerConfig) -> ServerConfig:
    """`config` with max_model_len set to the context vLLM will serve when it was left to the model
    (vLLM's own derivation: max_position_embeddings and its kin, rope scaling, sliding windows), so
    that the request checks, the OpenAI layer and the engine all bound requests by one number. Run
    once at start by both backends (a second or two: vLLM reads the checkpoint's config)."""
    if config.max_model_len is not None:
        return config
    from vllm.config import ModelConfig

    context = ModelConfig(model=str(config.model), generation_config="vllm", dtype=config.dtype).max_model_len
    return config.model_copy(update={"max_model_len": context})


def engine_args(config: ServerConfig, model: Path):
    """vLLM's AsyncEngineArgs for `config`, loading `model` (see resolve_model); the benchmark's
    in-process baseline uses it too."""
    if current_platform.is_cpu():
        # Without it vLLM sizes the CPU KV cache from node memory and may refuse to start.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.kv_cache_gib))
    return AsyncEngineArgs(
        model=str(model),
        tokenizer=str(config.model),
        dtype=config.dtype,
        max_model_len=config.max_model_len,
        logprobs_mode="processed_logprobs" if config.logprobs_mode == "processed" else "raw_logprobs",
        # vLLM's own fp32-head switch: the LM head projection and logits in float32.
        hf_overrides={"head_dtype": "float32"} if config.lm_head_fp32 else {},
        # Sampling must be exactly the request's, never defaults from generation_config.json.
        generation_config="vllm",
        seed=config.seed,
        max_num_seqs=config.max_num_seqs,
        block_size=config.block_size,
        max_logprobs=config.max_logprobs,
        gpu_memory_utilization=config.gpu_memory_utilization,
        enable_log_requests=False,
        # Adds the methods that load pushed weights (rollout_apply) to vLLM's worker.
        worker_extension_cls="rollout_service.engine.worker_ext.RolloutWorkerExtension",
        # On CPU a seeded request in a partial prefill chunk kills vLLM 0.32's engine (the model
        # runner rewinds its generator by Philox offsets, which a CPU generator does not have:
        # "CPU Generator does not use offset"; tests/engine/test_seeded_prefill.py). Whole-prompt
        # prefills drop no sampled token, so nothing is rewound.
        enable_chunked_prefill=False if current_platform.is_cpu() else None,
    )


class RolloutEngine:
    """The service's view of one vLLM engine."""

    def __init__(self, llm, config: ServerConfig, checkpoint: Path, packed_modules: dict[str, list[str]]):
        self._llm = llm
        self.config = config
        self.checkpoint = checkpoint  # what the engine loaded (the quantized copy for int8/fp8)
        self.packed_modules = packed_modules  # vLLM's fusing of checkpoint modules (qkv_proj, ...)
        self._tokenizer = llm.get_tokenizer()
        self.vocab_size: int = llm.model_config.get_vocab_size()
        self.max_model_len: int = llm.model_config.max_model_len
        self.weight_version = 0
        self._counters = Counters()
        self._budget = SequenceBudget(config.max_inflight_sequences)
        self._started = time.monotonic()
        # Serializes what pauses and resumes the scheduler (a push's apply, the debug hold), so a
        # resume can never restart generation on half-loaded weights.
        self._pausing = asyncio.Lock()
        # Notified when weight_version changes: requests with a min_weight_version wait on it.
        self._version_changed = asyncio.Condition()

    @classmethod
    async def start(cls, config: ServerConfig) -> RolloutEngine:
        """Start vLLM on `config.model`; returns once the engine can serve (tens of seconds)."""
        checkpoint = resolve_model(config)
        llm = AsyncLLM.from_engine_args(engine_args(config, checkpoint))
        # Label tokens with our version, so every output carries the versions that produced it.
        await llm.update_weight_version("0")
        described = (await llm.collective_rpc("rollout_describe"))[0]
        return cls(llm, config, checkpoint, described["packed_modules_mapping"])

    # ---- validation -------------------------------------------------------------------------

    def tokenize(self, request: GenerateRequest) -> list[array]:
        """Token ids of every prompt: text prompts tokenized and checked against the prompt limits
        (every other bound of the request was checked by api/limits.check_generate before it came
        here), as int32 arrays: a large batch waiting for room takes 4 bytes a token."""
        prompts: list[array] = []
        for i, prompt in enumerate(request.prompts):
            if prompt.token_ids is not None:
                prompts.append(prompt.token_ids)
                continue
            ids = self._tokenizer.encode(prompt.text)
            limit = self.config.max_prompt_tokens
            if limit is not None and len(ids) > limit:
                raise InvalidArgument(f"prompts[{i}].text", f"{len(ids)} prompt tokens exceed max_prompt_tokens={limit}")
            if len(ids) >= self.max_model_len:
                raise InvalidArgument(
                    f"prompts[{i}]", f"{len(ids)} prompt tokens leave no room to generate: the context holds "
                    f"max_model_len={self.max_model_len} tokens (prompt + generated)"
                )
            prompts.append(array("i", ids))
        return prompts

    # ---- generation -------------------------------------------------------------------------

    async def generate(
        self, request: GenerateRequest, refuse_when_full: bool = True, trace: Context | None = None,
    ) -> AsyncIterator[Completion]:
        """`_generate`, in span engine.generate under `trace` (an OpenTelemetry context, the
        replica's span; observe/tracing.py), which counts the tokens made."""
        n = request.sampling.n
        with tracing.span(
            "engine.generate", trace, prompts=len(request.prompts), samples=len(request.prompts) * n,
            stream_tokens=request.stream_tokens, weight_version=self.weight_version,
        ) as span:
            counting, tokens = span.is_recording(), 0
            async with contextlib.aclosing(self._generate(request, refuse_when_full)) as stream:
                async for completion in stream:
                    if counting:
                        tokens += sum(len(s.token_ids) for s in completion.samples)
                    yield completion
            tracing.note(span, completion_tokens=tokens)

    async def _generate(self, request: GenerateRequest, refuse_when_full: bool) -> AsyncIterator[Completion]:
        """Yield one Completion per prompt, in completion order; with `request.stream_tokens`,
        pieces of them as their tokens are sampled: a piece per engine step and prompt, fewer when
        the caller reads slower than the engine steps (a prompt's next output is taken from vLLM
        only once its last piece was read, and vLLM merges the steps in between into one).

        Raises InvalidArgument, or Overloaded when the server is full (unless `refuse_when_full`
        is False: a part of a batch the Serve ingress split, which decided overload itself),
        before any bookkeeping or engine work. Closing the iterator early (or cancelling its
        consumer) aborts the prompts still running.
        """
        # Off the event loop: tokenizing a large text batch would stall every other call. A call
        # of token ids (an agent's turn, an RL batch) skips the thread hop.
        if all(p.token_ids is not None for p in request.prompts):
            prompts = self.tokenize(request)
        else:
            prompts = await asyncio.to_thread(self.tokenize, request)
        params = self._sampling_params(request)
        n = request.sampling.n
        c, budget = self._counters, self._budget
        if n > budget.capacity:
            raise InvalidArgument(
                "sampling.n", f"{n} samples of one prompt can never fit: the server holds at most "
                f"max_inflight_sequences={budget.capacity} sequences at once"
            )
        if refuse_when_full and budget.full:
            c.requests_rejected_overload += 1
            raise Overloaded(
                f"the server is full ({budget.running} sequences in flight and {budget.waiting} waiting, "
                f"at most max_inflight_sequences={budget.capacity}); retry shortly"
            )
        self._check_alive()
        if request.min_weight_version > self.weight_version:
            await self._served(request.min_weight_version)
        c.requests_total += 1
        c.requests_running += 1
        call_id = f"{request.request_id or 'gen'}-{uuid.uuid4().hex[:12]}"
        # Pieces of streamed prompts (with the event their prompt waits on until the piece is read),
        # and each prompt's task once it is done (after its pieces).
        out: asyncio.Queue[tuple[Completion, asyncio.Event] | asyncio.Task] = asyncio.Queue()
        running: set[asyncio.Task] = set()
        started = 0

        def done(task: asyncio.Task) -> None:
            budget.release(n)
            running.discard(task)
            out.put_nowait(task)

        async def feed() -> None:
            # A prompt becomes a task only once it has room for its n samples (admission.py): a
            # batch larger than the server's room runs in parts, in arrival order, and its waiting
            # prompts cost their token ids alone.
            nonlocal started
            async with contextlib.aclosing(budget.admit(n, len(prompts))) as grants:
                async for _ in grants:
                    i, started = started, started + 1
                    task = asyncio.create_task(self._one(i, prompts[i], params, request, f"{call_id}-{i}", out))
                    running.add(task)
                    task.add_done_callback(done)

        feeder = asyncio.create_task(feed())
        try:
            left = len(prompts)
            while left:
                item = await out.get()
                if not isinstance(item, asyncio.Task):
                    piece, read = item
                    yield piece
                    read.set()
                    continue
                left -= 1
                completion = item.result()  # raises the prompt's error; None once its pieces went out
                if completion is not None:
                    yield completion
        finally:
            # Bookkeeping first: the caller may be cancelled again while we wait below (gRPC
            # cancels a handler whose deadline passed), and cancelled tasks abort their engine
            # requests on their own. A prompt not finished is aborted whether or not its engine
            # request had started.
            feeder.cancel()
            unfinished = list(running)
            c.prompts_aborted += len(prompts) - started + sum(t.cancel() for t in unfinished)
            c.requests_running -= 1
            await asyncio.gather(feeder, *unfinished, return_exceptions=True)

    async def _served(self, version: int) -> None:
        """Hold a call until the engine serves `version` (its min_weight_version), before any
        bookkeeping: it is not running until it can run on that version. Bounded by the caller's
        deadline or disconnect (they cancel this wait), by max_version_wait_s, and in number (as
        many as max_inflight_sequences, then Overloaded); a dead engine ends every wait."""
        c = self._counters
        if c.requests_awaiting_version >= self._budget.capacity:
            c.requests_rejected_overload += 1
            raise Overloaded(
                f"{c.requests_awaiting_version} calls already wait for a weight version (at most "
                f"max_inflight_sequences={self._budget.capacity}); retry shortly"
            )
        c.requests_awaiting_version += 1
        deadline = time.monotonic() + self.config.max_version_wait_s
        try:
            async with self._version_changed:
                while self.weight_version < version:
                    self._check_alive()
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DeadlineExceeded(
                            f"min_weight_version={version} was not served within max_version_wait_s="
                            f"{self.config.max_version_wait_s:g} s (this engine serves version {self.weight_version})"
                        )
                    with contextlib.suppress(TimeoutError):  # wakes each second to see a dead engine
                        async with asyncio.timeout(min(left, 1.0)):
                            await self._version_changed.wait()
        finally:
            c.requests_awaiting_version -= 1

    def _sampling_params(self, request: GenerateRequest):
        try:
            return vllm_io.sampling_params(request.sampling, stream=request.stream_tokens)
        except VLLMValidationError as exc:  # a check of vLLM's we do not duplicate
            raise InvalidArgument(f"sampling.{exc.parameter or ''}".rstrip("."), str(exc)) from None

    async def _one(
        self, index: int, ids: array, params, request: GenerateRequest, engine_id: str, pieces: asyncio.Queue
    ) -> Completion | None:
        """Prompt `index`'s Completion; streamed (request.stream_tokens), its pieces are put on
        `pieces` as vLLM gives them, each once the last was read, and None is returned."""
        final, first = None, True
        try:
            # A list only now, as the prompt enters the engine (vLLM keeps lists).
            async for out in self._llm.generate({"prompt_token_ids": ids.tolist()}, params, engine_id):
                if request.stream_tokens:
                    piece = vllm_io.completion(index, out, request.sampling, request.request_id, self.weight_version, first)
                    self._counters.tokens_generated += sum(len(s.token_ids) for s in piece.samples)
                    read = asyncio.Event()
                    pieces.put_nowait((piece, read))
                    first = False
                    await read.wait()  # meanwhile vLLM merges this prompt's next steps into one output
                final = out
        except VLLMValidationError as exc:  # a check of vLLM's we do not duplicate
            raise InvalidArgument(f"prompts[{index}]", str(exc)) from None
        except EngineDeadError as exc:
            raise EngineUnavailable(f"the engine died: {exc}") from None
        if request.stream_tokens:
            return None
        result = vllm_io.completion(index, final, request.sampling, request.request_id, self.weight_version)
        self._counters.tokens_generated += sum(len(s.token_ids) for s in result.samples)
        return result

    # ---- weights ----------------------------------------------------------------------------

    async def apply_weights(self, plan: Plan, policy: InflightPolicy, version: int | None) -> ApplyStats:
        """Pause generation per `policy`, load `plan` (see worker_ext), label further tokens with
        `version` (None: keep the current one), resume.

        pause_ms is the time the engine generated nothing; drain_ms (policy "drain" only) the
        time before it, when running samples were finishing on the old weights while new requests
        were held back; samples_in_flight the samples in the engine when the pause began (see
        PushWeightsResponse.samples_in_flight in the proto).
        """
        self._check_alive()
        async with self._pausing:
            start = time.monotonic()
            in_flight = self._llm.get_num_unfinished_requests()
            # clear_cache: the prefix and KV caches hold keys/values of the old weights. Under
            # "continue" this makes the running samples recompute their KV with the new weights.
            await self._llm.pause_generation(mode=_PAUSE_MODE[policy], clear_cache=True)
            # Only "drain" lets samples run on meanwhile; otherwise generation stopped at the call.
            paused = time.monotonic() if policy == "drain" else start
            try:
                loading = time.monotonic()
                await self._llm.collective_rpc("rollout_apply", args=(plan,))
                applied = time.monotonic() - loading
                if version is not None:
                    await self._llm.update_weight_version(str(version))
                    self.weight_version = version
                    async with self._version_changed:
                        self._version_changed.notify_all()
            finally:
                await self._llm.resume_generation()
        return ApplyStats(
            apply_s=applied,
            pause_ms=(time.monotonic() - paused) * 1e3,
            drain_ms=(paused - start) * 1e3,
            samples_in_flight=in_flight,
        )

    async def pause(self, mode: InflightPolicy, stepped: bool = False) -> None:
        """Hold generation (debug endpoint): new requests are queued, running ones finish first
        (drain), are aborted (abort) or stay frozen where they are (continue) until resume().
        A push applied meanwhile pauses per its own policy and resumes at its end, which ends
        the hold too; a hold asked for during a push's apply starts after it.

        stepped: generation runs (resumed if held) until every request in the engine has
        generated a token, then is held. Tests use it to freeze samples that are surely running
        (a request the engine has not yet stepped is queued, and a drain leaves it for the new
        weights) yet far from their end: the hold is decided here, a few engine steps after the
        first token, not a client round trip later, when on a fast machine a "long" generation
        may be over. If that takes over two minutes: DeadlineExceeded, generation left running."""
        self._check_alive()
        if stepped:
            await self.resume()
            await self._until_stepped()
        async with self._pausing:
            await self._llm.pause_generation(mode=_PAUSE_MODE[mode], clear_cache=False)

    async def _until_stepped(self, timeout: float = 120.0) -> None:
        # vLLM exposes no per-request progress; its output processor marks a request as no
        # longer prefilling when its first token arrives (debug path only, vLLM 0.32 internals).
        states = self._llm.output_processor.request_states
        deadline = time.monotonic() + timeout
        while any(state.is_prefilling for state in list(states.values())):
            if time.monotonic() > deadline:
                raise DeadlineExceeded(f"requests in the engine generated no token within {timeout:.0f} s")
            await asyncio.sleep(0.001)

    async def resume(self) -> None:
        async with self._pausing:  # never in the middle of a push's apply
            await self._llm.resume_generation()

    async def snapshot(self) -> bytes:
        """The engine's weights as it computes with them (safetensors bytes; see worker_ext)."""
        return (await self._llm.collective_rpc("rollout_snapshot"))[0]

    # ---- health and status ------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._llm.errored:
            raise EngineUnavailable("the engine has died; this server must be restarted")

    async def check_health(self) -> None:
        """Raise EngineUnavailable unless the engine is alive and answering."""
        self._check_alive()
        try:
            await self._llm.check_health()
        except Exception as exc:
            raise EngineUnavailable(f"engine health check failed: {exc}") from None

    def status(self) -> ServerStatus:
        counters = Counters(**{k: getattr(self._counters, k) for k in Counters.__slots__})
        counters.sequences_running, counters.sequences_waiting = self._budget.running, self._budget.waiting
        counters.engine_requests_running = self._llm.get_num_unfinished_requests()
        return ServerStatus(
            model=str(self.config.model),
            quantization=self.config.quantization,
            dtype=self.config.dtype,
            weight_version=self.weight_version,
            max_model_len=self.max_model_len,
            vocab_size=self.vocab_size,
            logprobs_mode=self.config.logprobs_mode,
            lm_head_fp32=self.config.lm_head_fp32,
            max_inflight_sequences=self.config.max_inflight_sequences,
            engine_version=vllm.__version__,
            uptime_s=time.monotonic() - self._started,
            counters=counters,
            inflight_policy=self.config.inflight,
        )

    def shutdown(self) -> None:
        self._llm.shutdown()
