"""The protocol's steering and suppression cells, for every method of :mod:`jsae.protocol.methods`.

**Steering** (the paper's protocol): for concept ``c`` and images without ``c``, add
``α · Σ_j W_dec[j] / ‖W_dec[j]‖`` (the text decoder's unit directions of the features labelled ``c``;
the vision decoder for the vision-only baseline) at the image-token positions of layer ``L``, at the
prefill step; score = rate of greedy captions that mention ``c`` minus the unsteered rate, per image.
α is chosen per (layer, method, concept) by a fluency guard as in the reference code: ``α = r · m_L``
with ``m_L`` the mean norm of image-token states at layer ``L`` and ``r`` swept upwards, stopping at the
first ``r`` whose captions on calibration images are no longer fluent (≥ 90%) under the judge.

**Suppression**: for images that contain ``c``, clamp the features labelled ``c`` to zero at the image
positions through the SAE with its error term; score = drop of the mention rate of ``c``;
preservation = fraction of the *other* objects mentioned unsteered that are still mentioned.

What counts as a concept, a mention and a fluent caption is a :class:`Judge`: :class:`WorldJudge` on the
embedded world (exact ground truth, the grammar as fluency guard), :class:`CaptionJudge` on real data
(caption words as concepts, word matches as mentions, and as fluency guard the perplexity of the generated
caption under the model *without* the image plus a repetition check).

Each cell's per-image scores get a 95% bootstrap interval; a cell is grown (up to the images available)
until its interval is ±0.05 or tighter.  Effect sizes are Cohen's h.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from torch import Tensor
from tqdm.auto import tqdm

from jsae.data.judges import Judge, WorldJudge
from jsae.labels import FeatureLabels
from jsae.protocol.methods import METHODS, Method
from jsae.protocol.stats import bootstrap_ci, cohens_h


@dataclass
class Cell:
    measure: str
    method: str
    layer: int
    concept: str
    n: int
    mean: float
    low: float
    high: float
    cohens_h: float
    alpha: float | None = None
    rate_before: float = 0.0
    rate_after: float = 0.0
    preservation: float | None = None
    features: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # per image, for the interaction test


CaptionFn = Callable[[list[Any], list[Any]], list[str]]  # (images, interventions) -> captions


def _grow(score_fn: Callable[[int, int], np.ndarray], n_start: int, n_max: int, halfwidth: float) -> np.ndarray:
    """Score images in chunks until the 95% interval of the mean is ±halfwidth or the images run out."""
    scores = score_fn(0, min(n_start, n_max))
    while len(scores) < n_max and bootstrap_ci(scores).halfwidth > halfwidth:
        extra = score_fn(len(scores), min(len(scores) + n_start, n_max))
        scores = np.concatenate([scores, extra])
    return scores


@dataclass
class SweepConfig:
    layers: list[int]
    concepts: list[str]
    methods: tuple[str, ...] = METHODS
    n_start: int = 200
    n_max: int = 600
    halfwidth: float = 0.05
    alpha_ratios: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    n_calibration: int = 32
    min_fluency: float = 0.9


def run_sweep(
    caption: CaptionFn,
    steer_factory: Callable[[int, Tensor, float], Any],
    ablate_factory: Callable[[int, Any, list[int], str | None], Any],
    methods_by_layer: dict[int, dict[str, Method]],
    labels_by_layer: dict[int, dict[str, FeatureLabels]],
    state_norms: dict[int, float],
    images: list[Any],
    items: list[dict],
    cfg: SweepConfig,
    progress: bool = True,
    judge: Judge | None = None,
) -> list[Cell]:
    """Steering and suppression cells for every (method, layer, concept).

    ``items[i]`` is the record of ``images[i]`` (world: with ``objects``; real data: with ``caption``);
    ``judge`` (default :class:`WorldJudge`) reads presence, mentions and fluency."""
    judge = judge or WorldJudge()
    unknown = [c for c in cfg.concepts if c not in judge.concepts]
    if unknown:
        raise ValueError(f"unknown concept(s) {unknown}; this judge's concepts are {judge.concepts[:50]}")
    cells: list[Cell] = []
    y = judge.presence(items)
    present = y[:, [judge.concepts.index(c) for c in cfg.concepts]].bool()
    mentions = judge.mentions
    base_cache: dict[str, list[str]] = {}

    def base_captions(idx: list[int], key: str) -> list[str]:
        if key not in base_cache:
            base_cache[key] = caption([images[i] for i in idx], [])
        return base_cache[key]

    total = len(cfg.layers) * len(cfg.methods) * len(cfg.concepts)
    bar = tqdm(total=total, desc="steering/suppression sweep", disable=not progress)
    for ci, concept in enumerate(cfg.concepts):
        without = [i for i in range(len(images)) if not present[i, ci]]
        with_c = [i for i in range(len(images)) if present[i, ci]]
        calib, without = without[: cfg.n_calibration], without[cfg.n_calibration:]
        if judge.needs_calibration and calib:
            judge.calibrate(base_captions(calib, f"calibration-{concept}"))
        base_without = base_captions(without[: cfg.n_max], f"without-{concept}")
        base_with = base_captions(with_c[: cfg.n_max], f"with-{concept}")
        for layer in cfg.layers:
            for method in cfg.methods:
                bar.update(1)
                m, labels = methods_by_layer[layer][method], labels_by_layer[layer][method]
                kinds = ("shared",) if m.joint else ("vision-only", "shared")
                try:
                    feats = labels.features_for(concept, kinds=kinds)
                except ValueError:
                    continue  # no feature of this method is labelled c at this layer: recorded as missing
                direction = m.steer_direction(feats)
                # fluency guard: the largest alpha whose calibration captions still parse
                alpha = 0.0
                for r in cfg.alpha_ratios:
                    a = r * state_norms[layer] / max(float(direction.norm()), 1e-8)
                    caps = caption([images[i] for i in calib], [steer_factory(layer, direction, a)])
                    if judge.fluency(caps) < cfg.min_fluency:
                        break
                    alpha = a
                if alpha > 0 and without:
                    iv = [steer_factory(layer, direction, alpha)]

                    def steer_scores(lo: int, hi: int) -> np.ndarray:
                        caps = caption([images[i] for i in without[lo:hi]], iv)
                        return np.array([float(mentions(c, concept)) - float(mentions(b, concept))
                                         for c, b in zip(caps, base_without[lo:hi])])

                    s = _grow(steer_scores, cfg.n_start, min(cfg.n_max, len(without)), cfg.halfwidth)
                    before = np.mean([mentions(b, concept) for b in base_without[: len(s)]])
                    iv_ci = bootstrap_ci(s)
                    cells.append(Cell("steering", method, layer, concept, len(s), iv_ci.mean, iv_ci.low, iv_ci.high,
                                      cohens_h(before + iv_ci.mean, before), alpha, float(before),
                                      float(before + iv_ci.mean), None, feats, s.tolist()))
                if not with_c:
                    continue  # no sweep image contains c: nothing to suppress
                # suppression
                ab = [ablate_factory(layer, m.sae, feats, None if not m.joint else "vision")]
                others_kept: list[float] = []

                def supp_scores(lo: int, hi: int) -> np.ndarray:
                    idx = with_c[lo:hi]
                    caps = caption([images[i] for i in idx], ab)
                    out = []
                    for cap, base, i in zip(caps, base_with[lo:hi], idx):
                        out.append(float(mentions(base, concept)) - float(mentions(cap, concept)))
                        said = [o for o in judge.others(items[i], concept) if mentions(base, o)]
                        if said:
                            others_kept.append(np.mean([mentions(cap, o) for o in said]))
                    return np.array(out)

                s = _grow(supp_scores, cfg.n_start, min(cfg.n_max, len(with_c)), cfg.halfwidth)
                before = np.mean([mentions(b, concept) for b in base_with[: len(s)]])
                iv_ci = bootstrap_ci(s)
                cells.append(Cell("suppression", method, layer, concept, len(s), iv_ci.mean, iv_ci.low, iv_ci.high,
                                  cohens_h(before, before - iv_ci.mean), None, float(before), float(before - iv_ci.mean),
                                  float(np.mean(others_kept)) if others_kept else None, feats, s.tolist()))
    bar.close()
    return cells


__all__ = ["Cell", "SweepConfig", "run_sweep"]
