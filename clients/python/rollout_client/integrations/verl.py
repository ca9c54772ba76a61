"""verl adapter: rollout-service as a verl rollout, and the weight sync that feeds it.

    from rollout_client.integrations.verl import RolloutServiceRollout
    rollout = RolloutServiceRollout(config.rollout, config.model, device_mesh=None, address="svc:50051")
    out = rollout.generate_sequences(batch)       # DataProto in, DataProto out
    out.batch["rollout_log_probs"]                # exact logprobs of the sampled tokens, 0 on padding
    await rollout.update_weights(actor.named_parameters_gathered())   # after each optimizer step

`RolloutServiceRollout` is a `verl.workers.rollout.base.BaseRollout`: `generate_sequences` takes
verl's left-padded prompt batch (input_ids, attention_mask, position_ids, meta_info eos/pad ids and
sampling overrides) and returns what verl's rollouts return (prompts, responses, input_ids,
attention_mask, position_ids, right-padded to `response_length`) plus `rollout_log_probs` — the
field verl's rollout correction / TIS (and FlashRL) read — and the weight version of each sample
in `non_tensor_batch["weight_version"]`. `update_weights` streams the trainer's (name, tensor)
generator to the service (PushWeights): the FlashRL path without patching vLLM in the trainer.
The engine lives in the service, so `resume`/`release` have no GPU memory to move here.

`RolloutServiceServerManager` speaks the per-request interface verl's agent loops call
(`generate(request_id, prompt_ids=, sampling_params=) -> TokenOutput`), with the request id as the
session id so the turns of one trajectory stay on one replica.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from verl import DataProto
from verl.workers.rollout.base import BaseRollout
from verl.workers.rollout.replica import TokenOutput

from rollout_client.client import AsyncRolloutClient, RolloutClient
from rollout_client.types import Sample

ADDRESS_ENV = "ROLLOUT_SERVICE_ADDRESS"


def _address(address: str | None) -> str:
    address = address or os.environ.get(ADDRESS_ENV)
    if not address:
        raise ValueError(f"rollout-service address: pass address= or set {ADDRESS_ENV}")
    return address


def _sampling(config: Any, meta: dict) -> dict:
    """verl's sampling settings (config, overridden by the batch's meta_info) as SamplingParams."""
    response_length = int(meta.get("response_length", config.response_length))
    if not meta.get("do_sample", config.do_sample):
        return {"temperature": 0.0, "max_tokens": response_length}
    source = config.val_kwargs if meta.get("validate", False) else config
    top_k = meta.get("top_k", source.top_k)
    return {
        "temperature": float(meta.get("temperature", source.temperature)),
        "top_p": float(meta.get("top_p", source.top_p)),
        "top_k": max(0, int(top_k)),  # verl uses -1 for "no limit", the service 0
        "max_tokens": response_length,
    }


def _pad(rows: list[list], width: int, value, dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:width], dtype=dtype)
    return out


WIRE_FORMATS = ("named_tensors", "delta_flush")


def _named_tensors(weights: Iterable, wire_format: str) -> Iterable[tuple[str, torch.Tensor]]:
    if wire_format == "named_tensors":
        yield from weights
    else:  # delta_flush: (named_tensors, is_last) flushes
        for named, _is_last in weights:
            yield from named


class RolloutServiceRollout(BaseRollout):
    """A verl rollout whose engine is a rollout-service deployment (see the module docstring)."""

    def __init__(
        self, config: Any, model_config: Any, device_mesh: Any = None, *, address: str | None = None,
        timeout: float = 600.0, **client_options: Any,
    ):
        super().__init__(config, model_config, device_mesh)
        self.address = _address(address)
        self.client = RolloutClient(self.address, timeout=timeout, **client_options)
        self._async_options = dict(timeout=timeout, **client_options)
        self.last_push = None

    def generate_sequences(self, prompts: DataProto) -> DataProto:
        input_ids = prompts.batch["input_ids"]  # [bs, prompt_length], left-padded
        attention_mask = prompts.batch["attention_mask"]
        position_ids = prompts.batch["position_ids"]
        meta = prompts.meta_info
        sampling = _sampling(self.config, meta)
        width = sampling["max_tokens"]
        pad_id = meta.get("pad_token_id", 0)
        prompt_ids = [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]
        # Streamed, one completion per message: a verl batch of thousands of sequences never nears
        # gRPC's message cap. verl reads token ids and logprobs only, so nothing is detokenized.
        stream = self.client.generate_stream(prompt_token_ids=prompt_ids, n=1, detokenize=False, **sampling)
        completions = sorted(stream, key=lambda c: c.prompt_index)
        samples: list[Sample] = [c.samples[0] for c in completions]

        responses = _pad([s.token_ids for s in samples], width, pad_id, input_ids.dtype)
        response_mask = _pad([[1] * len(s.token_ids) for s in samples], width, 0, attention_mask.dtype)
        logprobs = _pad([s.logprobs.tolist() for s in samples], width, 0.0, torch.float32)
        steps = torch.arange(1, width + 1, dtype=position_ids.dtype).expand(len(samples), -1)
        batch = {
            "prompts": input_ids,
            "responses": responses,
            "input_ids": torch.cat([input_ids, responses], dim=1),
            "attention_mask": torch.cat([attention_mask, response_mask], dim=1),
            "position_ids": torch.cat([position_ids, position_ids[:, -1:] + steps], dim=1),
            "rollout_log_probs": logprobs,
        }
        non_tensor = {"weight_version": np.array([s.weight_version for s in samples], dtype=np.int64)}
        return DataProto.from_dict(tensors=batch, non_tensors=non_tensor, meta_info=dict(meta))

    async def update_weights(self, weights: Iterable, wire_format: str = "named_tensors", **kwargs: Any):
        """Push the trainer's weights (a generator of (name, tensor), as verl's engines yield them
        gathered one at a time) to the service; returns the PushResult (new version)."""
        if wire_format not in WIRE_FORMATS:
            raise ValueError(f"wire_format={wire_format!r}: expected one of {WIRE_FORMATS}")
        async with AsyncRolloutClient(self.address, **self._async_options) as client:
            self.last_push = await client.push_weights(
                _named_tensors(weights, wire_format), label=str(kwargs.get("label", "verl")), progress=False
            )
        return self.last_push

    async def resume(self, tags: list[str]):
        """Nothing to load back: the weights and KV cache live in the service's replicas."""

    async def release(self):
        """Nothing to free here: the service's engine memory is not on the trainer's GPUs."""


