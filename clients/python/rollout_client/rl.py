"""RL helpers for the rollout/trainer mismatch: truncated importance sampling and its report.

The service samples with its own engine (maybe INT8/FP8), the trainer scores the same tokens
with its own model; the two logprobs differ a little. FlashRL corrects the policy gradient with
truncated importance sampling (TIS): each token's loss is weighted by

    w = min(exp(logp_trainer - logp_rollout), cap)

(no gradient through w). `tis_weights` computes it; `mismatch_report` says how large the gap is.
Both take numpy arrays or torch tensors (returned in kind), either padded [batch, T] with a mask
or flat over the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_TIS_CAP = 2.0  # FlashRL's default `tis_imp_ratio_cap`


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _check(trainer_logprobs: Any, rollout_logprobs: Any, cap: float) -> None:
    if tuple(trainer_logprobs.shape) != tuple(rollout_logprobs.shape):
        raise ValueError(
            f"trainer_logprobs shape {tuple(trainer_logprobs.shape)} != rollout_logprobs shape "
            f"{tuple(rollout_logprobs.shape)}"
        )
    if not cap > 0:
        raise ValueError(f"cap={cap} must be positive")


def tis_weights(trainer_logprobs: Any, rollout_logprobs: Any, cap: float = DEFAULT_TIS_CAP) -> Any:
    """min(exp(trainer - rollout), cap), elementwise; detached when given torch tensors."""
    _check(trainer_logprobs, rollout_logprobs, cap)
    if _is_torch(trainer_logprobs):
        return (trainer_logprobs.detach().float() - rollout_logprobs.detach().float()).exp().clamp(max=cap)
    diff = np.asarray(trainer_logprobs, dtype=np.float64) - np.asarray(rollout_logprobs, dtype=np.float64)
    return np.minimum(np.exp(diff), cap).astype(np.float32)


@dataclass(frozen=True)
class MismatchReport:
    """How far the rollout engine's logprobs are from the trainer's on the sampled tokens."""

    tokens: int
    mean_abs_diff: float  # mean |logp_trainer - logp_rollout|
    max_abs_diff: float
    kl: float  # KL(rollout || trainer), k3 estimator over the sampled tokens (>= 0)
    mean_tis_weight: float
    fraction_clipped: float  # share of tokens whose ratio exceeded the cap

    def __str__(self) -> str:
        return (
            f"{self.tokens} tokens: mean |Δlogprob| {self.mean_abs_diff:.4f} (max {self.max_abs_diff:.4f}), "
            f"KL {self.kl:.2e}, TIS weight mean {self.mean_tis_weight:.3f}, clipped {self.fraction_clipped:.1%}"
        )


def mismatch_report(
    trainer_logprobs: Any, rollout_logprobs: Any, mask: Any = None, cap: float = DEFAULT_TIS_CAP
) -> MismatchReport:
    """Statistics over the tokens where `mask` is true (all tokens when it is None).

    KL uses Schulman's k3 estimator with samples from the rollout policy:
    E[r - 1 - log r], r = p_trainer / p_rollout — unbiased and never negative.
    """
    _check(trainer_logprobs, rollout_logprobs, cap)

    def host(x: Any) -> np.ndarray:
        return np.asarray(x.detach().float().cpu() if _is_torch(x) else x, dtype=np.float64)

    t, r = host(trainer_logprobs), host(rollout_logprobs)
    if mask is not None:
        m = host(mask).astype(bool)
        if m.shape != t.shape:
            raise ValueError(f"mask shape {m.shape} != logprobs shape {t.shape}")
        t, r = t[m], r[m]
    t, r = t.ravel(), r.ravel()
    if t.size == 0:
        raise ValueError("mismatch_report: no tokens (empty input or all-false mask)")
    log_ratio = t - r
    ratio = np.exp(log_ratio)
    return MismatchReport(
        tokens=int(t.size),
        mean_abs_diff=float(np.abs(log_ratio).mean()),
        max_abs_diff=float(np.abs(log_ratio).max()),
        kl=float((ratio - 1 - log_ratio).mean()),
        mean_tis_weight=float(np.minimum(ratio, cap).mean()),
        fraction_clipped=float((ratio > cap).mean()),
    )


class StaleRolloutError(RuntimeError):
    """Samples came from weights newer than the trainer's last push: someone else pushed in between."""


def check_versions(samples: Any, last_pushed: int) -> None:
    """Refuse samples made by a version newer than `last_pushed` (the version the trainer's own last
    push created): their logprobs belong to a policy this trainer never had, so importance weights
    against it would be wrong. Older versions are the trainer's own (off-policy by design)."""
    newer = sorted({s.weight_version for s in samples if s.weight_version > last_pushed})
    if newer:
        raise StaleRolloutError(
            f"samples of weight version(s) {newer} are newer than this trainer's last push ({last_pushed}): "
            "another client pushed weights to the service in between"
        )
