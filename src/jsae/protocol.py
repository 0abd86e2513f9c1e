"""The JSAE paper's protocol end to end: capture → train per layer → label → steer / suppress sweep →
statistics → report.

Methods compared on the same data and budget, at every swept layer:

- ``jsae``: JSAE with the cosine alignment loss (the paper);
- ``jsae-none``: the same with alignment ``none`` (the ablation that removes only the alignment loss);
- ``separate``: two separately trained SAEs aligned after training (Hungarian matching of codes;
  the ``jsae-none`` weights with the text latents permuted, see :mod:`jsae.baselines`);
- ``saelens-topk``: a plain SAELens TopK SAE trained on the vision pools only, by SAELens's ``SAETrainer``.

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

import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from jsae.labels import FeatureLabels, label_features
from jsae.sae import JointSAE, TrainingJointSAE, TrainingJointSAEConfig
from jsae.stats import bootstrap_ci, cohens_h, interaction_test
from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData

METHODS = ("jsae", "jsae-none", "separate", "saelens-topk")


# ---- the world's concepts and grammar -----------------------------------------------------------


def world_concepts() -> list[str]:
    from jsae.world import CATEGORIES, COLORS, TYPES

    return list(TYPES) + list(CATEGORIES) + list(COLORS)


def concept_presence(objects: Sequence[Sequence[dict]], concepts: list[str]) -> Tensor:
    """[N, C] 0/1: does image i contain concept c (an object of that type, category or colour)?"""
    y = torch.zeros(len(objects), len(concepts))
    index = {c: i for i, c in enumerate(concepts)}
    for i, objs in enumerate(objects):
        for o in objs:
            for key in ("name", "category", "color"):
                if o.get(key) in index:
                    y[i, index[o[key]]] = 1.0
    return y


def mentions(text: str, concept: str) -> bool:
    """Does a caption mention ``concept`` (a type, a category or a colour) under the world's grammar?"""
    from jsae.world import TYPE_TO_CATEGORY, parse_caption

    words = text.replace(",", " ").split()
    if concept in words:
        return True
    found = parse_caption(text)
    return any(TYPE_TO_CATEGORY.get(f["name"]) == concept or f["color"] == concept for f in found)


def fluent(text: str) -> bool:
    """The caption still parses under the world's grammar: it names an object and uses only its words."""
    from jsae.world import parse_caption
    from jsae.world.grammar import vocabulary

    vocab = set(vocabulary())
    return bool(parse_caption(text)) and all(w in vocab for w in text.replace(",", " , ").split())


# ---- judges: concepts, mentions and fluency -------------------------------------------------------


class WorldJudge:
    """The embedded world: concepts are object types, categories and colours; presence is exact ground
    truth; a mention is read by the world's caption parser; fluent = the caption parses under its grammar."""

    needs_calibration = False

    def __init__(self) -> None:
        self.concepts = world_concepts()

    def presence(self, items: Sequence[dict]) -> Tensor:
        return concept_presence([it["objects"] for it in items], self.concepts)

    def mentions(self, text: str, concept: str) -> bool:
        return mentions(text, concept)

    def calibrate(self, captions: list[str]) -> None:
        """Nothing to calibrate: the grammar is the standard."""

    def fluency(self, captions: list[str]) -> float:
        return float(np.mean([fluent(c) for c in captions])) if captions else 0.0

    def others(self, item: dict, concept: str) -> list[str]:
        """The image's other object types (not ``concept`` nor of its category), for preservation."""
        return sorted({o["name"] for o in item["objects"]} - {concept}
                      - {o["name"] for o in item["objects"] if _is_concept_of(o["name"], concept)})


_WORD = re.compile(r"[a-z]+")


def caption_words(text: str) -> set[str]:
    """Lower-case words of a caption, with a plural ``-s``/``-es`` also counted as its singular."""
    words = set(_WORD.findall(text.lower()))
    out = set(words)
    for w in words:
        if len(w) > 3 and w.endswith("es"):
            out.add(w[:-2])
        if len(w) > 2 and w.endswith("s"):
            out.add(w[:-1])
    return out


def distinct_2(text: str) -> float:
    """Fraction of distinct word bigrams (1.0 = no repetition); 1.0 for captions of under 3 words."""
    w = text.split()
    bigrams = list(zip(w, w[1:]))
    return len(set(bigrams)) / len(bigrams) if len(bigrams) >= 2 else 1.0


