"""VISTA's measures: the matching rate, localisation precision, and patch-local object removal /
replacement.

**Matching rate** (our precise definition; the paper publishes none).  For image ``i`` and layer ``l``,
let ``m_i = mean over the image's tokens t of SAE_l.encode(h_l,t)`` (``[d_sae]``).  Take the ``k``
latents with the largest ``m_i`` among those with ``m_i > 0`` (fewer when fewer are active).  The
image's score is ``#{top latents whose label is a concept present in image i} / k``: unlabelled latents
and missing (inactive) slots count as misses, so a projector cannot score by silencing the SAE.  A
latent's label comes from text only: the concept words of its max-activating tokens, Neuronpedia-style
(:func:`label_from_top_examples`), or a real SAE's explanations file (:func:`load_neuronpedia_explanations`).
Concepts present in an image are its objects' types, categories and colours.  The rate is the mean
score over images, with a 95% percentile-bootstrap interval; the VISTA / baseline ratio gets a paired
bootstrap interval over images.

**Localisation precision**: for every patch covered by exactly one object, the patch's top *labelled*
latent (largest activation among latents with a label, activation > 0; none active = miss) is a hit
when its label is one of that object's concepts.  Score per image = hits / object patches; mean over
images with an interval.

**Removal** of object ``o`` (patch-local, at layer ``l``, prefill only): at the image tokens of ``o``'s
mask cells only, the latents labelled with ``o``'s type, category or colour are set to 0 through the
SAE with its error term kept (``x + decode(z') − decode(z)``).  Success: the caption no longer names
``o``'s type and still names every other object's type.  **Replacement** with type ``t'`` (absent from
the image): ``o``'s type/category latents set to 0 and ``t'``'s type latents clamped to their typical
in-object activation × ``gain``; success: the caption names ``t'``, not ``o``'s type, and still every
other object (``in_place`` additionally requires ``t'`` at ``o``'s position).  Only images whose
unedited caption names all their objects (distinct types, ≥ 2 objects) are scored.

**Baselines.**  A vision-only SAE on the λ=0 projector's image tokens, labelled the way the text SAE is — from
its max-activating examples (images, max over patches) and the concept words of their captions — is the fair
baseline; the same SAE labelled from ground-truth patch masks is an upper reference (stronger supervision than
VISTA gets).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from jsae.guards import typechecked
from jsae.correlation import presence_matrix
from jsae.protocol.stats import bootstrap_ci


def object_concepts(obj: Mapping[str, Any]) -> set[str]:
    return {str(obj[k]) for k in ("name", "category", "color") if obj.get(k)}


def image_concepts(objects: Sequence[Mapping[str, Any]]) -> set[str]:
    out: set[str] = set()
    for o in objects:
        out |= object_concepts(o)
    return out


# ---- labels -------------------------------------------------------------------------------------


def label_latents_from_text(codes: Float[Tensor, "n_tokens d_sae"], owners: Tensor, caption_concepts: Sequence[set[str]],
                            concepts: list[str], min_corr: float = 0.3) -> list[str | None]:
    """Label each latent with the world concept whose presence in a caption its max-over-tokens code
    correlates with best (Pearson ≥ ``min_corr``), through :func:`jsae.labels.label_features`."""
    from jsae.labels import label_features

    n = len(caption_concepts)
    pooled = torch.zeros(n, codes.shape[1])
    pooled = pooled.index_reduce_(0, owners.long(), codes.float(), "amax", include_self=True)
    y = torch.zeros(n, len(concepts))
    index = {c: i for i, c in enumerate(concepts)}
    for i, cs in enumerate(caption_concepts):
        for c in cs:
            if c in index:
                y[i, index[c]] = 1.0
    labs = label_features(pooled, pooled, y, concepts, min_corr=min_corr)
    return [lab.label for lab in labs.labels]


def token_concepts(words: Sequence[str]) -> list[set[str]]:
    """The world concepts each token *is*: its own word when it is a type, colour or category (plural
    included), plus the category of a type word."""
    from jsae.world import CATEGORIES, COLORS, TYPE_TO_CATEGORY
    from jsae.world.grammar import PLURAL

    singular = {v: k for k, v in PLURAL.items()}
    out = []
    for w in words:
        w = singular.get(w, w)
        cs: set[str] = set()
        if w in TYPE_TO_CATEGORY:
            cs |= {w, TYPE_TO_CATEGORY[w]}
        elif w in COLORS or w in CATEGORIES:
            cs.add(w)
        out.append(cs)
    return out


def label_latents_from_words(codes: Float[Tensor, "n_tokens d_sae"], words: Sequence[str], concepts: list[str],
                             min_corr: float = 0.3) -> list[str | None]:
    """Label each latent with the world concept word it fires on: the concept whose indicator over
    tokens (:func:`token_concepts`) its per-token code correlates with best (Pearson ≥ ``min_corr``)."""
    return label_latents_from_patches(codes, token_concepts(words), concepts, min_corr)


def label_latents_from_patches(codes: Float[Tensor, "n_patches d_sae"], patch_concepts: Sequence[set[str]],
                               concepts: list[str], min_corr: float = 0.3) -> list[str | None]:
    """Vision-only labels: the concept whose presence at a patch (the patch lies in an object with it)
    correlates best with the latent's per-patch code."""
    from jsae.labels import label_features

    y = torch.zeros(len(patch_concepts), len(concepts))
    index = {c: i for i, c in enumerate(concepts)}
    for i, cs in enumerate(patch_concepts):
        for c in cs:
            if c in index:
                y[i, index[c]] = 1.0
    labs = label_features(codes.float(), codes.float(), y, concepts, min_corr=min_corr)
    return [lab.label for lab in labs.labels]


