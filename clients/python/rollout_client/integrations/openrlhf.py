"""OpenRLHF adapter: rollout-service in place of OpenRLHF's vLLM engine actors.

OpenRLHF drives rollouts through `openrlhf.trainer.ray.vllm_engine.RolloutRayActor` (one vLLM
engine per actor) and syncs weights with `PPOActor.broadcast_to_vllm` (an NCCL broadcast into
each engine's workers). Here:

    from rollout_client.integrations.openrlhf import RolloutServiceEngine, push_model
    engine = RolloutServiceEngine("svc:50051")           # or ray.remote(RolloutServiceEngine)
    out = await engine.generate(prompt_token_ids, vllm.SamplingParams(max_tokens=64, logprobs=0))
    out.outputs[0].token_ids, out.outputs[0].logprobs    # vLLM RequestOutput shape
    await engine.generate_responses(prompt, label, params, max_length, tokenizer, num_samples=4)
    push_model(actor.model.module, engine.client)        # instead of broadcast_to_vllm()

`RolloutServiceEngine` has the methods OpenRLHF's samples generator, async trainer and agent
executors call on an engine (`generate`, `generate_responses`, `get_num_unfinished_requests`,
`reset_prefix_cache`, `sleep`, `wake_up`, `pause_generation`, `resume_generation`) and returns vLLM-shaped outputs, so OpenRLHF's own executors
(`openrlhf.utils.agent.SingleTurnAgentExecutor`, or a custom agent) run unchanged on it.
The weights reach the service with one PushWeights stream (`push_model`), which the service
fans out to all its replicas; there is no NCCL group to join (`init_process_group`).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from rollout_client.client import AsyncRolloutClient, RolloutClient
from rollout_client.push import PushResult

ADDRESS_ENV = "ROLLOUT_SERVICE_ADDRESS"
# vLLM SamplingParams fields the service has no equivalent for, with the value that means "off".
_UNSUPPORTED_DEFAULTS = {"include_stop_str_in_output": False}


@dataclass
class Logprob:
    """vllm.sequence.Logprob's shape."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    """vllm.outputs.CompletionOutput's shape (plus the weight version that produced it)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None
    stop_reason: int | str | None = None
    weight_version: int = 0


