"""VISTA's measures: the matching rate, localisation precision, and patch-local object removal /
replacement.

**Matching rate** (our precise definition; the paper publishes none).  For image ``i`` and layer ``l``,
let ``m_i = mean over the image's tokens t of SAE_l.encode(h_l,t)`` (``[d_sae]``).  Take the ``k``
latents with the largest ``m_i`` among those with ``m_i > 0`` (fewer when fewer are active).  The
image's score is ``#{top latents whose label is a concept present in image i} / k``: unlabelled latents
and missing (inactive) slots count as misses, so a projector cannot score by silencing the SAE.  A
latent's label comes from text only (the concept word it fires on; :func:`label_latents_from_text`).
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
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from beartype import beartype
from jaxtyping import Bool, Float, jaxtyped
from torch import Tensor

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


# ---- matching rate and localisation -------------------------------------------------------------


@jaxtyped(typechecker=beartype)
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


@jaxtyped(typechecker=beartype)
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
    "edit_interventions", "image_concepts", "interval", "label_latents_from_patches",
    "label_latents_from_text", "label_latents_from_words", "localisation_scores", "token_concepts", "matching_scores", "object_cells", "object_concepts",
    "patch_edit", "ratio_interval",
]
