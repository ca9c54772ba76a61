"""tis_weights and mismatch_report against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rollout_client import mismatch_report, tis_weights


def test_tis_weights_are_the_ratio_capped_from_above():
    trainer = np.array([-1.0, -2.0, -0.1], dtype=np.float32)
    rollout = np.array([-1.5, -1.0, -3.0], dtype=np.float32)
    w = tis_weights(trainer, rollout, cap=2.0)
    np.testing.assert_allclose(w, [math.exp(0.5), math.exp(-1.0), 2.0], rtol=1e-6)


def test_torch_in_torch_out_and_detached():
    trainer = torch.tensor([[-1.0, -0.5]], requires_grad=True)
    w = tis_weights(trainer, torch.tensor([[-1.0, -1.0]]), cap=1.5)
    assert isinstance(w, torch.Tensor) and not w.requires_grad
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.5]]))


def test_report_matches_hand_computation_over_the_masked_tokens():
    trainer = np.array([[-1.0, -2.0, 9.0], [-0.5, -0.5, -0.5]])
    rollout = np.array([[-1.2, -1.0, 0.0], [-0.5, -2.0, -0.5]])
    mask = np.array([[1, 1, 0], [1, 1, 1]])
    d = np.array([0.2, -1.0, 0.0, 1.5, 0.0])  # trainer - rollout where mask
    r = np.exp(d)
    rep = mismatch_report(trainer, rollout, mask, cap=2.0)
    assert rep.tokens == 5
    assert rep.mean_abs_diff == pytest.approx(np.abs(d).mean())
    assert rep.max_abs_diff == pytest.approx(1.5)
    assert rep.kl == pytest.approx((r - 1 - d).mean())
    assert rep.fraction_clipped == pytest.approx(1 / 5)  # only exp(1.5) = 4.48 > 2
    assert rep.mean_tis_weight == pytest.approx(np.minimum(r, 2.0).mean())
    assert "5 tokens" in str(rep)


def test_identical_logprobs_report_no_mismatch():
    x = torch.randn(4, 7)
    rep = mismatch_report(x, x.clone())
    assert rep.mean_abs_diff == 0 and rep.kl == 0 and rep.fraction_clipped == 0 and rep.mean_tis_weight == 1


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: tis_weights(np.zeros(3), np.zeros(4)), r"shape \(3,\) != rollout_logprobs shape \(4,\)"),
        (lambda: tis_weights(np.zeros(3), np.zeros(3), cap=0), "cap=0"),
        (lambda: mismatch_report(np.zeros(3), np.zeros(3), mask=np.zeros(3)), "no tokens"),
        (lambda: mismatch_report(np.zeros(3), np.zeros(3), mask=np.ones(2)), "mask shape"),
    ],
)
def test_bad_inputs_are_value_errors_naming_the_problem(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_check_versions_refuses_samples_newer_than_the_trainers_last_push():
    from types import SimpleNamespace

    from rollout_client.rl import StaleRolloutError, check_versions

    samples = [SimpleNamespace(weight_version=v) for v in (3, 4, 4)]
    check_versions(samples, last_pushed=4)  # its own version and an older one are fine
    with pytest.raises(StaleRolloutError, match=r"version\(s\) \[4\] are newer than this trainer's last push \(3\)"):
        check_versions(samples, last_pushed=3)
