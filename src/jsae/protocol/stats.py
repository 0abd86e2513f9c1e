"""Statistics for the steering / suppression protocol.

- :func:`bootstrap_ci`: percentile bootstrap interval of a mean (per-image scores, e.g. steered hit minus
  unsteered hit, so the interval is for a paired rate difference).
- :func:`cohens_h`: effect size of a change between two proportions.
- :func:`interaction_test`: is the layer profile of an effect different between models?  A two-way
  model × layer F statistic on per-image scores, its p-value by Freedman–Lane permutation of the
  residuals of the additive model (no distributional assumption on 0/±1 scores).
- :func:`images_for_halfwidth`: how many images a cell needs for a ±h 95% interval at worst-case variance.

Dose–response statistics (a direction applied at a grid of strengths ``s`` [K], increasing and positive, to the
same images at every strength; one *curve* is a method × layer × concept with per-image scores ``effect[K, n]``
and ``preservation[K, n]``):

- :func:`r_at_effect`, :func:`effect_at`, :func:`effect_at_preservation`, :func:`curve_summary`: read a mean
  curve, interpolating linearly in log strength.
- :func:`shared_image_weights`, :func:`bootstrap_draws`, :func:`bootstrap_by_image`: a bootstrap over the union of
  the curves' images, so that an image's scores move together in every curve that contains it.
- :func:`capped_log_ratio`, :func:`bootstrap_mean_over_concepts`: the mean over concepts of a per-concept
  statistic, with an interval that resamples images and concepts.
- :func:`interaction_signflip`: model × layer interaction of a per-concept statistic (e.g. log r50), concepts
  as the unit of replication.  (A MixedLM with a concept random intercept was tried and left out: it ignores
  concept-specific model and layer effects, was badly calibrated on simulated data and did not always converge.)
- :func:`holm`: Holm–Bonferroni adjusted p-values.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Interval:
    mean: float
    low: float
    high: float
    n: int

    @property
    def halfwidth(self) -> float:
        return (self.high - self.low) / 2


def bootstrap_ci(values: np.ndarray | list[float], n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Interval:
    """Percentile bootstrap interval of the mean of ``values``."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("bootstrap_ci needs a non-empty 1-D array of per-item scores")
    if not np.isfinite(x).all():
        raise ValueError(f"bootstrap_ci got {int((~np.isfinite(x)).sum())} non-finite scores; drop them first")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    alpha = (1 - level) / 2
    return Interval(float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)), int(x.size))


def cohens_h(p_after: float, p_before: float) -> float:
    """Cohen's h between two proportions (0.2 small, 0.5 medium, 0.8 large)."""
    clip = lambda p: min(max(p, 0.0), 1.0)  # noqa: E731
    return 2 * math.asin(math.sqrt(clip(p_after))) - 2 * math.asin(math.sqrt(clip(p_before)))


def images_for_halfwidth(halfwidth: float = 0.05, sd: float = 0.5) -> int:
    """Images per cell for a 95% interval of ±halfwidth when scores have standard deviation ``sd``
    (0.5 is the worst case of a 0/1 rate)."""
    return math.ceil((1.96 * sd / halfwidth) ** 2)


def _design(models: np.ndarray, layers: np.ndarray, interaction: bool) -> np.ndarray:
    m_levels, l_levels = np.unique(models), np.unique(layers)
    cols = [np.ones(len(models))]
    cols += [(models == m).astype(float) for m in m_levels[1:]]
    cols += [(layers == lv).astype(float) for lv in l_levels[1:]]
    if interaction:
        cols += [((models == m) & (layers == lv)).astype(float) for m in m_levels[1:] for lv in l_levels[1:]]
    return np.stack(cols, 1)


