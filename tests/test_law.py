"""The CPT loss law: its areas by hand on short schedules, parameters recovered from curves it generated, and
refusals instead of confident numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cpt.optim import law


def test_the_areas_by_hand_on_a_short_schedule():
    # LRs 1, 2, 3, 2, 1 after a pre-training that ended at 1 with momentum 0.5; lambda 0.5
    pre = law.Pretrain(s1=10.0, s2=4.0, m=0.5, last_lr=1.0)
    a = law.areas(np.array([1.0, 2.0, 3.0, 2.0, 1.0]), np.array([0, 1, 2, 3, 4, 5]), pre, lam=0.5)
    # drops: 1-1=0, 1-2=-1, 2-3=-1, 3-2=1, 2-1=1; m: 0.25, -0.875, -1.4375, 0.28125, 1.140625
    m = [0.25, -0.875, -1.4375, 0.28125, 1.140625]
    assert a.s1_cpt.tolist() == [0, 1, 3, 6, 8, 9]
    assert a.s1.tolist() == [10, 11, 13, 16, 18, 19]
    assert a.s2 == pytest.approx([4.0] + [4.0 + sum(m[:k]) for k in range(1, 6)], abs=1e-12)


def test_a_pretraining_schedules_areas_by_hand():
    pre = law.Pretrain.of(np.array([1.0, 3.0, 2.0, 2.0, 0.5]), lam=0.5)
    # drops 0, -2, 1, 0, 1.5; m: 0, -2, 0, 0, 1.5; S2 = -0.5
    assert (pre.s1, pre.s2, pre.m, pre.last_lr) == (8.5, pytest.approx(-0.5), pytest.approx(1.5), 0.5)
    assert law.Pretrain.of(np.empty(0)) == law.Pretrain(0.0, 0.0, 0.0, 0.0)


def test_the_law_by_hand_at_one_point():
    a = law.Areas(np.array([3]), np.array([4.0]), np.array([2.0]), np.array([0.5]))
    p = np.array([2.0, 3.0, 0.5, 0.2, 0.4, 1.5, 2.0])  # L0, A, alpha, C, B, E, beta
    assert law.predict(p, a)[0] == pytest.approx(2.0 + 3.0 / 2.0 - 0.1 + 0.4 * (1 - 4.0**-2.0))


def _runs(params, noise, seed=1):
    """Three schedules of 400 batches after a 2,000-batch cosine pre-training: constant, re-warm 1x, re-warm 2x."""
    rng = np.random.default_rng(seed)
    t = np.arange(2000)
    pre = law.Pretrain.of(3e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * t / 2000))))
    n = np.arange(400)
    cos = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * np.clip(n - 20, 0, None) / 380))
    warm = np.where(n < 20, n / 20, cos)
    runs = {"constant": np.full(400, 3e-4), "rewarm-1x": 3e-3 * warm, "rewarm-2x": 6e-3 * warm}
    batches = np.concatenate([np.arange(0, 100, 4), np.arange(100, 401, 20)])
    out = {}
    for name, lrs in runs.items():
        a = law.areas(lrs, batches, pre)
        out[name] = (a, law.predict(params, a) + rng.normal(0.0, noise, len(batches)))
    return out


TRUE = np.array([2.0, 0.8, 0.4, 30.0, 0.3, 300.0, 0.7])


def test_curves_the_law_generated_are_fitted_back():
    runs = _runs(TRUE, noise=0.002)
    fit = law.fit(list(runs.values()))
    assert fit.rmse < 0.003 and fit.r2 > 0.99 and fit.points == 3 * 41
    for name, (a, _) in runs.items():  # each run's curve comes back within 3x the noise
        assert np.max(np.abs(law.predict(fit.params, a) - law.predict(TRUE, a))) < 0.006, name
    assert np.all(np.isfinite(fit.stderr))


def test_a_held_out_schedule_is_predicted_from_the_other_two():
    runs = _runs(TRUE, noise=0.002, seed=2)
    fit = law.fit([runs["constant"], runs["rewarm-1x"]])
    a, _ = runs["rewarm-2x"]
    truth = law.predict(TRUE, a)
    error = law.predict(fit.params, a)[-1] - truth[-1]
    assert abs(error) < 0.02
    sd = fit.sd(a)[-1]  # the prediction's own standard error covers its error, and is not vacuous
    assert abs(error) <= 3 * sd and sd < 0.02


def test_a_predictions_standard_error_by_hand():
    """``Fit.sd`` = sqrt(g' S g), with g the law's gradient taken here by central differences of ``predict``."""
    a = law.Areas(np.arange(3), np.array([0.5, 1.0, 2.0]), np.array([0.0, 0.3, 1.0]), np.array([0.0, 0.1, -0.2]))
    p = np.array([2.0, 0.8, 0.4, 3.0, -0.3, 3.0, 0.7])
    rng = np.random.default_rng(0)
    m = rng.normal(size=(7, 7))
    cov = m @ m.T * 1e-4  # any positive definite covariance
    fit = law.Fit(p, np.sqrt(np.diag(cov)), 30, 0.01, 0.9, 0.02, True, cov)
    g = np.stack([(law.predict(p + h, a) - law.predict(p - h, a)) / 2e-6 for h in np.eye(7) * 1e-6], axis=1)
    expected = [math.sqrt(sum(g[i, j] * cov[j, k] * g[i, k] for j in range(7) for k in range(7))) for i in range(3)]
    assert fit.sd(a) == pytest.approx(expected, rel=1e-5)
    back = law.Fit.from_json(json.loads(json.dumps(fit.to_json())), "law.json")
    assert back.sd(a).tolist() == fit.sd(a).tolist()  # the covariance survives law.json
    old = {k: v for k, v in fit.to_json().items() if k != "cov"}  # a law written before the covariance was kept
    assert np.all(np.isnan(law.Fit.from_json(old, "law.json").sd(a)))
    with pytest.raises(law.LawError, match="law.json: cov must be 7x7"):
        law.Fit.from_json({**fit.to_json(), "cov": [[1.0, 2.0]]}, "law.json")


def test_a_fit_that_fails_from_every_start_is_refused():
    """Areas the law cannot evaluate (a NaN forward area) make every start fail: a refusal, never a number."""
    batches = np.arange(12)
    a = law.Areas(batches, np.full(12, math.nan), np.arange(12.0), np.zeros(12))
    with pytest.raises(law.LawError, match="the fit failed from every one of its starting points"):
        law.fit([(a, np.linspace(3.0, 2.0, 12))])


def test_fewer_points_than_parameters_and_bad_losses_are_refused():
    a = law.Areas(np.arange(5), np.arange(1.0, 6.0), np.arange(5.0), np.zeros(5))
    with pytest.raises(law.LawError, match="5 evaluations cannot fit the law's 7 parameters"):
        law.fit([(a, np.ones(5))])
    a = law.Areas(np.arange(9), np.arange(1.0, 10.0), np.arange(9.0), np.zeros(9))
    with pytest.raises(law.LawError, match="not finite"):
        law.fit([(a, np.array([1.0] * 8 + [math.nan]))])


def test_an_evaluation_past_the_known_lrs_is_refused():
    with pytest.raises(law.LawError, match="batch 9 lies past the 4 batches"):
        law.areas(np.ones(4), np.array([2, 9]), law.Pretrain(0, 0, 0, 0))


def test_the_jacobian_matches_finite_differences():
    a = law.Areas(
        np.arange(4), np.array([0.5, 1.0, 2.0, 4.0]), np.array([0.0, 0.3, 1.0, 2.5]), np.array([0, 0.1, -0.2, 0.4])
    )
    p = np.array([2.0, 0.8, 0.4, 3.0, -0.3, 3.0, 0.7])
    numeric = np.stack([(law.predict(p + h, a) - law.predict(p - h, a)) / 2e-6 for h in np.eye(7) * 1e-6], axis=1)
    assert law.jacobian(p, a) == pytest.approx(numeric, rel=1e-5, abs=1e-7)