def label_from_top_examples(codes: Float[Tensor, "n_examples d_sae"], example_concepts: Sequence[set[str]], concepts: list[str],
                            top_n: int = 20, min_purity: float = 0.5, min_lift: float = 0.2,
                            min_active: int = 5) -> tuple[list[str | None], list[float]]:
    """Neuronpedia-style labels from each latent's max-activating examples.

    An *example* is whatever the latent is read on — a token of a caption (its concepts: the word itself,
    :func:`token_concepts`, plus the words of its context when asked) or an image (the concepts its caption
    names).  For latent ``j``, take its ``top_n`` largest positive activations; for every concept ``c``,
    ``p_top(c)`` = the fraction of those examples showing ``c`` and ``lift(c) = p_top(c) − p_all(c)`` (its
    base rate over all examples).  The label is the concept of the largest lift, kept when
    ``p_top ≥ min_purity`` and ``lift ≥ min_lift`` (and the latent is active on ≥ ``min_active`` examples).
    Returns ``(labels, purity)`` with ``purity[j] = p_top(label)`` (the best concept's, labelled or not)."""
    if codes.shape[0] != len(example_concepts):
        raise ValueError(f"{codes.shape[0]} code rows for {len(example_concepts)} examples; pass one concept set per example")
    if top_n < 1 or not 0 < min_purity <= 1:
        raise ValueError(f"top_n must be >= 1 and min_purity in (0, 1], got {top_n}, {min_purity}")
    y = presence_matrix(example_concepts, concepts)
    codes = codes.float()
    n = min(top_n, codes.shape[0])
    vals, idx = codes.topk(n, dim=0)  # [n, d]
    active = vals > 0
    p_top = (y[idx] * active[..., None]).sum(0) / active.sum(0).clamp(min=1)[:, None]  # [d, C]
    lift = p_top - y.mean(0)[None]
    best_lift, best = lift.max(-1)
    purity = p_top.gather(1, best[:, None]).squeeze(1)
    n_active = (codes > 0).sum(0)
    labels: list[str | None] = []
    for j in range(codes.shape[1]):
        ok = int(n_active[j]) >= min_active and float(purity[j]) >= min_purity and float(best_lift[j]) >= min_lift
        labels.append(concepts[int(best[j])] if ok else None)
    return labels, [float(v) for v in purity]


def context_concepts(words: Sequence[str], owners: Sequence[int], window: int = 0) -> list[set[str]]:
    """Per token: the concepts of the token itself and of the ``window`` tokens before it in the same caption."""
    own = token_concepts(words)
    if window <= 0:
        return own
    out = []
    for t in range(len(words)):
        cs = set(own[t])
        for b in range(1, window + 1):
            if t - b >= 0 and owners[t - b] == owners[t]:
                cs |= own[t - b]
        out.append(cs)
    return out


def label_summary(labels: Sequence[str | None], purity: Sequence[float]) -> dict[str, Any]:
    """Fraction of latents labelled, mean purity of the labelled ones, and the concepts they cover."""
    lab = [j for j, v in enumerate(labels) if v is not None]
    return {"d_sae": len(labels), "labelled": len(lab), "labelled_fraction": len(lab) / max(len(labels), 1),
            "mean_purity": float(np.mean([purity[j] for j in lab])) if lab else float("nan"),
            "concepts_covered": len({labels[j] for j in lab})}


