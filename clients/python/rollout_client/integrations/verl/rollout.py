"""The trainer side of the plugin: the `BaseRollout` verl builds on every trainer rank
(`get_rollout_class("rollout_service")`), which syncs weights into the service.

verl's weight sync calls `rollout.update_weights(generator, peft_config=, base_sync_done=,
global_steps=)` on every rank, each `next()` of the generator being a collective gather of one
full tensor. Rank 0 streams those tensors to the service in one PushWeights (one new version,
labelled with `global_steps`; when it streams, to a service on another host, each tensor goes as a
delta against the previous sync, and rank 0 keeps a bf16 copy of the model in host memory for
that) while the other ranks step through their
generators in lockstep; all ranks then return the same PushResult, or all raise (see `lockstep`).

`generate_sequences` is verl's older batch interface (a left-padded DataProto in, verl's rollout
fields out), for loops that call a rollout directly rather than through verl's agent loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from verl import DataProto
from verl.workers.rollout.base import BaseRollout

from rollout_client.client import RolloutClient
from rollout_client.integrations import lockstep
from rollout_client.integrations.connection import Connection
from rollout_client.push import PushResult
from rollout_client.rl import check_versions


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
        "repetition_penalty": float(meta.get("repetition_penalty", config.repetition_penalty)),
        "max_tokens": response_length,
    }


def _pad(rows: list[list], width: int, value, dtype) -> torch.Tensor:
    out = torch.full((len(rows), width), value, dtype=dtype)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row[:width], dtype=dtype)
    return out


class RolloutServiceRollout(BaseRollout):
    """A verl rollout whose engine is a rollout-service deployment (see the module docstring).

    verl constructs it as `(config, model_config, device_mesh)` and the service's address comes
    from `config.custom` or the environment (see connection.py); `address=` overrides both.
    """

    def __init__(self, config: Any, model_config: Any, device_mesh: Any = None, *, address: str | None = None):
        super().__init__(config, model_config, device_mesh)
        custom = dict(self.config.custom or {})
        if address is not None:
            custom["address"] = address
        self.connection = Connection.from_custom(custom)
        self.bucket_bytes = self.config.checkpoint_engine.update_weights_bucket_megabytes << 20
        # Every rank builds the rollout at the same point of verl's init_model, so this collective
        # call is matched.
        self._group = lockstep.gloo_group()
        self._client: RolloutClient | None = None
        self._push_client: RolloutClient | None = None  # rank 0's, for the syncs
        self.last_push: PushResult | None = None

    @property
    def client(self) -> RolloutClient:
        if self._client is None:
            self._client = RolloutClient(**self.connection.client_options())
        return self._client

    async def update_weights(
        self,
        weights: Iterable,
        wire_format: str = "named_tensors",
        *,
        peft_config: Any = None,
        base_sync_done: bool = True,
        global_steps: int | None = None,
        **kwargs: Any,
    ) -> PushResult:
        """One sync: rank 0 pushes the gathered tensors while every other rank steps its generator;
        every rank returns the push's result, or raises (rank 0 its error, the others a
        RuntimeError quoting it)."""
        # Checked on every rank before the generator is touched, so a refusal hangs no gather.
        if wire_format != "named_tensors":
            raise ValueError(
                f"wire_format={wire_format!r}: rollout-service takes full named tensors; delta flushes carry "
                "patches against the engine's own copy (use checkpoint_engine.backend=naive)"
            )
        if peft_config is not None:
            raise ValueError(
                "peft_config: a LoRA sync sends adapter tensors, which rollout-service cannot apply; merge the "
                "adapter (actor_rollout_ref.model.lora.merge=True) so full weights are synced"
            )
        weights = iter(weights)
        label = "" if global_steps is None else str(global_steps)
        if lockstep.rank() == 0:
            outcome = await asyncio.to_thread(lockstep.push_from_rank0, lockstep.SharedWeights(weights), lambda w: self._push(w, label))
        else:
            lockstep.step_with_rank0(weights)  # on the event loop's thread, as verl's own rollouts step it
            outcome = None
        self.last_push = lockstep.rank0_outcome(outcome, self._group)
        return self.last_push

    def _push(self, weights: lockstep.SharedWeights, label: str) -> PushResult:
        # The blocking client, on a thread: it reports the service's own status for a push refused
        # part-way (the asyncio client, whose loop each gather blocks, once reported only "INTERNAL:
        # Internal error from Core" in tests/clients/test_verl_plugin.py). No deadline: a push of
        # many GB takes as long as it takes. One client for every sync: it keeps the bf16 copy
        # each sync's delta is taken against (pushes that stream send deltas by default).
        if self._push_client is None:
            self._push_client = self.connection.push_client()
        # Fenced on this rollout's previous sync: a push by anyone else in between (another
        # trainer, a stale process) fails this sync with FAILED_PRECONDITION instead of being overwritten.
        expected = self.last_push.version if self.last_push is not None else None
        return self._push_client.push_weights(
            weights, bucket_bytes=self.bucket_bytes, label=label, expected_version=expected, progress=False
        )

    async def resume(self, tags: list[str]) -> None:
        """Nothing to load back: the weights and KV cache live in the service's replicas."""

    async def release(self) -> None:
        """Nothing to free here: the service's engine memory is not on the trainer's GPUs."""

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
        samples = [c.samples[0] for c in sorted(stream, key=lambda c: c.prompt_index)]
        if self.last_push is not None:
            check_versions(samples, self.last_push.version)

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
