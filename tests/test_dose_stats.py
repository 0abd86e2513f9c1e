"""Dose–response statistics in jsae.protocol.stats: curve reading, shared-image bootstrap, concept means,
the sign-flip interaction test and Holm's adjustment."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
from scipy import stats as sps

from jsae.protocol.stats import (
    bootstrap_by_image,
    bootstrap_draws,
    bootstrap_mean_over_concepts,
    capped_log_ratio,
    curve_summary,
    effect_at,
    effect_at_preservation,
    holm,
    interaction_signflip,
    percentile_interval,
    r_at_effect,
    summary_stat,
)

GRID = [0.5, 1.0, 2.0, 4.0, 8.0]


# ---- reading one curve ------------------------------------------------------------------------------------


def test_r_at_effect_interpolates_in_log_strength():
    # below at 2 (0.4), above at 4 (0.8): t = 0.25 of the way in log strength -> 2 * 2**0.25
    assert r_at_effect(GRID, [0.0, 0.2, 0.4, 0.8, 1.0]) == pytest.approx(2 * 2 ** 0.25)
    # exactly reaching the target at a grid point returns that point
    assert r_at_effect(GRID, [0.0, 0.2, 0.5, 0.8, 1.0]) == pytest.approx(2.0)
    # a dip after the first crossing does not matter: the first crossing counts
    assert r_at_effect(GRID, [0.0, 0.6, 0.3, 0.8, 1.0]) == pytest.approx(0.5 * 2 ** (0.5 / 0.6))


def test_r_at_effect_not_reached_and_first_point():
    assert r_at_effect(GRID, [0.0, 0.1, 0.2, 0.3, 0.49]) == math.inf
    assert r_at_effect(GRID, [0.7, 0.8, 0.9, 1.0, 1.0]) == 0.5
    assert r_at_effect(GRID, [0.0, 0.1, 0.2, 0.3, 0.49], target=0.2) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        r_at_effect([1.0, 0.5], [0.0, 1.0])


def test_effect_at_interpolates_and_clamps():
    e = [0.0, 0.2, 0.4, 0.8, 1.0]
    assert effect_at(GRID, e, 2 * math.sqrt(2)) == pytest.approx(0.6)
    assert effect_at(GRID, e, 4.0) == pytest.approx(0.8)
    assert effect_at(GRID, e, 100.0) == 1.0
    assert effect_at(GRID, e, math.inf) == 1.0
    assert effect_at(GRID, e, 0.01) == 0.0


def test_effect_at_preservation_hand_curve():
    e = [0.0, 0.2, 0.4, 0.8, 1.0]
    # preservation 0.8 at s=2, 0.6 at s=4: crosses 0.75 a quarter of the way (in log s) -> effect 0.4 + 0.25*0.4
    assert effect_at_preservation(GRID, e, [1.0, 0.9, 0.8, 0.6, 0.2]) == pytest.approx(0.5)
    # a NaN point is skipped: crossing between s=1 (0.9) and s=4 (0.6) at the log midpoint s=2 -> 0.4
    assert effect_at_preservation(GRID, e, [1.0, 0.9, np.nan, 0.6, 0.2]) == pytest.approx(0.4)
    # never below: the strongest point; below at the weakest point: the weakest point
    assert effect_at_preservation(GRID, e, [1.0] * 5) == 1.0
    assert effect_at_preservation(GRID, [0.1, 0.2, 0.4, 0.8, 1.0], [0.5, 1.0, 1.0, 1.0, 1.0]) == 0.1
    assert effect_at_preservation(GRID, e, [np.nan, 0.5, 1.0, 1.0, 1.0]) == pytest.approx(0.2)
    assert math.isnan(effect_at_preservation(GRID, e, [np.nan] * 5))


def test_curve_summary_from_image_means():
    effect = np.array([[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]], float)  # mean 0..1
    pres = np.full((5, 4), 0.9)
    pres[3:, 0] = 0.1  # image 0 loses preservation from s=4: mean 0.7 there
    pres[4, 1] = np.nan  # left out of the mean
    out = curve_summary(GRID, effect, pres, target=0.5, small=1.0, level=0.75)
    assert out["r50"] == pytest.approx(2.0)
    assert out["effect_at_small"] == pytest.approx(0.25)
    # preservation 0.9 at s=2, 0.7 at s=4: crossing at t=0.75 -> effect 0.5 + 0.75 * 0.25
    assert out["effect_at_preservation"] == pytest.approx(0.6875)


# ---- bootstrap over images ----------------------------------------------------------------------------------

STRENGTHS = np.geomspace(0.25, 64, 9)
X = np.log(STRENGTHS / 0.25) / np.log(256)


def _threshold_curves(rng: np.random.Generator, n_curves: int, n: int) -> list[dict]:
    """Each image responds from its own threshold strength (log-normal); preservation falls linearly in log s."""
    curves = []
    for c in range(n_curves):
        tau, u = np.exp(rng.normal(1.0, 1.0, n)), rng.uniform(0, 1, n)
        curves.append({"image_ids": np.arange(n) + c * n, "strengths": STRENGTHS,
                       "effect": (STRENGTHS[:, None] >= tau).astype(float), "preservation": 1 - u * X[:, None]})
    return curves


def test_bootstrap_intervals_cover_population_truth():
    truth_effect = sps.norm.cdf(np.log(STRENGTHS) - 1.0)
    truth = curve_summary(STRENGTHS, truth_effect[:, None], (1 - 0.5 * X)[:, None], small=1.0, level=0.7)
    curves = _threshold_curves(np.random.default_rng(0), 300, 30)  # 300 independent data sets of 30 images
    res = bootstrap_by_image(curves, partial(summary_stat, small=1.0, level=0.7), n_boot=1000, vectorised=True)
    for key, value in truth.items():
        coverage = np.mean([r[key]["low"] <= value <= r[key]["high"] for r in res])
        assert 0.88 <= coverage <= 0.99, (key, coverage)
    assert all(r["r50"]["n_valid"] == 1000 for r in res)


def test_bootstrap_shares_images_between_curves():
    rng = np.random.default_rng(1)
    base = _threshold_curves(rng, 1, 30)[0]
    twin = {key: np.copy(value) for key, value in base.items()}  # same images, same scores
    perm = rng.permutation(30)  # same images and scores, other column order
    shuffled = {**base, "image_ids": base["image_ids"][perm], "effect": base["effect"][:, perm],
                "preservation": base["preservation"][:, perm]}
    stranger = {**base, "image_ids": base["image_ids"] + 1000}  # identical scores, other images
    extra = _threshold_curves(rng, 3, 30)  # more images in the union
    points, draws = bootstrap_draws([base, twin, shuffled, stranger, *extra], n_boot=500)
    for key in ("r50", "effect_at_small", "effect_at_preservation"):
        assert points[key][0] == points[key][1] == pytest.approx(points[key][2]) == pytest.approx(points[key][3])
        assert np.var(draws[key][0] - draws[key][1]) == 0.0
        assert np.var(draws[key][0] - draws[key][2]) < 1e-20  # only summation order differs
        assert np.var(draws[key][0] - draws[key][3]) > 1e-4 * np.var(draws[key][0])


def test_bootstrap_not_reached_and_custom_stat():
    flat = {"image_ids": np.arange(20), "strengths": GRID, "effect": np.zeros((5, 20)),
            "preservation": np.ones((5, 20))}
    r = bootstrap_by_image([flat], n_boot=200)[0]["r50"]
    assert r["point"] == r["low"] == r["high"] == math.inf and r["p_not_reached"] == 1.0
    # an edge curve: half the images respond at the strongest point only -> reached in some resamples only
    edge = {**flat, "effect": np.zeros((5, 20))}
    edge["effect"][4, :10] = 1.0
    r = bootstrap_by_image([edge], n_boot=400)[0]["r50"]
    assert r["point"] == 8.0 and r["high"] == math.inf and 0.2 < r["p_not_reached"] < 0.8
    # a per-resample float statistic matches the same statistic vectorised
    def strongest(c, w):
        return float(np.average(c["effect"][-1], weights=w))

    def strongest_vec(c, w):
        return (w @ c["effect"][-1]) / w.sum(-1)

    a = bootstrap_by_image([edge, flat], strongest, n_boot=300, seed=3)
    b = bootstrap_by_image([edge, flat], strongest_vec, n_boot=300, seed=3, vectorised=True)
    assert a == b and a[0]["stat"]["point"] == 0.5


def test_percentile_interval_with_inf_and_nan():
    out = percentile_interval(1.0, np.r_[np.ones(90), np.full(10, np.inf), np.nan], level=0.9)
    assert out["low"] == 1.0 and out["high"] == math.inf and out["p_not_reached"] == 0.1 and out["n_valid"] == 100


# ---- mean over concepts ---------------------------------------------------------------------------------------


def test_capped_log_ratio():
    got = capped_log_ratio(np.array([2.0, np.inf, np.inf, 1.0]), np.array([1.0, 4.0, np.inf, np.inf]), 16.0)
    np.testing.assert_allclose(got, [math.log(2), math.log(4), 0.0, -math.log(16)])


def test_mean_over_concepts_two_levels():
    rng = np.random.default_rng(2)
    # method and oracle curves in ONE bootstrap call: identical scores give a ratio of exactly 0 in every resample
    curves = _threshold_curves(rng, 4, 30)
    points, draws = bootstrap_draws(curves + curves, n_boot=300)
    ratio_pt = capped_log_ratio(points["r50"][:4], points["r50"][4:], 128.0)
    ratio = capped_log_ratio(draws["r50"][:4], draws["r50"][4:], 128.0)
    out = bootstrap_mean_over_concepts(ratio_pt, ratio)
    assert out["mean"] == out["low"] == out["high"] == 0.0 and out["n_concepts"] == 4
    # concept spread only: the interval is about mean ± 1.96 sd / sqrt(C); fixed concepts: no width
    values = rng.normal(0.0, 1.0, 40)
    draws_c = np.repeat(values[:, None], 2000, 1)
    out = bootstrap_mean_over_concepts(np.r_[values, np.nan], np.vstack([draws_c, np.zeros((1, 2000))]))
    half = 1.96 * values.std() / math.sqrt(40)
    assert out["n_dropped"] == 1 and out["n_concepts"] == 40
    assert (out["high"] - out["low"]) / 2 == pytest.approx(half, rel=0.15)
    fixed = bootstrap_mean_over_concepts(values, draws_c, resample_concepts=False)
    assert fixed["low"] == pytest.approx(fixed["high"]) == pytest.approx(values.mean())
    with pytest.raises(ValueError):
        bootstrap_mean_over_concepts(np.array([np.inf, 1.0]), np.ones((2, 5)))
    assert bootstrap_mean_over_concepts(np.array([np.inf, 1.0]), np.ones((2, 5)), cap=3.0)["mean"] == 2.0


# ---- interaction and multiplicity ------------------------------------------------------------------------------

PATTERN = np.array([[1.0, 0.5, -0.5, -1.0], [-1.0, -0.5, 0.5, 1.0]])


def _concept_tables(rng: np.random.Generator, interaction: float, n_concepts: int = 6) -> np.ndarray:
    """log r50-like values [C, M=2, L=4]: model + layer + concept effects, concept-specific model and layer
    effects, cell noise, and optionally a fixed model × layer interaction."""
    m, n_l = PATTERN.shape
    y = rng.normal(0, 1, (1, m, 1)) + rng.normal(0, 1, (1, 1, n_l)) + rng.normal(0, 1, (n_concepts, 1, 1))
    y = y + rng.normal(0, 0.5, (n_concepts, m, 1)) + rng.normal(0, 0.5, (n_concepts, 1, n_l))
    return y + rng.normal(0, 0.3, (n_concepts, m, n_l)) + interaction * PATTERN


def test_signflip_calibration_and_power():
    rng = np.random.default_rng(3)
    null = [interaction_signflip(_concept_tables(rng, 0.0), n_perm=200, seed=i)["p_value"] for i in range(400)]
    alt = [interaction_signflip(_concept_tables(rng, 0.4), n_perm=200, seed=i)["p_value"] for i in range(300)]
    false_positive, power = np.mean(np.array(null) <= 0.05), np.mean(np.array(alt) <= 0.05)
    assert false_positive <= 0.07, false_positive
    assert power >= 0.80, power


def test_signflip_details():
    rng = np.random.default_rng(4)
    y = _concept_tables(rng, 1.0)
    out = interaction_signflip(y, n_perm=200)
    assert out["exact"] and out["n_flips"] == 64 and out["n_concepts"] == 6 and out["df"] == (3, 15)
    assert out["p_value"] == pytest.approx(2 / 64) and out["p_value_f"] < 0.01
    np.testing.assert_allclose(out["mean_contrast"].sum(0), 0, atol=1e-12)
    np.testing.assert_allclose(out["mean_contrast"].sum(1), 0, atol=1e-12)
    assert np.corrcoef(out["mean_contrast"].ravel(), PATTERN.ravel())[0, 1] > 0.9
    # purely additive tables: every contrast is 0 up to rounding, no evidence
    additive = np.arange(2)[None, :, None] + np.arange(4)[None, None, :] + np.arange(6)[:, None, None] * 1.0
    assert interaction_signflip(additive + 0.0 * PATTERN)["mean_contrast"] == pytest.approx(np.zeros((2, 4)))
    # a concept with a NaN cell is dropped; many concepts: random flips with a +1 correction
    y[2, 0, 1] = np.nan
    assert interaction_signflip(y)["n_dropped"] == 1
    big = interaction_signflip(_concept_tables(rng, 0.0, n_concepts=12), n_perm=200, seed=1)
    assert not big["exact"] and big["n_flips"] == 200 and 1 / 201 <= big["p_value"] <= 1.0


def test_holm_hand_example():
    got = holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5})
    assert got == pytest.approx({"a": 0.04, "b": 0.09, "c": 0.09, "d": 0.5})
    assert list(got) == ["a", "b", "c", "d"]
    assert holm({"x": 0.6, "y": 0.7}) == {"x": 1.0, "y": 1.0}
    nan = holm({"x": 0.01, "y": float("nan")})
    assert nan["x"] == pytest.approx(0.01) and math.isnan(nan["y"])