class CaptionJudge:
    """Real data: concepts are caption words (:func:`jsae.labels.concepts_from_captions`); an image
    *contains* a concept when its reference caption has the word; a generated caption *mentions* it on a
    word match (plural tolerant).  Fluency guard (the reference code's perplexity guard, with the VLM
    itself as the language model): a caption is fluent when its perplexity under the model **without the
    image** is at most ``max_perplexity`` (default: ``ratio`` × the 95th percentile of the unsteered calibration
    captions, set by :meth:`calibrate`, so that unsteered captions pass) and its distinct-bigram ratio is at
    least ``min_distinct``."""

    needs_calibration = True

    def __init__(self, concepts: list[str], perplexity: Callable[[list[str]], np.ndarray], *,
                 max_perplexity: float | None = None, ratio: float = 1.5, min_distinct: float = 0.5) -> None:
        if not concepts:
            raise ValueError("CaptionJudge needs at least one concept word")
        if max_perplexity is not None and not (math.isfinite(max_perplexity) and max_perplexity > 1):
            raise ValueError(f"max_perplexity must be a finite number > 1, got {max_perplexity!r}")
        self.concepts, self.perplexity = list(concepts), perplexity
        self.max_perplexity, self.ratio, self.min_distinct = max_perplexity, ratio, min_distinct
        self._fixed = max_perplexity is not None

    def presence(self, items: Sequence[dict]) -> Tensor:
        y = torch.zeros(len(items), len(self.concepts))
        index = {c: i for i, c in enumerate(self.concepts)}
        for i, it in enumerate(items):
            refs = it.get("captions") or [it["caption"]]
            for w in set().union(*(caption_words(r) for r in refs)):
                if w in index:
                    y[i, index[w]] = 1.0
        return y

    def mentions(self, text: str, concept: str) -> bool:
        return concept in caption_words(text)

    def calibrate(self, captions: list[str]) -> None:
        """Set the perplexity threshold from unsteered captions (unless ``max_perplexity`` was given)."""
        if self._fixed:
            return
        ppl = self.perplexity([c for c in captions if c.strip()])
        if len(ppl) == 0:
            raise ValueError("the unsteered captions are all empty: check the captioning prompt (--prompt)")
        self.max_perplexity = float(self.ratio * np.quantile(ppl, 0.95))

    def fluency(self, captions: list[str]) -> float:
        if not captions:
            return 0.0
        if self.max_perplexity is None:
            raise RuntimeError("CaptionJudge.calibrate(unsteered_captions) must run before fluency()")
        ppl = np.full(len(captions), np.inf)
        nonempty = [i for i, c in enumerate(captions) if c.strip()]
        if nonempty:
            ppl[nonempty] = self.perplexity([captions[i] for i in nonempty])
        ok = [p <= self.max_perplexity and distinct_2(c) >= self.min_distinct for p, c in zip(ppl, captions)]
        return float(np.mean(ok))

    def others(self, item: dict, concept: str) -> list[str]:
        refs = item.get("captions") or [item["caption"]]
        words = set().union(*(caption_words(r) for r in refs))
        return sorted(w for w in self.concepts if w in words and w != concept)


Judge = WorldJudge | CaptionJudge


