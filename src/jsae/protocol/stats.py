"""Statistics for the steering / suppression protocol.

- :func:`bootstrap_ci`: percentile bootstrap interval of a mean (per-image scores, e.g. steered hit minus
  unsteered hit, so the interval is for a paired rate difference).
- :func:`cohens_h`: effect size of a change between two proportions.
- :func:`interaction_test`: is the layer profile of an effect different between models?  A two-way
  model × layer F statistic on per-image scores, its p-value by Freedman–Lane permutation of the
  residuals of the additive model (no distributional assumption on 0/±1 scores).
- :func:`images_for_halfwidth`: how many images a cell needs for a ±h 95% interval at worst-case variance.
- :func:`summarise` and :func:`interaction`: the protocol's statistics stage over its cells.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
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


# ---- the protocol's statistics stage ----------------------------------------------------------------


def summarise(cells: list[Any]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Per measure, method and layer: the mean over concepts with a bootstrap interval over images."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    groups: dict[tuple[str, str, int], list[Any]] = {}
    for c in cells:
        groups.setdefault((c.measure, c.method, c.layer), []).append(c)
    for (measure, method, layer), cs in groups.items():
        mean = float(np.mean([c.mean for c in cs]))
        half = math.sqrt(sum(((c.high - c.low) / 2) ** 2 for c in cs)) / len(cs)
        out.setdefault(measure, {}).setdefault(method, {})[str(layer)] = {
            "mean": mean, "low": mean - half, "high": mean + half, "n_concepts": len(cs),
            "cohens_h": float(np.mean([c.cohens_h for c in cs])), "n_images": int(sum(c.n for c in cs))}
    return out


def interaction(cells_by_model: dict[str, list[Any]], measure: str, method: str = "jsae") -> dict[str, Any] | None:
    """Model × layer interaction test on per-image scores of ``method`` (layers as relative depth bins)."""
    ys: list[float] = []
    ms: list[str] = []
    ls: list[int] = []
    for model, cells in cells_by_model.items():
        layers = sorted({c.layer for c in cells})
        for c in cells:
            if c.measure == measure and c.method == method:
                ys += c.scores
                ms += [model] * len(c.scores)
                ls += [layers.index(c.layer)] * len(c.scores)  # i-th swept layer of each model
    if len(set(ms)) < 2 or len(set(ls)) < 2:
        return None
    return asdict(interaction_test(np.array(ys), np.array(ms), np.array(ls), n_perm=1000))
