"""One push from many trainer ranks: rank 0 streams, the others step their gathers in lockstep.

Trainers sync weights on every rank at once (verl's `update_weights`, OpenRLHF's
`broadcast_to_vllm`), and each full tensor may be a collective gather (FSDP `full_tensor()`,
DeepSpeed ZeRO-3 `GatheredParameters`) that every rank must enter. So rank 0 pushes while the
other ranks step the same generator; a push that fails part-way still steps rank 0's generator
to its end, so no rank is left waiting in a gather; and rank 0's outcome then reaches every rank,
so all return the same PushResult or all raise.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from rollout_client.push import PushResult


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def gloo_group() -> Any:
    """A gloo group over all ranks for `rank0_outcome` (None without torch.distributed): no device to pick,
    and no NCCL watchdog on ranks that wait through a whole push. A collective call: every rank
    must make it at the same point."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.new_group(backend="gloo")
    return None


class SharedWeights:
    """A weights generator stepped by whichever thread asks (gRPC's sender, then the drain after a
    failed push), one step at a time, with the caller's CUDA device current (each step may be an
    NCCL gather)."""

    def __init__(self, weights: Iterator):
        self._weights = weights
        self._lock = threading.Lock()
        self._device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None

    def __iter__(self) -> SharedWeights:
        return self

    def __next__(self):
        with self._lock:
            if self._device is not None:
                torch.cuda.set_device(self._device)
            return next(self._weights)


def push_from_rank0(weights: SharedWeights, push: Callable[[SharedWeights], PushResult]) -> PushResult | Exception:
    """Rank 0's part: push, then step the generator to its end whatever happened (the other ranks
    wait in each gather). The error is returned, not raised: `rank0_outcome` raises it once every rank has it."""
    try:
        return push(weights)
    except Exception as exc:
        return exc
    finally:
        for _ in weights:
            pass


def step_with_rank0(weights: Iterator) -> None:
    """Every other rank's part: step the generator in lockstep with rank 0's push."""
    for _ in weights:
        pass


def rank0_outcome(outcome: PushResult | Exception | None, group: Any) -> PushResult:
    """Rank 0's outcome on every rank (an error as its text: it need not survive pickling)."""
    if group is not None:
        box = [outcome if isinstance(outcome, PushResult) else f"{type(outcome).__name__}: {outcome}"]
        torch.distributed.broadcast_object_list(box, src=0, group=group)
        if rank() != 0:
            outcome = box[0] if isinstance(box[0], PushResult) else RuntimeError(f"rank 0's push failed: {box[0]}")
    if isinstance(outcome, Exception):
        raise outcome
    if outcome is None:
        raise RuntimeError(f"rank {rank()} has no process group to hear rank 0's push from (torch.distributed is not initialized)")
    return outcome


def push_in_lockstep(weights: Iterator, push: Callable[[SharedWeights], PushResult], group: Any) -> PushResult:
    """The whole sync for a caller on one thread: every rank calls it with its own generator."""
    outcome = push_from_rank0(SharedWeights(weights), push) if rank() == 0 else step_with_rank0(weights)
    return rank0_outcome(outcome, group)