@torch.no_grad()
def text_perplexity(model: Any, processor: Any, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Perplexity of each text under the VLM's language model alone (no image): exp of the mean
    next-token loss over the text's tokens after the first."""
    from jsae.adapters import unwrap

    hf = unwrap(model)
    tok = getattr(processor, "tokenizer", processor)
    dev = next(hf.parameters()).device
    out: list[float] = []
    side = tok.padding_side
    tok.padding_side = "right"
    try:
        for i in range(0, len(texts), batch_size):
            enc = tok(texts[i:i + batch_size], return_tensors="pt", padding=True).to(dev)
            logits = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
            mask = enc["attention_mask"][:, 1:].float()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), enc["input_ids"][:, 1:],
                                                    reduction="none")
            out += torch.exp((nll * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu().tolist()
    finally:
        tok.padding_side = side
    return np.array(out)


# ---- methods ------------------------------------------------------------------------------------


@dataclass
class Method:
    """One SAE of one method at one layer, with how to read and edit it."""

    name: str
    sae: Any  # a JointSAE, or a SAELens SAE for the vision-only baseline
    joint: bool

    def codes(self, x: Tensor, modality: str) -> Tensor:
        with torch.no_grad():
            if self.joint:
                return self.sae.encode(x, modality)
            return self.sae.encode(x)

    def steer_direction(self, features: list[int]) -> Tensor:
        W = self.sae.W_dec_of("text") if self.joint else self.sae.W_dec
        W = W.detach()[features]
        return (W / W.norm(dim=-1, keepdim=True).clamp(min=1e-8)).sum(0)


def permute_text_branch(sae: JointSAE, text_order: Tensor) -> JointSAE:
    """A copy of ``sae`` whose text latent ``i`` is the original text latent ``text_order[i]``."""
    import copy

    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.text.W_enc.copy_(sae.text.W_enc[:, text_order])
        out.text.b_enc.copy_(sae.text.b_enc[text_order])
        out.text.W_dec.copy_(sae.text.W_dec[text_order])
    return out


def train_methods(vision: Tensor, text: Tensor, *, layer: int, d_sae: int, steps: int, batch_size: int, lr: float,
                  seed: int, methods: Sequence[str], metadata: dict[str, Any], k: int = 16) -> dict[str, Method]:
    """Train every method on the same pairs with the same width, steps, batch and learning rate."""
    from jsae.baselines import match_separate_saes

    out: dict[str, Method] = {}
    # train at mean norm sqrt(d_in) (SAELens's convention, so L1 weights mean the same at every layer) and
    # fold the scale into the weights afterwards: the saved SAEs take raw activations
    scale = math.sqrt(vision.shape[1]) / float(torch.cat([vision, text]).norm(dim=-1).mean())
    data = PairedTensorData(vision * scale, text * scale, batch_size=min(batch_size, vision.shape[0]), seed=seed)
    tcfg = JointTrainerConfig(total_steps=steps, lr=lr, lr_warm_up_steps=steps // 20, lr_decay_steps=steps // 5,
                              seed=seed, progress=False, log_every=max(steps // 4, 1), grad_clip_norm=None)
    for name in [m for m in ("jsae", "jsae-none") if m in methods or (m == "jsae-none" and "separate" in methods)]:
        cfg = TrainingJointSAEConfig(d_in=vision.shape[1], d_sae=d_sae, alignment="cosine" if name == "jsae" else "none",
                                     mse_normalization="variance", l1_coefficient=0.03)
        for key, value in {**metadata, "layer": layer}.items():
            cfg.metadata[key] = value
        sae = JointSAETrainer.from_config(cfg, tcfg, data).fit().eval()
        sae.fold_activation_norm_scaling_factor(scale)
        out[name] = Method(name, sae, True)
    if "separate" in methods:
        text_order, _ = match_separate_saes(out["jsae-none"].sae, vision, text)
        out["separate"] = Method("separate", permute_text_branch(out["jsae-none"].sae, text_order), True)
    if "saelens-topk" in methods:
        out["saelens-topk"] = Method("saelens-topk", _train_saelens_topk(vision, d_sae, k, steps, batch_size, lr, seed), False)
    return {m: out[m] for m in methods}


def _train_saelens_topk(vision: Tensor, d_sae: int, k: int, steps: int, batch_size: int, lr: float, seed: int) -> Any:
    """The vision-only baseline: a plain SAELens TopK SAE on the vision pools (SAELens's ``SAETrainer``)."""
    from jsae.training import train_saelens_topk

    return train_saelens_topk(vision, d_sae, k, steps, min(batch_size, vision.shape[0]), lr, seed).eval()


# ---- generation cells ---------------------------------------------------------------------------


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


# ---- the sweep ----------------------------------------------------------------------------------


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


def _is_concept_of(obj_name: str, concept: str) -> bool:
    from jsae.world import TYPE_TO_CATEGORY

    return TYPE_TO_CATEGORY.get(obj_name) == concept


def summarise(cells: list[Cell], n_boot_seed: int = 0) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Per measure, method and layer: the mean over concepts with a bootstrap interval over images."""
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    groups: dict[tuple[str, str, int], list[Cell]] = {}
    for c in cells:
        groups.setdefault((c.measure, c.method, c.layer), []).append(c)
    for (measure, method, layer), cs in groups.items():
        mean = float(np.mean([c.mean for c in cs]))
        half = math.sqrt(sum(((c.high - c.low) / 2) ** 2 for c in cs)) / len(cs)
        out.setdefault(measure, {}).setdefault(method, {})[str(layer)] = {
            "mean": mean, "low": mean - half, "high": mean + half, "n_concepts": len(cs),
            "cohens_h": float(np.mean([c.cohens_h for c in cs])), "n_images": int(sum(c.n for c in cs))}
    return out


def interaction(cells_by_model: dict[str, list[Cell]], measure: str, method: str = "jsae") -> dict[str, Any] | None:
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


__all__ = ["METHODS", "CaptionJudge", "Cell", "Judge", "Method", "SweepConfig", "WorldJudge", "caption_words",
           "concept_presence", "distinct_2", "fluent", "interaction", "mentions", "run_sweep", "summarise",
           "text_perplexity", "train_methods", "world_concepts"]