# ---- Neuronpedia explanations -------------------------------------------------------------------


def load_neuronpedia_explanations(path: str, d_sae: int | None = None) -> list[str | None]:
    """Explanations of a real SAE's latents from a Neuronpedia export: a ``.json`` array (or
    ``{"explanations": [...]}``) or ``.jsonl`` / ``.jsonl.gz`` of records with ``index`` and ``description``
    (``modelId``, ``layer``, ``explanationModelName``… are ignored).  Returns one description (or None) per
    latent, ``d_sae`` long (default: the largest index + 1); several explanations of one latent: the first."""
    import gzip
    import json
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no explanations file at {p}; export one from Neuronpedia (explanations of an SAE, JSON or JSONL)")
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt", encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
        records = data.get("explanations", []) if isinstance(data, dict) else data
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p} is neither JSON nor JSON lines ({exc}); pass Neuronpedia's explanation export") from None
    if not isinstance(records, list) or any(not isinstance(r, dict) or "index" not in r or "description" not in r for r in records):
        raise ValueError(f"{p} holds records without 'index' and 'description'; pass Neuronpedia's explanation export")
    idx = [int(r["index"]) for r in records]
    n = d_sae if d_sae is not None else (max(idx) + 1 if idx else 0)
    out: list[str | None] = [None] * n
    for i, r in zip(idx, records):
        if not 0 <= i < n:
            raise ValueError(f"{p}: explanation of latent {i} but the SAE has {n} latents; pass the SAE's explanations")
        if out[i] is None and str(r["description"]).strip():
            out[i] = str(r["description"]).strip()
    return out


def labels_from_explanations(descriptions: Sequence[str | None], concepts: list[str],
                             synonyms: Mapping[str, str] | None = None) -> list[str | None]:
    """A concept label per latent from its free-text explanation: the concept (or a synonym of it, e.g. a
    plural) named as a whole word in the description; a description naming several concepts or none is
    unlabelled."""
    import re

    words = {c: c for c in concepts}
    words.update({k: v for k, v in (synonyms or {}).items() if v in concepts})
    pats = {w: re.compile(rf"\b{re.escape(w)}\b", re.IGNORECASE) for w in words}
    out: list[str | None] = []
    for d in descriptions:
        hit = {words[w] for w, pat in pats.items() if d and pat.search(d)}
        out.append(hit.pop() if len(hit) == 1 else None)
    return out


# ---- matching rate and localisation -------------------------------------------------------------


@typechecked
def matching_scores(mean_codes: Float[Tensor, "n_images d_sae"], labels: Sequence[str | None],
                    present: Sequence[set[str]], k: int = 5) -> np.ndarray:
    """Per-image matching score (see the module docstring): matched labels among the top-``k`` active
    latents of the image's mean code, divided by ``k``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(labels) != mean_codes.shape[1]:
        raise ValueError(f"{len(labels)} labels for {mean_codes.shape[1]} latents; pass one label (or None) per latent")
    if len(present) != mean_codes.shape[0]:
        raise ValueError(f"{len(present)} concept sets for {mean_codes.shape[0]} images")
    vals, idx = mean_codes.topk(min(k, mean_codes.shape[1]), dim=1)
    out = np.zeros(mean_codes.shape[0])
    for i in range(mean_codes.shape[0]):
        hits = sum(1 for v, j in zip(vals[i].tolist(), idx[i].tolist()) if v > 0 and labels[j] is not None and labels[j] in present[i])
        out[i] = hits / k
    return out


@typechecked
def localisation_scores(patch_codes: Float[Tensor, "n_images n_patches d_sae"], labels: Sequence[str | None],
                        objects: Sequence[Sequence[Mapping[str, Any]]]) -> np.ndarray:
    """Per-image precision of the per-patch top labelled latent against the object masks (NaN for an
    image with no patch covered by exactly one object)."""
    labelled = torch.tensor([lab is not None for lab in labels])
    z = patch_codes.masked_fill(~labelled, float("-inf"))
    val, top = z.max(dim=-1)  # [n, P]
    out = np.full(patch_codes.shape[0], np.nan)
    for i, objs in enumerate(objects):
        masks = np.array([np.asarray(o["mask"], dtype=bool) for o in objs]) if objs else np.zeros((0, patch_codes.shape[1]), bool)
        if masks.size == 0:
            continue
        single = masks.sum(0) == 1
        hits, n = 0, 0
        for p in np.nonzero(single)[0]:
            o = objs[int(np.nonzero(masks[:, p])[0][0])]
            n += 1
            if float(val[i, p]) > 0 and labels[int(top[i, p])] in object_concepts(o):
                hits += 1
        if n:
            out[i] = hits / n
    return out


def interval(scores: np.ndarray) -> dict[str, float]:
    s = np.asarray(scores, float)
    s = s[np.isfinite(s)]
    if s.size == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    ci = bootstrap_ci(s)
    return {"mean": ci.mean, "low": ci.low, "high": ci.high, "n": ci.n}


def ratio_interval(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> dict[str, float]:
    """mean(a) / mean(b) with a paired percentile-bootstrap interval over images."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    num, den = a[idx].mean(1), b[idx].mean(1)
    r = np.where(den > 0, num / np.where(den > 0, den, 1), np.inf)
    point = float(a.mean() / b.mean()) if b.mean() > 0 else float("inf")
    return {"ratio": point, "low": float(np.quantile(r, 0.025)), "high": float(np.quantile(r, 0.975)), "n": int(a.size)}


