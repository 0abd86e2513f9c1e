"""Dose–response steering and suppression for every method of :mod:`jsae.protocol.methods`, against an
oracle direction, on the same images at every strength.

**Directions** (per layer ``L`` and concept ``c``, from the held-out labelling pairs):

- ``oracle``: the difference of mean pooled image-token states with and without ``c`` (what the model
  itself separates ``c`` by; pooled means weigh every image equally);
- each method × decoder: the ``top_k`` latents whose codes *of that branch* correlate most with ``c``
  (each branch labelled by its own modality; ranked, never cut at a threshold, so every method has a
  direction; their correlations are recorded), and the sum of their unit decoder rows of that branch
  (the paper's ``Σ_j W_dec[j] / ‖W_dec[j]‖``).  Joint methods steer with their ``text`` decoder (the
  paper's choice) and their ``vision`` decoder; the vision-only baseline with its decoder.  ``separate``
  is ``jsae-none`` with its text latents permuted, so with own-modality labels its directions equal
  ``jsae-none``'s: its curves are skipped with that reason unless ``decoders`` has ``"cross"`` (vision-
  labelled latents steered with their *text* decoder rows, where the pairing matters).

**Strengths**: one fixed grid per layer shared by all methods: ``r · m_L`` along the *unit* direction,
``m_L`` the mean norm of the layer's per-token image states (``cfg.ratios``, finer between 0.25 and 4),
or the reference's absolute ``α`` along the un-normalised direction (``cfg.alphas``).  Nothing is chosen
with the evaluation metric.

**Steering** (images without ``c``): per image and strength, the effect (mention of ``c`` in the steered
caption minus in the unsteered one), preservation (share of the other objects named unsteered that are
still named), strict fluency (the caption parses completely under the grammar) and hallucination (an
object type named that is neither in the image nor ``c``).  **Suppression** (images with ``c``): clamping
the latents to 0 through the SAE with its error term (the oracle: projecting its direction out), and
negative steering over ``cfg.suppress_ratios``; effect = mention before minus after.

Positions (``cfg.positions``) are reported separately: ``image`` (the image tokens at prefill),
``image_but_last``, ``last`` (the last prompt token), ``generated`` (every generated token) and
``image+generated`` (the reference).  Every (direction, strength, image) of a layer runs at every position
set in the same large batches through per-prompt :class:`~jsae.interventions.Steer` (:func:`pooled_steer`), so
the rows steered alike at prefill share it.

Curves that cannot run say why (:attr:`Curve.reason`).  Statistics (r50, effect at a small strength and
at matched preservation, image bootstrap) are in :mod:`jsae.protocol.stats`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from jsae.correlation import correlation_matrix
from jsae.parallel import forked_map, workers
from jsae.protocol.methods import METHODS, Method
from jsae.saes.metrics import summed_unit_rows

#: strengths as multiples of the mean per-token image-state norm (finer between 0.25 and 4)
RATIOS = (0.25, 0.5, 0.7, 1.0, 1.4, 2.0, 4.0, 8.0)
SUPPRESS_RATIOS = (0.25, 0.5, 1.0, 2.0, 4.0)
POSITION_SETS: dict[str, tuple[tuple[str, str], ...]] = {
    "image": (("image", "prefill"),),
    "image_but_last": (("image_but_last", "prefill"),),
    "last": (("last", "prefill"),),
    "generated": (("generated", "every_step"),),
    "image+generated": (("image", "prefill"), ("generated", "every_step")),
}
STEER_AT = tuple(POSITION_SETS)
DECODERS = ("text", "vision", "cross")

CaptionFn = Callable[..., list[str]]  # jsae.interventions.Captioner: (images, interventions | (start, stop) -> ...)


@dataclass
class SweepConfig:
    layers: list[int]
    concepts: list[str]
    methods: tuple[str, ...] = METHODS
    decoders: tuple[str, ...] = ("text", "vision")
    ratios: tuple[float, ...] = RATIOS
    alphas: tuple[float, ...] | None = None  # absolute strengths (the reference: 0.2, ..., 3.0) instead of ratios
    suppress_ratios: tuple[float, ...] = SUPPRESS_RATIOS
    n_images: int = 5  # images per concept (without it for steering, with it for suppression), same at every strength
    top_k: int = 3
    positions: tuple[str, ...] = ("image",)
    oracle: bool = True
    #: also steer with the *text oracle*: mean caption-token pool of pairs naming the concept minus the rest
    #: (the ideal text-derived direction, what a text decoder at its best would give)
    text_oracle: bool = True

    def __post_init__(self) -> None:
        bad = [p for p in self.positions if p not in POSITION_SETS]
        if bad:
            raise ValueError(f"unknown steering positions {bad}; choose from {list(POSITION_SETS)}")
        bad = [d for d in self.decoders if d not in DECODERS]
        if bad:
            raise ValueError(f"unknown decoders {bad}; choose from {list(DECODERS)}")
        if self.alphas is not None and (not self.alphas or any(not a > 0 for a in self.alphas)):
            raise ValueError(f"alphas must be positive strengths, e.g. (0.2, 0.4, ..., 3.0), got {self.alphas}")
        if any(not r > 0 for r in self.ratios) or list(self.ratios) != sorted(self.ratios):
            raise ValueError(f"ratios must be positive and increasing, got {self.ratios}")
        if self.n_images < 1 or self.top_k < 1:
            raise ValueError("n_images and top_k must be >= 1")


@dataclass
class Direction:
    """One steering direction: ``method`` (``"oracle"``, ``"text-oracle"`` or a method name) × ``decoder`` at ``layer`` for
    ``concept``; ``vector`` is unit-norm (``raw`` keeps Σ of unit rows for absolute strengths)."""

    method: str
    decoder: str
    layer: int
    concept: str
    vector: Tensor
    raw: Tensor
    features: list[int] = field(default_factory=list)
    feature_corr: list[float] = field(default_factory=list)
    cosine_to_oracle: float | None = None
    sae_branch: str | None = None  # the JSAE branch clamped at image tokens (suppression by clamping)

    @property
    def key(self) -> str:
        return self.method if self.method == "oracle" else f"{self.method}:{self.decoder}"


@dataclass
class Curve:
    """Per-image scores of one direction, measure and position set at a grid of strengths."""

    measure: str  # "steering" | "suppression" (negative steering) | "clamp" (SAE clamp / oracle projection)
    method: str
    decoder: str
    positions: str
    layer: int
    concept: str
    strengths: list[float]  # grid values (ratios, or absolute α with cfg.alphas); [0.0] for a clamp
    alphas: list[float]  # the absolute added norms (‖α d‖)
    image_ids: list[int]
    effect: np.ndarray  # [K, n]
    preservation: np.ndarray  # [K, n] (NaN where the image has no other object named unsteered)
    fluent: np.ndarray  # [K, n] bool
    hallucinated: np.ndarray  # [K, n] bool
    features: list[int] = field(default_factory=list)
    feature_corr: list[float] = field(default_factory=list)
    cosine_to_oracle: float | None = None
    base_rate: float = 0.0  # mention rate of the concept in the unsteered captions of these images
    reason: str | None = None  # why the curve is empty

    @property
    def key(self) -> str:
        return self.method if self.method == "oracle" else f"{self.method}:{self.decoder}"

    def record(self) -> dict[str, Any]:
        """JSON-able: per-strength means and the identity of the curve (per-image scores in ``scores``)."""
        mean = lambda a: [None if np.all(np.isnan(r)) else float(np.nanmean(r)) for r in a.astype(float)]  # noqa: E731
        return {"measure": self.measure, "method": self.method, "decoder": self.decoder, "key": self.key,
                "positions": self.positions, "layer": self.layer, "concept": self.concept, "strengths": self.strengths,
                "alphas": self.alphas, "n_images": len(self.image_ids), "effect": mean(self.effect),
                "preservation": mean(self.preservation), "fluency": mean(self.fluent),
                "hallucination": mean(self.hallucinated), "features": self.features,
                "feature_corr": [round(c, 4) for c in self.feature_corr], "cosine_to_oracle": self.cosine_to_oracle,
                "base_rate": self.base_rate, "reason": self.reason}

    def scores(self) -> dict[str, Any]:
        return {"image_ids": self.image_ids, "effect": self.effect.tolist(),
                "preservation": np.where(np.isnan(self.preservation), None, self.preservation).tolist(),
                "fluent": self.fluent.astype(bool).tolist(), "hallucinated": self.hallucinated.astype(bool).tolist()}

    @classmethod
    def from_metrics(cls, record: dict[str, Any], scores: dict[str, Any]) -> "Curve":
        """The curve a run's ``metrics.json`` holds (its ``curves`` record and ``scores``), to reuse it when the run
        grows; a ``KeyError`` for a run written before the per-image fluency was kept."""
        pres = np.array([[np.nan if x is None else x for x in row] for row in scores["preservation"]], dtype=float)
        k = len(record["strengths"])
        shape = (k, len(scores["image_ids"]))
        return cls(measure=record["measure"], method=record["method"], decoder=record["decoder"],
                   positions=record["positions"], layer=int(record["layer"]), concept=record["concept"],
                   strengths=list(record["strengths"]), alphas=list(record["alphas"]), image_ids=list(scores["image_ids"]),
                   effect=np.array(scores["effect"], dtype=float).reshape(shape), preservation=pres.reshape(shape),
                   fluent=np.array(scores["fluent"], dtype=bool).reshape(shape),
                   hallucinated=np.array(scores["hallucinated"], dtype=bool).reshape(shape),
                   features=list(record["features"]), feature_corr=list(record["feature_corr"]),
                   cosine_to_oracle=record["cosine_to_oracle"], base_rate=record["base_rate"], reason=record["reason"])


# ---- directions --------------------------------------------------------------------------------------


def unit_vector(v: Tensor) -> Tensor:
    return v / v.norm().clamp(min=1e-8)


def oracle_direction(v: Tensor, present: Tensor, strata: Tensor | None = None) -> Tensor:
    """Mean pooled image state of pairs with the concept minus without it (``present``: 0/1 per pair).

    ``strata`` (one integer per pair, e.g. the number of objects in the scene): the difference is taken within
    each stratum and averaged with weights ``n_with · n_without / n`` (strata lacking either side drop out), so a
    variable that goes with the concept — scenes with a cube hold more objects on average — does not enter the
    direction."""
    p = present.bool()
    if p.all() or not p.any():
        raise ValueError("the oracle direction needs labelling pairs with and without the concept")
    if strata is None:
        return v[p].mean(0) - v[~p].mean(0)
    if strata.shape != p.shape:
        raise ValueError(f"strata has shape {tuple(strata.shape)}; pass one value per pair ({tuple(p.shape)})")
    total, weight = torch.zeros_like(v[0]), 0.0
    for k in torch.unique(strata).tolist():
        yes, no = p & (strata == k), ~p & (strata == k)
        n_yes, n_no = int(yes.sum()), int(no.sum())
        if n_yes and n_no:
            w = n_yes * n_no / (n_yes + n_no)
            total += w * (v[yes].mean(0) - v[no].mean(0))
            weight += w
    if not weight:
        raise ValueError("no stratum holds pairs both with and without the concept; pass strata=None or more pairs")
    return total / weight


def top_latents(z: Tensor, present: Tensor, k: int) -> tuple[list[int], list[float]]:
    """The ``k`` latents whose codes correlate most with ``present`` (ranked; dead latents last)."""
    corr = correlation_matrix(z.float(), present.float()[:, None])[:, 0]
    corr = torch.nan_to_num(corr, nan=-1.0)
    order = torch.argsort(corr, descending=True)[:k]
    return order.tolist(), corr[order].tolist()


def method_directions(m: Method, layer: int, concept: str, present: Tensor, v: Tensor, t: Tensor,
                      decoders: tuple[str, ...], k: int) -> list[Direction]:
    """The directions of method ``m``: per decoder, the top-``k`` latents of that branch's codes on the
    labelling pairs (``v``, ``t``), summed unit decoder rows."""
    out = []
    sides = [d for d in decoders if m.joint] if m.joint else ["vision"]
    for side in sides:
        label_side = "vision" if side == "cross" else side
        z = m.codes(v if label_side == "vision" else t, label_side)
        feats, corr = top_latents(z, present, k)
        raw = summed_unit_rows((m.sae.W_dec_of("text" if side == "cross" else side) if m.joint else m.sae.W_dec).float(), feats)
        out.append(Direction(m.name, side, layer, concept, unit_vector(raw), raw, feats, corr,
                             sae_branch=label_side if m.joint else None))
    return out


def build_directions(methods: dict[str, Method], layer: int, concepts: list[str], presence: Tensor,
                     concept_names: list[str], v: Tensor, t: Tensor, cfg: SweepConfig) -> tuple[list[Direction], dict]:
    """Every direction at ``layer`` (oracle first) and the reasons for the ones skipped."""
    dirs: list[Direction] = []
    skipped: dict[str, str] = {}
    for c in concepts:
        y = presence[:, concept_names.index(c)]
        oracle = None
        try:
            oracle = oracle_direction(v, y)
        except ValueError as e:
            skipped[f"oracle/{c}"] = str(e)
        if oracle is not None and cfg.oracle:
            dirs.append(Direction("oracle", "oracle", layer, c, unit_vector(oracle), unit_vector(oracle)))
        if oracle is not None and cfg.text_oracle:
            try:
                text = oracle_direction(t, y)
            except ValueError as e:
                skipped[f"text-oracle/{c}"] = str(e)
            else:
                d = Direction("text-oracle", "text", layer, c, unit_vector(text), unit_vector(text))
                d.cosine_to_oracle = float(torch.nn.functional.cosine_similarity(text, oracle, dim=0))
                dirs.append(d)
        for name, m in methods.items():
            if name == "separate" and "cross" not in cfg.decoders:
                skipped["separate"] = ("separate = jsae-none with its text latents permuted: with each branch "
                                            "labelled by its own modality its directions are jsae-none's (add the "
                                            "'cross' decoder to steer its paired latents)")
                continue
            for d in method_directions(m, layer, c, y, v, t, cfg.decoders, cfg.top_k):
                if oracle is not None:
                    d.cosine_to_oracle = float(torch.nn.functional.cosine_similarity(d.vector, oracle, dim=0))
                dirs.append(d)
    return dirs, skipped


# ---- scoring -----------------------------------------------------------------------------------------


@dataclass
class SweepImages:
    """The sweep's images per concept (``n_images`` without it, ``n_images`` with it) and their
    unsteered captions (each image captioned once)."""

    caption: CaptionFn
    images: list[Any]
    items: list[dict]
    judge: Any
    cfg: SweepConfig
    _base: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        y = self.judge.presence(self.items)
        self.present = y[:, [self.judge.concepts.index(c) for c in self.cfg.concepts]].bool()

    def split(self, concept: str) -> tuple[list[int], list[int]]:
        """(images without ``concept``, images with it), ``n_images`` each at most, in order."""
        ci = self.cfg.concepts.index(concept)
        n = self.cfg.n_images
        has = self.present[:, ci].tolist()
        return ([i for i, h in enumerate(has) if not h][:n], [i for i, h in enumerate(has) if h][:n])

    def used(self) -> list[int]:
        return sorted({i for c in self.cfg.concepts for part in self.split(c) for i in part})

    def base(self, idx: list[int]) -> list[str]:
        todo = [i for i in idx if i not in self._base]
        if todo:
            for i, cap in zip(todo, self.caption([self.images[i] for i in todo], [])):
                self._base[i] = cap
        return [self._base[i] for i in idx]

    def score(self, concept: str, i: int, cap: str, sign: int) -> tuple[float, float, bool]:
        """(effect, preservation, hallucinated) of caption ``cap`` of image ``i`` against its unsteered caption
        (``sign`` -1: suppression, effect = mention before minus after)."""
        j = self.judge
        base = self._base[i]
        effect = sign * (float(j.mentions(cap, concept)) - float(j.mentions(base, concept)))
        said = [o for o in j.others(self.items[i], concept) if j.mentions(base, o)]
        pres = float(np.mean([j.mentions(cap, o) for o in said])) if said else float("nan")
        return effect, pres, bool(j.hallucinated(cap, self.items[i], concept))


def steer_rows(layer: int, pos: str, directions: Tensor, strengths: Tensor) -> Callable[[int, int], list[Any]]:
    return lambda lo, hi: steer_interventions(layer, pos, directions[lo:hi], strengths[lo:hi])


def pooled_steer(layer: int, sets: tuple[str, ...], directions: Tensor) -> Callable[[int, int], list[Any]]:
    """Per-row edits of rows ``(row of directions, position set)`` in that order (each row of ``directions`` once per
    position set of ``sets``, adjacent): one :class:`~jsae.interventions.Steer` per part of the position sets, at
    strength 1 in the rows whose set has that part and 0 (``x + 0 · d`` is ``x``) in the others.  One batch then holds
    a direction at every position set: the rows steered alike at prefill (``image`` and ``image+generated``; the
    unsteered prefill of ``generated``) share one prefill (:func:`jsae.interventions.generate`)."""
    from jsae.interventions import Steer

    parts = list(dict.fromkeys(part for pos in sets for part in POSITION_SETS[pos]))
    on = {part: torch.tensor([float(part in POSITION_SETS[pos]) for pos in sets]).repeat(len(directions)) for part in parts}
    rows = torch.arange(len(directions)).repeat_interleave(len(sets))
    return lambda lo, hi: [Steer(layer=layer, positions=p, timing=timing, direction=directions[rows[lo:hi]],
                                 strength=on[(p, timing)][lo:hi]) for p, timing in parts]


def run_rows(sweep: SweepImages, rows: list[tuple[int, int, int]], make: Callable[[int, int], list[Any]],
              bar: Any) -> list[str]:
    """Captions of ``rows`` (image index first) with per-row interventions ``make(lo, hi)``, in caption batches
    (shared between :func:`jsae.parallel.workers` processes: each batch's captions are what it gives alone)."""
    return run_parts(sweep, [(rows, make)], bar)


def run_parts(sweep: SweepImages, parts: list[tuple[list[tuple[int, int, int]], Callable[[int, int], list[Any]]]],
              bar: Any) -> list[str]:
    """:func:`run_rows` of each ``(rows, make)`` of ``parts``, one after another in the output, their caption batches
    (each part's own, as :func:`run_rows` cuts them) shared between the processes together."""
    step = max(1, getattr(sweep.caption, "batch_size", 64))
    spans = [(p, lo, min(lo + step, len(rows))) for p, (rows, _) in enumerate(parts) for lo in range(0, len(rows), step)]

    def batch(k: int, _: int) -> list[str]:
        p, lo, hi = spans[k]
        rows, make = parts[p]
        return sweep.caption([sweep.images[r[0]] for r in rows[lo:hi]], lambda a, b: make(lo + a, lo + b))

    out: list[str] = []
    for caps in forked_map(batch, [(k, k + 1) for k in range(len(spans))], workers(),
                           lambda span: bar.update(spans[span[0]][2] - spans[span[0]][1])):
        out += caps
    return out


def curves_from(sweep: SweepImages, rows, caps, dirs, grid, absolute, measure, pos, sign, norm) -> list[Curve]:
    """Assemble curves from the captions of rows ``(image, direction index, strength index)``."""
    by: dict[tuple[int, int], dict[int, str]] = {}
    for (i, di, si), cap in zip(rows, caps):
        by.setdefault((di, si), {})[i] = cap
    curves = []
    for di, d in enumerate(dirs):
        without, with_c = sweep.split(d.concept)
        imgs = with_c if sign < 0 else without
        K, n = len(grid), len(imgs)
        eff, pres = np.zeros((K, n)), np.full((K, n), np.nan)
        flu, hal = np.zeros((K, n), bool), np.zeros((K, n), bool)
        for si in range(K):
            caps_k = [by[(di, si)][i] for i in imgs]
            flu[si] = sweep.judge.fluent_each(caps_k) if caps_k else []
            for k, (i, cap) in enumerate(zip(imgs, caps_k)):
                eff[si, k], pres[si, k], hal[si, k] = sweep.score(d.concept, i, cap, sign)
        base = sweep.base(imgs)
        curves.append(Curve(measure, d.method, d.decoder, pos, d.layer, d.concept, [float(g) for g in grid],
                            _added_norms(d, grid, absolute, norm), imgs, eff, pres, flu, hal,
                            d.features, d.feature_corr, d.cosine_to_oracle,
                            float(np.mean([sweep.judge.mentions(b, d.concept) for b in base])) if base else 0.0))
    return curves


def _grid(cfg: SweepConfig, sign: int) -> tuple[tuple[float, ...], bool]:
    """The strengths of a measure and whether they are absolute α (the reference's, steering only) rather than
    ratios of the per-token state norm."""
    if sign > 0:
        return (cfg.alphas, True) if cfg.alphas is not None else (cfg.ratios, False)
    return cfg.suppress_ratios, False


def _added_norms(d: Direction, grid, absolute: bool, norm: float) -> list[float]:
    """The norm of what is added at each grid point (α along Σ of unit rows, or r along the unit direction)."""
    scale = float(d.raw.norm()) if absolute else norm
    return [g * scale for g in grid]


def measure_layer(sweep: SweepImages, methods: dict[str, Method], dirs: list[Direction], layer: int, norm: float,
                  progress: bool = True, positions: tuple[str, ...] | None = None) -> list[Curve]:
    """Every curve of one layer: steering and negative steering at each position set, then clamps; their caption
    batches (each measure's own, as it alone cuts them) shared between the processes in one map, so no process waits
    for the other at the end of each measure."""
    from jsae.interventions import Ablate, ProjectOut

    cfg = sweep.cfg
    positions = tuple(positions or cfg.positions)
    sweep.base(sweep.used())
    parts: list[tuple[list[tuple[int, int, int]], Callable[[int, int], list[Any]]]] = []
    assemble: list[Callable[[list[str]], list[Curve]]] = []  # per part: its curves from its captions
    names: list[str] = []
    for sign, measure in ((1, "steering"), (-1, "suppression")):
        grid, absolute = _grid(cfg, sign)
        rows, vecs = [], []
        for di, d in enumerate(dirs):
            without, with_c = sweep.split(d.concept)
            base = d.raw if absolute else sign * norm * d.vector
            for si, g in enumerate(grid):
                for i in (with_c if sign < 0 else without):
                    rows.append((i, di, si))
                    vecs.append(g * base)
        if not rows:
            continue
        sets = positions if sign > 0 else positions[:1]
        parts.append(([r for r in rows for _ in sets], pooled_steer(layer, sets, torch.stack(vecs))))
        names.append(f"{measure} at {', '.join(sets)}")

        def steered(caps: list[str], rows=rows, sets=sets, grid=grid, absolute=absolute, measure=measure,
                    sign=sign) -> list[Curve]:
            return [c for k, pos in enumerate(sets)
                    for c in curves_from(sweep, rows, caps[k::len(sets)], dirs, grid, absolute, measure, pos, sign, norm)]

        assemble.append(steered)
    # clamps: SAE latents to 0 through the SAE (error kept), the oracle's direction projected out; one batch
    # per SAE branch with each prompt's own latents (per-prompt Ablate / ProjectOut)
    at, timing = POSITION_SETS[positions[0]][0]  # the first part of the first position set, at its own timing
    # (at the last decoder layer only position sets with generated tokens are run: their clamps act at every step)
    groups: dict[tuple[str, str | None], list[int]] = {}
    for di, d in enumerate(dirs):
        groups.setdefault((d.method, d.sae_branch), []).append(di)
    rows_all: list[tuple[int, int, int]] = []
    clamp_parts = 0
    for (method, branch), dis in groups.items():
        rows = [(i, di, 0) for di in dis for i in sweep.split(dirs[di].concept)[1]]
        if not rows:
            continue
        if method in ("oracle", "text-oracle"):
            P = torch.stack([dirs[di].vector for _, di, _ in rows])
            make = lambda lo, hi, P=P: [ProjectOut(layer=layer, positions=at, timing=timing, direction=P[lo:hi])]  # noqa: E731
        else:
            feats = [dirs[di].features for _, di, _ in rows]
            make = lambda lo, hi, feats=feats, m=methods[method], br=branch: [  # noqa: E731
                Ablate(layer=layer, positions=at, timing=timing, sae=m.sae, features=feats[lo:hi], sae_modality=br)]
        rows_all += rows
        parts.append((rows, make))
        clamp_parts += 1
    if clamp_parts:
        names.append("clamps")
    n_rows = sum(len(rows) for rows, _ in parts)
    with tqdm(total=n_rows, desc=f"layer {layer}: {'; '.join(names)}", disable=not progress, mininterval=5) as bar:
        caps = run_parts(sweep, parts, bar)  # every measure's batches shared between the processes
    curves: list[Curve] = []
    at_row = 0
    for k, make_curves in enumerate(assemble):
        n = len(parts[k][0])
        curves += make_curves(caps[at_row:at_row + n])
        at_row += n
    curves += curves_from(sweep, rows_all, caps[at_row:], dirs, (0.0,), False, "clamp", positions[0], -1, norm)
    return curves


def image_token_states(vlm: Any, images: list[Any], layer: int, prompt: str,
                       prompt_template: str | None = None) -> Tensor:
    """``[n_tokens, d]`` per-token image states at ``layer`` (float32) for ``images`` after the captioning prompt."""
    from jsae.activations import states_at

    model, processor, adapter = vlm
    text = adapter.render_prompt(processor, prompt, 1, add_generation_prompt=True, prompt_template=prompt_template)
    enc = adapter.complete_inputs(processor(images=list(images), text=[text] * len(images), return_tensors="pt",
                                            padding=True))
    return states_at(model, adapter, enc, [layer], adapter.image_token_mask(enc))[layer].cpu()


def text_token_states(vlm: Any, pairs: list[tuple[Any, str]], layer: int, prompt_template: str | None = None,
                      text_positions: str = "caption") -> Tensor:
    """``[n_tokens, d]`` per-token text states at ``layer`` (float32) of ``(image, caption)`` pairs built as the
    capture builds them: the tokens the text view pools (``text_positions``: the caption's, or every
    non-image token)."""
    from jsae.activations import states_at

    model, processor, adapter = vlm
    enc = adapter.build_inputs(processor, [p[0] for p in pairs], [p[1] for p in pairs], prompt_template=prompt_template)
    mask = adapter.caption_token_mask(enc) if text_positions == "caption" else adapter.non_image_token_mask(enc)
    return states_at(model, adapter, enc, [layer], mask)[layer].cpu()


def token_norm(vlm: Any, images: list[Any], layer: int, prompt: str, prompt_template: str | None = None) -> float:
    """Mean norm of the per-token image states at ``layer`` over ``images`` (the strength unit)."""
    return float(image_token_states(vlm, images, layer, prompt, prompt_template).norm(dim=-1).mean())


def steer_interventions(layer: int, positions: str, direction: Tensor, strength: Any) -> list[Any]:
    """The :class:`~jsae.interventions.Steer` edits of one position set (:data:`POSITION_SETS`)."""
    from jsae.interventions import Steer

    if positions not in POSITION_SETS:
        raise ValueError(f"unknown steering positions {positions!r}; choose from {list(POSITION_SETS)}")
    return [Steer(layer=layer, positions=p, timing=timing, direction=direction, strength=strength)
            for p, timing in POSITION_SETS[positions]]


def run_sweep(vlm: Any, caption: CaptionFn, methods_by_layer: dict[int, dict[str, Method]],
              pools: dict[int, tuple[Tensor, Tensor]], presence: Tensor, concept_names: list[str],
              images: list[Any], items: list[dict], cfg: SweepConfig, judge: Any, norms: dict[int, float],
              progress: bool = True) -> tuple[list[Curve], list[Direction], dict[str, str]]:
    """Directions from the labelling pools (``pools[L] = (v, t)`` with ``presence`` [n, C] over
    ``concept_names``), then every curve at every layer on the sweep images.  ``norms[L]``: the
    per-token image-state norm (the strength unit).  Returns (curves, directions, skipped reasons)."""
    unknown = [c for c in cfg.concepts if c not in judge.concepts]
    if unknown:
        raise ValueError(f"unknown concept(s) {unknown}; this judge's concepts are {judge.concepts[:50]}")
    sweep = SweepImages(caption, images, items, judge, cfg)
    curves: list[Curve] = []
    all_dirs: list[Direction] = []
    skipped: dict[str, str] = {}
    for c in cfg.concepts:
        without, with_c = sweep.split(c)
        if not without or not with_c:
            skipped[f"images/{c}"] = (f"the sweep images have {len(without)} without and {len(with_c)} with {c!r}; "
                                      "pass more evaluation images (--n-eval)")
    n_layers = vlm.adapter.n_layers if vlm is not None else None
    for layer in cfg.layers:
        v, t = pools[layer]
        positions = tuple(cfg.positions)
        if n_layers is not None and layer == n_layers - 1:
            null = [p for p in positions if not any(tm == "every_step" for _, tm in POSITION_SETS[p])]
            if null:
                skipped[f"{layer}/positions"] = (f"at the last decoder layer the prompt's states are read by nothing "
                                                 f"(only generated tokens are): steering at {null} there is null by "
                                                 "construction, so it is not run; sweep it with --positions image+generated")
                positions = tuple(p for p in positions if p not in null)
                if not positions:
                    continue
        dirs, sk = build_directions(methods_by_layer[layer], layer, cfg.concepts, presence, concept_names, v, t, cfg)
        skipped.update({k if k == "separate" else f"{layer}/{k}": r for k, r in sk.items()})
        all_dirs += dirs
        curves += measure_layer(sweep, methods_by_layer[layer], dirs, layer, norms[layer], progress, positions)
    return curves, all_dirs, skipped


__all__ = ["DECODERS", "POSITION_SETS", "RATIOS", "STEER_AT", "SUPPRESS_RATIOS", "Curve", "Direction", "SweepConfig",
           "SweepImages", "build_directions", "image_token_states", "measure_layer", "method_directions", "oracle_direction",
           "pooled_steer",
           "run_sweep", "steer_interventions", "token_norm", "top_latents"]