@dataclass
class RequestOutput:
    """vllm.outputs.RequestOutput's shape."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True


def sampling_kwargs(params: Any) -> dict:
    """A vllm.SamplingParams (or anything with its attributes) as the service's sampling fields;
    a setting the service cannot honour is a ValueError naming it (never silently dropped)."""
    for name, off in _UNSUPPORTED_DEFAULTS.items():
        value = getattr(params, name, off)
        if value is not None and value != off:
            raise ValueError(f"SamplingParams.{name}={value!r} is not supported by rollout-service (only {off!r})")
    out: dict[str, Any] = {
        "n": getattr(params, "n", 1),
        "temperature": getattr(params, "temperature", 1.0),
        "top_p": getattr(params, "top_p", 1.0),
        "top_k": max(0, getattr(params, "top_k", 0) or 0),  # vLLM: -1 or 0 = no limit
        "min_p": getattr(params, "min_p", 0.0),
        "max_tokens": getattr(params, "max_tokens", None),
        "stop": list(getattr(params, "stop", None) or []),
        "stop_token_ids": list(getattr(params, "stop_token_ids", None) or []),
        "seed": getattr(params, "seed", None),
        "ignore_eos": getattr(params, "ignore_eos", False),
        "logprobs": getattr(params, "logprobs", None) or None,  # top alternatives; 0/None: sampled token only
        "min_tokens": getattr(params, "min_tokens", 0) or None,  # OpenRLHF always sends min_tokens=1
        "repetition_penalty": getattr(params, "repetition_penalty", 1.0),
        "presence_penalty": getattr(params, "presence_penalty", 0.0),
        "frequency_penalty": getattr(params, "frequency_penalty", 0.0),
        "logit_bias": getattr(params, "logit_bias", None) or None,
        "allowed_token_ids": getattr(params, "allowed_token_ids", None) or None,
    }
    return {k: v for k, v in out.items() if v is not None}


def _request_output(completion, request_id: str, want_logprobs: bool) -> RequestOutput:
    outputs = []
    for i, s in enumerate(completion.samples):
        logprobs = None
        if want_logprobs:
            logprobs = []
            for pos, (tok, lp) in enumerate(zip(s.token_ids, s.logprobs.tolist())):
                entry = {t: Logprob(v) for t, v in (s.top_logprobs[pos].items() if s.top_logprobs else ())}
                entry[tok] = Logprob(lp)
                logprobs.append(entry)
        outputs.append(CompletionOutput(
            index=i, text=s.text, token_ids=s.token_ids, cumulative_logprob=float(s.logprobs.sum()),
            logprobs=logprobs, finish_reason=s.finish_reason if s.finish_reason != "aborted" else "abort",
            stop_reason=s.stop_reason or None, weight_version=s.weight_version,
        ))
    return RequestOutput(request_id=request_id, prompt_token_ids=completion.prompt_token_ids, outputs=outputs)


class RolloutServiceEngine:
    """An OpenRLHF rollout engine backed by rollout-service (see the module docstring)."""

    def __init__(self, address: str | None = None, *, remote_rm_url: str | list[str] | None = None,
                 executor: Any = None, timeout: float = 600.0, **client_options: Any):
        address = address or os.environ.get(ADDRESS_ENV)
        if not address:
            raise ValueError(f"rollout-service address: pass address= or set {ADDRESS_ENV}")
        self.address = address
        self.client = RolloutClient(address, timeout=timeout, **client_options)
        self._client_options = dict(timeout=timeout, **client_options)
        self._async_client: AsyncRolloutClient | None = None
        if executor is None:
            from openrlhf.utils.agent import SingleTurnAgentExecutor

            executor = SingleTurnAgentExecutor(remote_rm_url)
        self.executor = executor
        self._requests = 0
        self._unfinished = 0  # sequences of this engine's calls still in the service
        self._open = asyncio.Event()  # cleared by pause_generation
        self._open.set()
        self.last_push: PushResult | None = None

    @property
    def _aclient(self) -> AsyncRolloutClient:
        # Made on first use, inside the event loop that will drive it (a grpc.aio channel belongs
        # to one loop, and the engine may be constructed where no loop runs, e.g. a Ray actor's __init__).
        if self._async_client is None:
            self._async_client = AsyncRolloutClient(self.address, **self._client_options)
        return self._async_client

    async def generate(self, prompt_token_ids: list[int], sampling_params: Any, multi_modal_data: Any = None) -> RequestOutput:
        """One prompt -> a vLLM-shaped RequestOutput (`outputs[i].logprobs[pos][token_id].logprob`)."""
        if multi_modal_data:
            raise ValueError("multi_modal_data: rollout-service serves text models only")
        self._requests += 1
        request_id = f"openrlhf-{self._requests}"
        want_logprobs = getattr(sampling_params, "logprobs", None) is not None
        kwargs = sampling_kwargs(sampling_params)
        self._unfinished += kwargs["n"]  # a held call is load too, as a request queued in a paused vLLM
        try:
            while not self._open.is_set():  # held while paused (PPOTrainerAsync pauses around a weight sync)
                await self._open.wait()
            completion = (await self._aclient.generate(
                prompt_token_ids=[list(prompt_token_ids)], request_id=request_id, **kwargs
            ))[0]
        finally:
            self._unfinished -= kwargs["n"]
        return _request_output(completion, request_id, want_logprobs)

    async def generate_responses(self, prompt: str, label: str, sampling_params: Any, max_length: int,
                                 hf_tokenizer: Any, num_samples: int = 1, images: Any = None) -> list[dict]:
        """N samples for one prompt through the agent executor, as RolloutRayActor does."""
        tasks = [
            self.executor.execute(prompt=prompt, label=label, sampling_params=sampling_params, max_length=max_length,
                                  hf_tokenizer=hf_tokenizer, llm_engine=self, images=images)
            for _ in range(num_samples)
        ]
        return await asyncio.gather(*tasks)

    def get_num_unfinished_requests(self) -> int:
        """Sequences of this engine's calls not yet answered: what OpenRLHF balances its engines
        by. Counted here, with no call to the service, so it never blocks the actor's loop and each
        engine reports its own load (the service's count is all trainers' together)."""
        return self._unfinished

    async def pause_generation(self) -> None:
        """Hold this engine's new calls until resume_generation. Unlike vLLM's pause, calls already
        in flight go on in the service (run it with `--inflight continue` to carry them across a
        push, as a paused vLLM keeps its requests)."""
        self._open.clear()

    async def resume_generation(self) -> None:
        self._open.set()

    async def reset_prefix_cache(self) -> None:
        """The service clears its prefix cache itself whenever it applies a push."""

    async def sleep(self, level: int = 1) -> None:
        """The engines run in the service, not on the trainer's GPUs: nothing to offload."""

    async def wake_up(self, tags: list[str] | None = None) -> None:
        """See sleep()."""

    async def push_weights(self, named_tensors, label: str = "openrlhf") -> PushResult:
        """Push through this engine, fenced on its previous push: if anyone else pushed in between,
        this one fails with FAILED_PRECONDITION rather than silently replacing their version."""
        expected = self.last_push.version if self.last_push is not None else None
        self.last_push = await self._aclient.push_weights(
            named_tensors, label=label, expected_version=expected, progress=False
        )
        return self.last_push

    def init_process_group(self, *args: Any, **kwargs: Any):
        raise RuntimeError(
            "rollout-service takes weights over PushWeights, not an NCCL group: call "
            "rollout_client.integrations.openrlhf.push_model(model, client) where OpenRLHF calls broadcast_to_vllm()"
        )


def gathered_parameters(model: Any) -> Iterator[tuple[str, Any]]:
    """(name, full tensor) for each parameter, one at a time; under DeepSpeed ZeRO-3 each is
    gathered just for its turn (as broadcast_to_vllm does), so no full copy is ever held."""
    for name, param in model.named_parameters():
        if hasattr(param, "ds_shape"):  # a ZeRO-3 partitioned parameter
            import deepspeed

            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.data
        else:
            yield name, param.data


def push_model(model: Any, client: RolloutClient, label: str = "openrlhf", **push_options: Any) -> PushResult:
    """The replacement for PPOActor.broadcast_to_vllm: stream the actor's parameters to the
    service (pass `actor.model.module`); returns the new version once every replica serves it.

    Fence it as RolloutServiceEngine.push_weights does: pass `expected_version=` the version of
    your previous push, so a push by anyone else in between fails with FAILED_PRECONDITION."""
    return client.push_weights(gathered_parameters(model), label=label, **push_options)
