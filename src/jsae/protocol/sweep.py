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

Beside the mention rate each steering cell records the reference's text-quality metrics of its steered
captions and of the same images' unsteered captions: distinct-3 and zlib compression ratio
(:func:`jsae.data.judges.text_quality`).

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

from jsae.data.judges import Judge, WorldJudge, text_quality
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
    # steering cells: the reference's text quality of the steered captions (after) and unsteered ones (before)
    distinct_3: float | None = None
    zlib_ratio: float | None = None
    distinct_3_before: float | None = None
    zlib_ratio_before: float | None = None


CaptionFn = Callable[[list[Any], Any], list[str]]  # (images, interventions) -> captions (jsae.interventions.Captioner)


def _grow(score_fn: Callable[[int, int], np.ndarray], n_start: int, n_max: int, halfwidth: float) -> np.ndarray:
    """Score images in chunks until the 95% interval of the mean is ±halfwidth or the images run out."""
    scores = score_fn(0, min(n_start, n_max))
    while len(scores) < n_max and bootstrap_ci(scores).halfwidth > halfwidth:
        extra = score_fn(len(scores), min(len(scores) + n_start, n_max))
        scores = np.concatenate([scores, extra])
    return scores


STEER_AT = ("image", "image+generated")


@dataclass
class SweepConfig:
    layers: list[int]
    concepts: list[str]
    methods: tuple[str, ...] = METHODS
    n_start: int = 200
    n_max: int = 600
    halfwidth: float = 0.05
    alpha_ratios: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    alphas: tuple[float, ...] | None = None  # absolute strengths (the reference: 0.2, 0.4, ..., 3.0) instead of ratios
    n_calibration: int = 32
    min_fluency: float = 0.9
    steer_at: str = "image"  # "image": the image tokens at prefill; "image+generated": and every generated token

    def __post_init__(self) -> None:
        if self.steer_at not in STEER_AT:
            raise ValueError(f"unknown steer_at {self.steer_at!r}; choose one of {list(STEER_AT)}")
        if self.alphas is not None and (not self.alphas or any(not a > 0 for a in self.alphas)):
            raise ValueError(f"alphas must be positive strengths, e.g. (0.2, 0.4, ..., 3.0), got {self.alphas}")


@dataclass
class CellPlan:
    """One (concept, layer, method) of the sweep: its labelled features, steering direction and strength."""

    concept: str
    layer: int
    method: str
    features: list[int]
    direction: Tensor
    alpha: float = 0.0