def _fit(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    fitted = X @ beta
    return fitted, float(((y - fitted) ** 2).sum())


@dataclass
class InteractionResult:
    f_statistic: float
    p_value: float
    df_interaction: int
    df_residual: int
    n_permutations: int


def interaction_test(scores: np.ndarray, models: np.ndarray, layers: np.ndarray, n_perm: int = 2000,
                     seed: int = 0) -> InteractionResult:
    """Model × layer interaction on per-image scores (one row per image and cell)."""
    y = np.asarray(scores, dtype=float)
    models, layers = np.asarray(models), np.asarray(layers)
    if not (len(y) == len(models) == len(layers)):
        raise ValueError("scores, models and layers must have one entry per scored image")
    n_m, n_l = len(np.unique(models)), len(np.unique(layers))
    if n_m < 2 or n_l < 2:
        raise ValueError(f"an interaction test needs >= 2 models and >= 2 layers, got {n_m} and {n_l}")
    X_add, X_full = _design(models, layers, False), _design(models, layers, True)
    df_int = X_full.shape[1] - X_add.shape[1]
    df_res = len(y) - np.linalg.matrix_rank(X_full)

    def f_stat(yy: np.ndarray) -> float:
        _, rss_add = _fit(X_add, yy)
        _, rss_full = _fit(X_full, yy)
        return ((rss_add - rss_full) / df_int) / max(rss_full / df_res, 1e-12)

    observed = f_stat(y)
    fitted_add, _ = _fit(X_add, y)
    resid = y - fitted_add
    rng = np.random.default_rng(seed)
    exceed = sum(f_stat(fitted_add + rng.permutation(resid)) >= observed for _ in range(n_perm))
    return InteractionResult(float(observed), (exceed + 1) / (n_perm + 1), int(df_int), int(df_res), n_perm)


# ---- dose–response curves -----------------------------------------------------------------------------


def _log_grid(strengths: np.ndarray | list[float]) -> np.ndarray:
    """log of a strength grid, checked to be 1-D, positive and strictly increasing."""
    s = np.asarray(strengths, dtype=float)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("strengths must be a non-empty 1-D grid")
    if not (s > 0).all() or not (np.diff(s) > 0).all():
        raise ValueError(f"strengths must be positive and strictly increasing, got {s.tolist()}")
    return np.log(s)


def _take(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``values[..., idx[...]]``: one entry of the last axis per leading index."""
    return np.take_along_axis(values, idx[..., None], -1)[..., 0]


def _interp_batch(logs: np.ndarray, values: np.ndarray, logr: np.ndarray) -> np.ndarray:
    """Linear interpolation of ``values[..., K]`` at ``logr[...]`` on the grid ``logs``, clamped at the ends."""
    values = np.asarray(values, dtype=float)
    logr = np.broadcast_to(np.asarray(logr, dtype=float), values.shape[:-1])
    if logs.size == 1:
        return values[..., 0].copy()
    x = np.clip(logr, logs[0], logs[-1])
    j = np.clip(np.searchsorted(logs, x, side="right") - 1, 0, logs.size - 2)
    t = (x - logs[j]) / (logs[j + 1] - logs[j])
    lo, hi = _take(values, j), _take(values, j + 1)
    out = lo + t * (hi - lo)
    return np.where(np.isnan(logr), np.nan, out)


def _r_at_batch(strengths: np.ndarray, effect: np.ndarray, target: float) -> np.ndarray:
    """:func:`r_at_effect` over leading axes of ``effect[..., K]`` (``inf`` where the target is never reached);
    a crossing exactly at a grid point returns that strength exactly."""
    logs = np.log(strengths)
    reached = effect >= target  # NaN never reaches
    i = np.argmax(reached, -1)
    prev = np.maximum(i - 1, 0)
    e_lo, e_hi = _take(effect, prev), _take(effect, i)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip(np.nan_to_num((target - e_lo) / (e_hi - e_lo), nan=1.0), 0.0, 1.0)
    r = np.exp(logs[prev] + t * (logs[i] - logs[prev]))
    r = np.where((i == 0) | (t >= 1), strengths[i], np.where(t <= 0, strengths[prev], r))
    return np.where(reached.any(-1), r, math.inf)


def _effect_at_preservation_batch(logs: np.ndarray, effect: np.ndarray, preservation: np.ndarray,
                                  level: float) -> np.ndarray:
    """:func:`effect_at_preservation` over leading axes of ``effect``/``preservation`` [..., K]."""
    k_idx = np.arange(logs.size)
    valid = np.isfinite(preservation)
    below = valid & (preservation < level)
    k = np.argmax(below, -1)
    prev = np.where(valid & (k_idx < k[..., None]), k_idx, -1).max(-1)
    last = np.where(valid, k_idx, -1).max(-1)
    prev_c, last_c = np.maximum(prev, 0), np.maximum(last, 0)
    p_prev, p_k = _take(preservation, prev_c), _take(preservation, k)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.clip((p_prev - level) / (p_prev - p_k), 0.0, 1.0)
    logr = logs[prev_c] + t * (logs[k] - logs[prev_c])
    crossing = _interp_batch(logs, effect, np.where(np.isfinite(logr), logr, logs[0]))
    out = np.where(prev >= 0, crossing, _take(effect, k))  # below already at the weakest valid point
    out = np.where(below.any(-1), out, _take(effect, last_c))  # never below: the strongest valid point
    return np.where(last >= 0, out, np.nan)


def r_at_effect(strengths: np.ndarray | list[float], mean_effect: np.ndarray | list[float],
                target: float = 0.5) -> float:
    """Smallest strength at which the mean effect curve reaches ``target``.

    Linear in log strength between the last grid point below ``target`` and the first at or above it;
    ``math.inf`` when the curve never reaches it; the first strength when the first grid point already does
    (flagging such a curve is the caller's business)."""
    logs = _log_grid(strengths)
    e = np.asarray(mean_effect, dtype=float)
    if e.shape != logs.shape:
        raise ValueError(f"mean_effect has shape {e.shape}, strengths {logs.shape}")
    return float(_r_at_batch(np.asarray(strengths, dtype=float), e[None], target)[0])


def effect_at(strengths: np.ndarray | list[float], mean_effect: np.ndarray | list[float], r: float) -> float:
    """Mean effect at strength ``r``, linear in log strength, clamped to the ends of the grid
    (``r = inf`` gives the strongest point, ``r <= 0`` the weakest)."""
    logs = _log_grid(strengths)
    e = np.asarray(mean_effect, dtype=float)
    if e.shape != logs.shape:
        raise ValueError(f"mean_effect has shape {e.shape}, strengths {logs.shape}")
    if math.isnan(r):
        return math.nan
    logr = math.log(r) if r > 0 else -math.inf
    return float(_interp_batch(logs, e[None], np.array([logr]))[0])


def effect_at_preservation(strengths: np.ndarray | list[float], mean_effect: np.ndarray | list[float],
                           mean_preservation: np.ndarray | list[float], level: float = 0.75) -> float:
    """Effect at the largest strength where preservation is still ``>= level``.

    Walks the grid from weak to strong, skipping points whose preservation is NaN.  At the first point below
    ``level`` the crossing is interpolated in log strength between it and the previous (valid) point, and the
    effect is interpolated there.  Never below: the effect at the strongest valid point.  Below already at the
    weakest valid point: the effect there.  No valid point: NaN."""
    logs = _log_grid(strengths)
    e, p = np.asarray(mean_effect, dtype=float), np.asarray(mean_preservation, dtype=float)
    if e.shape != logs.shape or p.shape != logs.shape:
        raise ValueError(f"mean_effect {e.shape} and mean_preservation {p.shape} must match strengths {logs.shape}")
    return float(_effect_at_preservation_batch(logs, e[None], p[None], level)[0])


SUMMARY_KEYS = ("r50", "effect_at_small", "effect_at_preservation")


def summary_from_means(strengths: np.ndarray, mean_effect: np.ndarray, mean_preservation: np.ndarray,
                        target: float, small: float, level: float) -> dict[str, np.ndarray]:
    """The :data:`SUMMARY_KEYS` from mean curves ``[..., K]`` (vectorised over leading axes)."""
    logs = _log_grid(strengths)
    small_log = np.full(mean_effect.shape[:-1], math.log(small))
    return {"r50": _r_at_batch(np.asarray(strengths, dtype=float), mean_effect, target),
            "effect_at_small": _interp_batch(logs, mean_effect, small_log),
            "effect_at_preservation": _effect_at_preservation_batch(logs, mean_effect, mean_preservation, level)}


def curve_summary(strengths: np.ndarray | list[float], effect: np.ndarray, preservation: np.ndarray,
                  target: float = 0.5, small: float = 1.0, level: float = 0.75) -> dict[str, float]:
    """One curve's summary from its per-image scores ``effect``/``preservation`` [K, n].

    ``r50``: :func:`r_at_effect` at ``target`` (named r50 whatever the target); ``effect_at_small``: the mean
    effect at strength ``small``; ``effect_at_preservation``: :func:`effect_at_preservation` at ``level``.
    Means are over images (NaN-mean for preservation)."""
    e, p = np.asarray(effect, dtype=float), np.asarray(preservation, dtype=float)
    ones = np.ones((1, e.shape[1]))
    me, mp = weighted_means(e, p, ones)
    return {k: float(v[0]) for k, v in summary_from_means(np.asarray(strengths, float), me, mp,
                                                          target, small, level).items()}


# ---- bootstrap over images shared between curves ---------------------------------------------------------


def _field(curve: Any, name: str) -> Any:
    return curve[name] if isinstance(curve, dict) else getattr(curve, name)


def weighted_means(effect: np.ndarray, preservation: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted means over images: ``effect``/``preservation`` [K, n], ``weights`` [B, n] -> two [B, K] arrays.

    Preservation NaNs are left out of both numerator and denominator; a mean with no weight is NaN."""
    w = np.asarray(weights, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        me = (w @ effect.T) / w.sum(1, keepdims=True)
        ok = np.isfinite(preservation)
        mp = (w @ np.where(ok, preservation, 0.0).T) / (w @ ok.T.astype(float))
    return me, mp


def summary_stat(curve: Any, weights: np.ndarray, target: float = 0.5, small: float = 1.0,
                 level: float = 0.75) -> dict[str, np.ndarray]:
    """The default bootstrap statistic: :func:`curve_summary`'s keys from weighted means.

    Vectorised: ``weights`` [B, n] (one row per resample) -> each key an array [B].  Use
    ``functools.partial(summary_stat, small=2.0)`` to change its settings."""
    e = np.asarray(_field(curve, "effect"), dtype=float)
    p = np.asarray(_field(curve, "preservation"), dtype=float)
    me, mp = weighted_means(e, p, np.atleast_2d(weights))
    return summary_from_means(np.asarray(_field(curve, "strengths"), float), me, mp, target, small, level)


def shared_image_weights(image_ids: list[np.ndarray], n_boot: int = 1000, seed: int = 0) -> list[np.ndarray]:
    """Bootstrap multiplicity weights of each curve's images, drawn once over the union of image ids.

    The union of N distinct ids is resampled N times with replacement per resample; curve ``c`` gets the
    counts of its own images, an array [n_boot, n_c].  An image has the same count in every curve that holds
    it, so statistics of different curves are resampled jointly."""
    ids = [np.asarray(i).ravel() for i in image_ids]
    union = np.unique(np.concatenate(ids))
    n = union.size
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n)) + (np.arange(n_boot) * n)[:, None]
    counts = np.bincount(draws.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(np.int32)
    return [counts[:, np.searchsorted(union, i)] for i in ids]


def _as_stat_dict(value: Any) -> dict[str, np.ndarray]:
    if isinstance(value, dict):
        return {k: np.asarray(v, dtype=float) for k, v in value.items()}
    return {"stat": np.asarray(value, dtype=float)}


def _eval_stat(stat: Callable[[Any, np.ndarray], Any], curve: Any, weights: np.ndarray,
               vectorised: bool) -> dict[str, np.ndarray]:
    """``stat`` on every row of ``weights`` [B, n] -> name -> [B]."""
    if vectorised:
        return {k: np.broadcast_to(v, (len(weights),)).astype(float)
                for k, v in _as_stat_dict(stat(curve, weights)).items()}
    rows = [_as_stat_dict(stat(curve, w)) for w in weights]
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}


def bootstrap_draws(curves: list[Any], stat: Callable[[Any, np.ndarray], Any] | None = None, n_boot: int = 1000,
                    seed: int = 0, vectorised: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Point estimates and bootstrap draws of per-curve statistics, images resampled jointly over curves.

    ``curves``: dicts or objects with ``image_ids`` [n], ``effect`` and ``preservation`` [K, n] and
    ``strengths`` [K].  ``stat(curve, weights)`` returns a float or a dict of floats for one weight vector
    [n]; with ``vectorised=True`` it is called once with weights [n_boot, n] and returns arrays [n_boot].
    The default (:func:`summary_stat`) is vectorised.  Returns ``(points, draws)``: per statistic name,
    unweighted point estimates [n_curves] and resampled values [n_curves, n_boot] (``inf`` kept as such).
    Put every curve that will be compared (e.g. a method and its oracle) in the same call so they share
    weights."""
    if stat is None:
        stat, vectorised = summary_stat, True
    weights = shared_image_weights([_field(c, "image_ids") for c in curves], n_boot, seed)
    points: dict[str, list[float]] = {}
    draws: dict[str, list[np.ndarray]] = {}
    for curve, w in zip(curves, weights):
        ones = np.ones((1, w.shape[1]))
        for k, v in _eval_stat(stat, curve, ones, vectorised).items():
            points.setdefault(k, []).append(float(v[0]))
        for k, v in _eval_stat(stat, curve, w, vectorised).items():
            draws.setdefault(k, []).append(v)
    return ({k: np.array(v) for k, v in points.items()}, {k: np.stack(v) for k, v in draws.items()})


def percentile_interval(point: float, draws: np.ndarray, level: float = 0.95) -> dict[str, float]:
    """Percentile interval of bootstrap ``draws`` that may hold ``inf`` (order statistics, no interpolation,
    so an end can be ``inf``).  NaN draws (e.g. a resample that left a curve no image) are dropped.

    Returns point, low, high, p_not_reached (fraction of valid draws that are +inf) and n_valid."""
    x = np.asarray(draws, dtype=float)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return {"point": float(point), "low": math.nan, "high": math.nan, "p_not_reached": math.nan, "n_valid": 0}
    alpha = (1 - level) / 2
    low, high = np.quantile(x, [alpha, 1 - alpha], method="inverted_cdf")
    return {"point": float(point), "low": float(low), "high": float(high),
            "p_not_reached": float(np.mean(np.isposinf(x))), "n_valid": int(x.size)}


def bootstrap_by_image(curves: list[Any], stat: Callable[[Any, np.ndarray], Any] | None = None,
                       n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                       vectorised: bool = False) -> list[dict[str, dict[str, float]]]:
    """Per curve and statistic: :func:`percentile_interval` of :func:`bootstrap_draws` (same arguments).

    Returns one dict per curve (in order): statistic name -> {point, low, high, p_not_reached, n_valid};
    the default statistics are :data:`SUMMARY_KEYS`, a plain-float ``stat`` is named ``"stat"``."""
    points, draws = bootstrap_draws(curves, stat, n_boot, seed, vectorised)
    return [{k: percentile_interval(points[k][i], draws[k][i], level) for k in points} for i in range(len(curves))]


# ---- mean over concepts -----------------------------------------------------------------------------------


def capped_log_ratio(r: np.ndarray | float, r_ref: np.ndarray | float, r_cap: float) -> np.ndarray:
    """``log(min(r, r_cap) / min(r_ref, r_cap))``, elementwise: a strength ratio to a reference (e.g. the
    oracle's r50) with "not reached" (``inf``) counted as ``r_cap``; both not reached gives 0.
    Choose ``r_cap`` above the grid (e.g. twice the strongest strength) and report it."""
    if not r_cap > 0 or not math.isfinite(r_cap):
        raise ValueError(f"r_cap must be finite and positive, got {r_cap}")
    a = np.minimum(np.asarray(r, dtype=float), r_cap)
    b = np.minimum(np.asarray(r_ref, dtype=float), r_cap)
    return np.log(a) - np.log(b)


def bootstrap_mean_over_concepts(points: np.ndarray, draws: np.ndarray, level: float = 0.95, seed: int = 0,
                                 resample_concepts: bool = True, cap: float | None = None) -> dict[str, Any]:
    """Mean over concepts of a per-concept statistic with a two-level bootstrap interval.

    ``points`` [C]: the statistic per concept on all images; ``draws`` [C, B]: the same statistic in image
    resample ``b``, with the SAME image weights for every concept (columns of one :func:`bootstrap_draws`
    call, possibly combined, e.g. ``capped_log_ratio(draws_method, draws_oracle, r_cap)``).

    Design: replicate ``b`` draws C concepts with replacement (independently per replicate) and averages
    their values in image resample ``b``; the interval is the percentile interval of those means.  It covers
    both the choice of concepts and the image noise; since the between-concept spread already contains some
    image noise it is slightly conservative.  ``resample_concepts=False`` keeps the concept set fixed (an
    interval for these concepts only).  Concepts whose point value is NaN are dropped (``n_dropped``); NaN
    draws are left out of that replicate's mean.  ``inf`` values are clipped to ``±cap`` when ``cap`` is
    given and are an error otherwise (map them first, e.g. with :func:`capped_log_ratio`)."""
    p, d = np.asarray(points, dtype=float), np.asarray(draws, dtype=float)
    if p.ndim != 1 or d.ndim != 2 or d.shape[0] != p.size:
        raise ValueError(f"points must be [C] and draws [C, B], got {p.shape} and {d.shape}")
    if cap is not None:
        p, d = np.clip(p, -cap, cap), np.clip(d, -cap, cap)
    elif np.isinf(p).any() or np.isinf(d).any():
        raise ValueError("infinite values: pass cap= or map them first (e.g. capped_log_ratio)")
    keep = ~np.isnan(p)
    p, d = p[keep], d[keep]
    c, b = d.shape
    if c == 0:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "n_concepts": 0,
                "n_dropped": int((~keep).sum()), "cap": cap}
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, c, size=(b, c)) if resample_concepts else np.tile(np.arange(c), (b, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a replicate whose draws are all NaN
        means = np.nanmean(d[pick, np.arange(b)[:, None]], axis=1)
    alpha = (1 - level) / 2
    means = means[~np.isnan(means)]
    low, high = np.quantile(means, [alpha, 1 - alpha]) if means.size else (math.nan, math.nan)
    return {"mean": float(p.mean()), "low": float(low), "high": float(high), "n_concepts": int(c),
            "n_dropped": int((~keep).sum()), "cap": cap}


# ---- interaction over concepts, multiplicity -------------------------------------------------------------


def _double_centre(y: np.ndarray) -> np.ndarray:
    """Interaction contrasts of each [M, L] table in ``y`` [C, M, L]: remove row, column and grand means."""
    return y - y.mean(2, keepdims=True) - y.mean(1, keepdims=True) + y.mean((1, 2), keepdims=True)


def _sign_matrix(n_concepts: int, n_perm: int, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """All 2^C sign vectors when that is at most ``n_perm`` (exact), otherwise ``n_perm`` random ones."""
    if 2 ** n_concepts <= n_perm:
        codes = np.arange(2 ** n_concepts)[:, None] >> np.arange(n_concepts)[None, :]
        return 1.0 - 2.0 * (codes & 1), True
    return rng.choice([-1.0, 1.0], size=(n_perm, n_concepts)), False


def _signflip_f(contrasts: np.ndarray, signs: np.ndarray) -> np.ndarray:
    """F-like ratio for each sign vector: ``contrasts`` [C, cells], ``signs`` [P, C] -> [P]."""
    c = contrasts.shape[0]
    mean = signs @ contrasts / c  # [P, cells]
    between = c * (mean ** 2).sum(1)
    within = ((contrasts ** 2).sum() - between) / (c - 1)  # sum_c ||s_c d_c - mean||^2 / (C - 1)
    return between / np.maximum(within, 1e-300)


def interaction_signflip(y: np.ndarray, n_perm: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Model × layer interaction of a per-concept statistic, concepts as replicates; sign-flip p-value.

    ``y`` [C, M, L] (e.g. log r50 per concept, model, layer).  Each concept's M × L table is double-centred
    (its own model and layer main effects removed), giving contrasts d_c; under no interaction E[d_c] = 0.
    Statistic: ``F = C·||mean_c d_c||² / (Σ_c ||d_c − mean||² / (C − 1))``, the squared mean contrast over its
    between-concept spread; with i.i.d. normal cell noise it is exactly F-distributed with
    df = ((M−1)(L−1), (C−1)(M−1)(L−1)), and ``p_value_f`` is that parametric p-value.  ``p_value``: flip the sign of each concept's whole contrast table
    (valid when concepts are independent with symmetric contrasts; no normality), all 2^C flips when
    2^C <= n_perm, else ``n_perm`` random flips plus the observed.  With C concepts the smallest exact p is
    2/2^C (a flip of every sign gives the same F).  Concepts with any NaN are dropped (``n_dropped``).
    Returns statistic, p_value, p_value_f, df, n_concepts, n_dropped, exact, n_flips, mean_contrast [M, L]."""
    from scipy import stats as sps

    arr = np.asarray(y, dtype=float)
    if arr.ndim != 3 or arr.shape[1] < 2 or arr.shape[2] < 2:
        raise ValueError(f"y must be [concepts, models >= 2, layers >= 2], got {arr.shape}")
    keep = ~np.isnan(arr).any((1, 2))
    arr = arr[keep]
    c, m, n_l = arr.shape
    df1 = (m - 1) * (n_l - 1)
    out: dict[str, Any] = {"n_concepts": int(c), "n_dropped": int((~keep).sum()), "df": (df1, (c - 1) * df1)}
    if c < 2:
        return {**out, "statistic": math.nan, "p_value": math.nan, "p_value_f": math.nan, "exact": False,
                "n_flips": 0, "mean_contrast": np.full((m, n_l), np.nan)}
    d = _double_centre(arr).reshape(c, -1)
    observed = float(_signflip_f(d, np.ones((1, c)))[0])
    signs, exact = _sign_matrix(c, n_perm, np.random.default_rng(seed))
    flipped = _signflip_f(d, signs)
    exceed = int((flipped >= observed * (1 - 1e-9)).sum())
    p = exceed / len(signs) if exact else (exceed + 1) / (len(signs) + 1)
    p_f = float(sps.f.sf(observed, df1, (c - 1) * df1))
    return {**out, "statistic": observed, "p_value": float(p), "p_value_f": p_f, "exact": exact,
            "n_flips": len(signs), "mean_contrast": d.mean(0).reshape(m, n_l)}


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm–Bonferroni adjusted p-values: the i-th smallest of m is ``max_{j <= i} (m − j + 1) p_(j)``, capped
    at 1 (monotone in the raw p-values).  NaN p-values stay NaN and do not count towards m."""
    items = sorted(((p, k) for k, p in pvalues.items() if not math.isnan(p)), key=lambda t: t[0])
    m = len(items)
    out = {k: math.nan for k, p in pvalues.items() if math.isnan(p)}
    running = 0.0
    for i, (p, k) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return {k: out[k] for k in pvalues}