# ---- patch-local edits --------------------------------------------------------------------------


def object_cells(obj: Mapping[str, Any], grid: int) -> list[tuple[int, int]]:
    """(row, col) cells of an object's patch mask (flattened row-major ``grid × grid``)."""
    m = np.asarray(obj["mask"], dtype=bool)
    if m.size != grid * grid:
        raise ValueError(f"object mask has {m.size} cells but the patch grid is {grid}×{grid}; use the world's patch grid")
    return [(int(i) // grid, int(i) % grid) for i in np.nonzero(m)[0]]


def patch_edit(layer: int, sae: Any, cells: Sequence[Sequence[tuple[int, int]]], zero: Bool[Tensor, "batch d_sae"],
               set_values: Float[Tensor, "batch d_sae"]) -> Any:
    """A batch of patch-local SAE edits as one ordinary intervention: prompt ``b``'s image tokens at
    ``cells[b]`` get the codes ``zero[b]`` set to 0 and the codes where ``set_values[b]`` is not NaN set to
    it, through the SAE with its error term (``x + decode(z') - decode(z)``), at the prefill step only;
    every other position is left bit for bit.  A :class:`jsae.Clamp` on :meth:`jsae.Patches.per_prompt`."""
    from jsae.interventions import Clamp, Patches

    if not (len(cells) == zero.shape[0] == set_values.shape[0]):
        raise ValueError(f"{len(cells)} cell lists, {zero.shape[0]} zero rows and {set_values.shape[0]} value rows: "
                         "give one of each per prompt")
    feats, vals = [], []
    for b in range(zero.shape[0]):
        keep = ~torch.isnan(set_values[b])
        fs = (zero[b] | keep).nonzero().flatten().tolist()
        feats.append(fs)
        vals.append([float(set_values[b, j]) if bool(keep[j]) else 0.0 for j in fs])
    return Clamp(layer=layer, positions=Patches.per_prompt(cells), timing="prefill", sae=sae, features=feats, strength=vals)


def edit_interventions(layer: int, sae: Any, cells: Sequence[tuple[int, int]], remove: Sequence[int],
                       add: Sequence[int] = (), add_strength: float = 0.0) -> list[Any]:
    """The same edit for one image through jsae's public interventions: ``Ablate`` of ``remove`` then
    ``Clamp`` of ``add`` at ``add_strength``, both on ``jsae.Patches(cells)`` at the prefill step."""
    from jsae.interventions import Ablate, Clamp, Patches

    pos = Patches(tuple(cells))
    ivs: list[Any] = []
    if remove:
        ivs.append(Ablate(layer=layer, positions=pos, timing="prefill", sae=sae, features=list(remove)))
    if add:
        ivs.append(Clamp(layer=layer, positions=pos, timing="prefill", sae=sae, features=list(add), strength=add_strength))
    return ivs


__all__ = [
    "context_concepts", "label_from_top_examples", "label_summary", "labels_from_explanations", "load_neuronpedia_explanations",
    "edit_interventions", "image_concepts", "interval", "label_latents_from_patches",
    "label_latents_from_text", "label_latents_from_words", "localisation_scores", "token_concepts", "matching_scores", "object_cells", "object_concepts",
    "patch_edit", "ratio_interval",
]