class RolloutServiceServerManager:
    """verl's agent-loop server interface (`generate(request_id, prompt_ids=, sampling_params=)`)
    over rollout-service."""

    def __init__(self, address: str | None = None, timeout: float = 600.0, **client_options: Any):
        self.address = _address(address)
        self._client_options = dict(timeout=timeout, **client_options)
        self._client: AsyncRolloutClient | None = None

    @property
    def client(self) -> AsyncRolloutClient:
        # Made on first use, inside the loop that drives it (a grpc.aio channel belongs to one loop).
        if self._client is None:
            self._client = AsyncRolloutClient(self.address, **self._client_options)
        return self._client

    async def generate(
        self, request_id: str, *, prompt_ids: list[int], sampling_params: dict[str, Any], **kwargs: Any
    ) -> TokenOutput:
        params = dict(sampling_params)
        if "logprobs" in params:  # verl asks for the sampled token's logprob; the service always returns it
            params["logprobs"] = 0
        if params.get("top_k") == -1:  # verl's "no limit"; the service's is 0
            params["top_k"] = 0
        completion = (
            await self.client.generate(prompt_token_ids=[prompt_ids], request_id=request_id, session_id=request_id, **params)
        )[0]
        sample = completion.samples[0]
        return TokenOutput(
            token_ids=sample.token_ids,
            log_probs=sample.logprobs.tolist(),
            stop_reason="aborted" if sample.finish_reason == "aborted" else "completed",
            extra_fields={"weight_version": sample.weight_version},
        )