@dataclass
class SweepImages:
    """The sweep's images split per concept (calibration, without, with) and their unsteered captions."""

    caption: CaptionFn
    images: list[Any]
    items: list[dict]
    judge: Any
    cfg: SweepConfig
    _base: dict[str, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        y = self.judge.presence(self.items)
        self.present = y[:, [self.judge.concepts.index(c) for c in self.cfg.concepts]].bool()

    def split(self, concept: str) -> tuple[list[int], list[int], list[int]]:
        """(calibration images, other images without ``concept``, images with it)."""
        ci = self.cfg.concepts.index(concept)
        without = [i for i in range(len(self.images)) if not self.present[i, ci]]
        with_c = [i for i in range(len(self.images)) if self.present[i, ci]]
        return without[: self.cfg.n_calibration], without[self.cfg.n_calibration:], with_c

    def base(self, idx: list[int], key: str) -> list[str]:
        """Unsteered captions of images ``idx`` (cached under ``key``)."""
        if key not in self._base:
            self._base[key] = self.caption([self.images[i] for i in idx], [])
        return self._base[key]

    def captions(self, idx: list[int], interventions: list[Any]) -> list[str]:
        return self.caption([self.images[i] for i in idx], interventions)


def _steer(cfg: SweepConfig, layer: int, direction: Tensor, alpha: float) -> list[Any]:
    """Steering at the image tokens (prefill) and, with ``steer_at="image+generated"``, at every generated token."""
    from jsae.interventions import Steer

    ivs = [Steer(layer=layer, positions="image", timing="prefill", direction=direction, strength=alpha)]
    if cfg.steer_at == "image+generated":
        ivs.append(Steer(layer=layer, positions="generated", timing="every_step", direction=direction, strength=alpha))
    return ivs


def _ablate(cfg: SweepConfig, layer: int, m: Method, feats: list[int]) -> Any:
    from jsae.interventions import Ablate

    return Ablate(layer=layer, positions="image", timing="prefill", sae=m.sae, features=feats,
                  sae_modality="vision" if m.joint else None)


def strengths(cfg: SweepConfig, state_norm: float, direction: Tensor) -> list[float]:
    """The strengths tried, weakest first: ``cfg.alphas`` as given, or ``r · state_norm / ‖d‖`` for each ratio ``r``
    (``state_norm``: the mean norm of the layer's pooled image vectors)."""
    if cfg.alphas is not None:
        return list(cfg.alphas)
    return [r * state_norm / max(float(direction.norm()), 1e-8) for r in cfg.alpha_ratios]


def plan_cells(methods_by_layer: dict[int, dict[str, Method]], labels_by_layer: dict[int, dict[str, FeatureLabels]],
               cfg: SweepConfig) -> list[CellPlan]:
    """Every (concept, layer, method) with a feature labelled with the concept (shared features for a JSAE;
    vision-only or shared for the vision-only baseline); the others are recorded as missing."""
    plans = []
    for concept in cfg.concepts:
        for layer in cfg.layers:
            for method in cfg.methods:
                m, labels = methods_by_layer[layer][method], labels_by_layer[layer][method]
                kinds = ("shared",) if m.joint else ("vision-only", "shared")
                try:
                    feats = labels.features_for(concept, kinds=kinds)
                except ValueError:
                    continue
                plans.append(CellPlan(concept, layer, method, feats, m.steer_direction(feats)))
    return plans


def choose_strengths(plans: list[CellPlan], sweep: SweepImages, state_norms: dict[int, float]) -> None:
    """The fluency guard, as in the reference code: per plan the largest strength of :func:`strengths` whose
    captions of the concept's calibration images are still fluent under the judge; sets ``plan.alpha`` (0 when
    none is)."""
    cfg, judge = sweep.cfg, sweep.judge
    for concept in cfg.concepts:
        calib, _, _ = sweep.split(concept)
        if judge.needs_calibration and calib:
            judge.calibrate(sweep.base(calib, f"calibration-{concept}"))
        for plan in (p for p in plans if p.concept == concept):
            plan.alpha = 0.0
            for a in strengths(cfg, state_norms[plan.layer], plan.direction):
                caps = sweep.captions(calib, _steer(cfg, plan.layer, plan.direction, a))
                if judge.fluency(caps) < cfg.min_fluency:
                    break
                plan.alpha = a


def measure_cells(plans: list[CellPlan], sweep: SweepImages, methods_by_layer: dict[int, dict[str, Method]],
                  progress: bool = True) -> list[Cell]:
    """Steering cells (images without the concept, at the chosen strength; score = mention minus unsteered
    mention) and suppression cells (images with it, its features ablated; score = unsteered mention minus
    mention; preservation of the other objects), each grown to a ±halfwidth interval."""
    cfg, judge = sweep.cfg, sweep.judge
    mentions = judge.mentions
    cells: list[Cell] = []
    bar = tqdm(total=len(cfg.layers) * len(cfg.methods) * len(cfg.concepts), desc="steering/suppression sweep",
               disable=not progress)
    for concept in cfg.concepts:
        _, without, with_c = sweep.split(concept)
        base_without = sweep.base(without[: cfg.n_max], f"without-{concept}")
        base_with = sweep.base(with_c[: cfg.n_max], f"with-{concept}")
        by_key = {(p.layer, p.method): p for p in plans if p.concept == concept}
        for layer in cfg.layers:
            for method in cfg.methods:
                bar.update(1)
                plan = by_key.get((layer, method))
                if plan is None:
                    continue  # no feature of this method is labelled c at this layer: recorded as missing
                m, feats = methods_by_layer[layer][method], plan.features
                if plan.alpha > 0 and without:
                    iv = _steer(cfg, layer, plan.direction, plan.alpha)
                    steered: list[str] = []

                    def steer_scores(lo: int, hi: int) -> np.ndarray:
                        caps = sweep.captions(without[lo:hi], iv)
                        steered.extend(caps)
                        return np.array([float(mentions(c, concept)) - float(mentions(b, concept))
                                         for c, b in zip(caps, base_without[lo:hi])])

                    s = _grow(steer_scores, cfg.n_start, min(cfg.n_max, len(without)), cfg.halfwidth)
                    before = np.mean([mentions(b, concept) for b in base_without[: len(s)]])
                    ci = bootstrap_ci(s)
                    after_q, before_q = text_quality(steered), text_quality(base_without[: len(s)])
                    cells.append(Cell("steering", method, layer, concept, len(s), ci.mean, ci.low, ci.high,
                                      cohens_h(before + ci.mean, before), plan.alpha, float(before),
                                      float(before + ci.mean), None, feats, s.tolist(), after_q["distinct_3"],
                                      after_q["zlib_ratio"], before_q["distinct_3"], before_q["zlib_ratio"]))
                if not with_c:
                    continue  # no sweep image contains c: nothing to suppress
                ab = [_ablate(cfg, layer, m, feats)]
                others_kept: list[float] = []

                def supp_scores(lo: int, hi: int) -> np.ndarray:
                    idx = with_c[lo:hi]
                    caps = sweep.captions(idx, ab)
                    out = []
                    for cap, base, i in zip(caps, base_with[lo:hi], idx):
                        out.append(float(mentions(base, concept)) - float(mentions(cap, concept)))
                        said = [o for o in judge.others(sweep.items[i], concept) if mentions(base, o)]
                        if said:
                            others_kept.append(np.mean([mentions(cap, o) for o in said]))
                    return np.array(out)

                s = _grow(supp_scores, cfg.n_start, min(cfg.n_max, len(with_c)), cfg.halfwidth)
                before = np.mean([mentions(b, concept) for b in base_with[: len(s)]])
                ci = bootstrap_ci(s)
                cells.append(Cell("suppression", method, layer, concept, len(s), ci.mean, ci.low, ci.high,
                                  cohens_h(before, before - ci.mean), None, float(before), float(before - ci.mean),
                                  float(np.mean(others_kept)) if others_kept else None, feats, s.tolist()))
    bar.close()
    return cells


def run_sweep(caption: CaptionFn, methods_by_layer: dict[int, dict[str, Method]],
              labels_by_layer: dict[int, dict[str, FeatureLabels]], state_norms: dict[int, float], images: list[Any],
              items: list[dict], cfg: SweepConfig, progress: bool = True, judge: Judge | None = None) -> list[Cell]:
    """Steering and suppression cells for every (method, layer, concept): :func:`plan_cells`, then
    :func:`choose_strengths`, then :func:`measure_cells`.

    ``items[i]`` is the record of ``images[i]`` (world: with ``objects``; real data: with ``caption``);
    ``judge`` (default :class:`WorldJudge`) reads presence, mentions and fluency."""
    judge = judge or WorldJudge()
    unknown = [c for c in cfg.concepts if c not in judge.concepts]
    if unknown:
        raise ValueError(f"unknown concept(s) {unknown}; this judge's concepts are {judge.concepts[:50]}")
    sweep = SweepImages(caption, images, items, judge, cfg)
    plans = plan_cells(methods_by_layer, labels_by_layer, cfg)
    choose_strengths(plans, sweep, state_norms)
    return measure_cells(plans, sweep, methods_by_layer, progress)


__all__ = ["STEER_AT", "Cell", "CellPlan", "SweepConfig", "SweepImages", "choose_strengths", "measure_cells", "plan_cells",
           "run_sweep", "strengths"]
