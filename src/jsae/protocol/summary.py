"""Summaries of dose–response curves (:class:`jsae.protocol.sweep.Curve`) with intervals that resample
**images and concepts together**.

One bootstrap draw reweights every image of the sweep (multinomial counts over the union of the curves'
images, so an image's scores in every concept, layer, method and strength move together) and every
concept (multinomial counts over concepts); a curve's mean at a strength is the weighted mean over its own
images, a summary over concepts the weighted mean over concepts.  Per curve:

- ``r50``: the strength where the mean effect first reaches 0.5, interpolated in log strength; ``inf``
  ("not reached") is a value;
- ``effect_small``: the effect at strength ``small`` (1 × the per-token state norm by default);
- ``effect_matched``: the effect at the strongest point that keeps ``level`` of the other objects
  (preservation interpolated in log strength).

Per (measure, positions, direction, layer), over concepts: the geometric-mean r50 of the concepts that
reach it, ``log2_vs_oracle`` (the mean log2 ratio of r50 to the oracle's, r50 censored at twice the top of
the grid so that "not reached" counts), the mean ``effect_small`` and ``effect_matched``.  Comparisons
(paired by concept and image) get bootstrap p-values, Holm-corrected with the rest of the run's tests.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from jsae.protocol.stats import summary_from_means, weighted_means

TARGET, SMALL, LEVEL = 0.5, 1.0, 0.75


class Bootstrap:
    """Shared image and concept weights for every curve of a run (row 0: the point estimate, weights 1)."""

    def __init__(self, curves: Sequence[Any], n_boot: int = 400, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        ids = sorted({int(i) for c in curves for i in c.image_ids})
        self.col = {i: k for k, i in enumerate(ids)}
        n = max(len(ids), 1)
        self.W = np.vstack([np.ones((1, n)), rng.multinomial(n, np.full(n, 1 / n), size=n_boot)])
        self.concepts = sorted({c.concept for c in curves})
        C = max(len(self.concepts), 1)
        self.Wc = np.vstack([np.ones((1, C)), rng.multinomial(C, np.full(C, 1 / C), size=n_boot)])

    def curve(self, c: Any) -> dict[str, np.ndarray]:
        """Per draw (row 0 = point): mean effect / preservation per strength, r50, effect_small, effect_matched."""
        w = self.W[:, [self.col[int(i)] for i in c.image_ids]]
        eff, pres = weighted_means(np.asarray(c.effect, float), np.asarray(c.preservation, float), w)
        s = np.asarray(c.strengths, float)
        if len(s) == 1:  # a clamp: one point
            return {"effect": eff, "preservation": pres, "effect_small": eff[:, 0], "r50": np.full(len(eff), np.nan),
                    "effect_matched": eff[:, 0]}
        d = summary_from_means(s, eff, pres, TARGET, SMALL, LEVEL)
        return {"effect": eff, "preservation": pres, "r50": d["r50"], "effect_small": d["effect_at_small"],
                "effect_matched": d["effect_at_preservation"]}

    def over_concepts(self, values: dict[str, np.ndarray]) -> np.ndarray:
        """``values[concept]`` ``[B+1]`` → the concept-weighted mean per draw (NaN concepts dropped)."""
        cols = [self.concepts.index(c) for c in values]
        V = np.stack([values[c] for c in values], 1)
        wc = self.Wc[:, cols] * ~np.isnan(V)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.nansum(np.nan_to_num(V) * wc, 1) / wc.sum(1)


def _interval(draws: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None]:
    d = draws[1:]
    d = d[~np.isnan(d)]
    if len(d) == 0:
        return None, None
    a = (1 - level) / 2
    lo, hi = np.quantile(d, [a, 1 - a], method="inverted_cdf")  # order statistics: inf ends stay inf
    return float(lo), float(hi)


def _with_ci(out: dict[str, Any], key: str, draws: np.ndarray) -> None:
    v = draws[0]
    out[key] = None if np.isnan(v) else float(v)
    out[key + "_low"], out[key + "_high"] = _interval(draws)


def _boot_p(draws: np.ndarray) -> float | None:
    """Two-sided bootstrap p-value of ``draws[0] != 0``."""
    d = draws[1:]
    d = d[~np.isnan(d)]
    if len(d) == 0:
        return None
    return float(min(1.0, 2 * min(np.mean(d <= 0), np.mean(d >= 0)) + 1 / (len(d) + 1)))


def summarise_curves(curves: Sequence[Any], n_boot: int = 400, seed: int = 0) -> dict[str, Any]:
    """Per curve, per (measure, positions, key, layer) over concepts, per-strength bands for the plot, and
    the method comparisons (bootstrap p-values; Holm in :func:`jsae.protocol.stats.holm`)."""
    from jsae.protocol.stats import holm

    curves = [c for c in curves if len(c.image_ids)]
    if not curves:
        return {"curves": [], "rows": [], "bands": {}, "tests": {}, "level": LEVEL, "target": TARGET}
    bs = Bootstrap(curves, n_boot, seed)
    per = {id(c): bs.curve(c) for c in curves}
    cap = {}
    for c in curves:
        cap[(c.measure, c.layer)] = 2 * max(c.strengths)
    rows_c = []
    for c in curves:
        d = per[id(c)]
        r: dict[str, Any] = {"measure": c.measure, "positions": c.positions, "key": c.key, "layer": c.layer,
                             "concept": c.concept, "n_images": len(c.image_ids), "features": c.features,
                             "cos_oracle": c.cosine_to_oracle, "top_corr": c.feature_corr[0] if c.feature_corr else None,
                             "fluency_max": float(np.mean(c.fluent[-1])), "hallucination_max": float(np.mean(c.hallucinated[-1]))}
        for k in ("r50", "effect_small", "effect_matched"):
            _with_ci(r, k, d[k])
        r["p_not_reached"] = float(np.mean(np.isinf(d["r50"][1:]))) if c.measure != "clamp" else None
        # r50 at the grid's first strength: already reached there, so the true r50 is at most that (a floor)
        r["r50_at_floor"] = bool(c.measure != "clamp" and r["r50"] is not None and r["r50"] <= min(c.strengths))
        # the reference's per-image pick: each image's best strength chosen with the evaluation metric (optimistic)
        r["effect_best_alpha"] = float(np.mean(np.max(np.asarray(c.effect, float), 0))) if c.measure != "clamp" else None
        rows_c.append(r)
    groups: dict[tuple, list[Any]] = {}
    for c in curves:
        groups.setdefault((c.measure, c.positions, c.key, c.layer), []).append(c)
    oracle = {(c.measure, c.positions, c.layer, c.concept): c for c in curves if c.key == "oracle"}

    def log_r50(c: Any) -> np.ndarray:
        return np.log2(np.minimum(per[id(c)]["r50"], cap[(c.measure, c.layer)]))

    rows, bands, stash = [], {}, {}
    for (measure, pos, key, layer), cs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][3], kv[0][2])):
        row: dict[str, Any] = {"measure": measure, "positions": pos, "key": key, "layer": layer,
                               "concepts": [c.concept for c in cs]}
        for k in ("effect_small", "effect_matched"):
            _with_ci(row, k, bs.over_concepts({c.concept: per[id(c)][k] for c in cs}))
        if measure == "clamp":
            _with_ci(row, "preservation", bs.over_concepts({c.concept: per[id(c)]["preservation"][:, 0] for c in cs}))
        else:
            r50 = np.stack([per[id(c)]["r50"] for c in cs], 1)
            reached = np.isfinite(r50[0])
            row["reached"] = f"{int(reached.sum())}/{len(cs)}"
            row["at_floor"] = int(sum(float(r50[0, j]) <= min(c.strengths) for j, c in enumerate(cs)))
            with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # draws where no concept reaches +0.5
                g = np.where(np.isfinite(r50), np.log(r50), np.nan)
                geo = np.exp(np.nanmean(g, 1)) if reached.any() else np.full(len(r50), np.nan)
            _with_ci(row, "r50", geo)
            stash[(measure, pos, key, layer)] = {c.concept: (log_r50(c), bool(np.isfinite(per[id(c)]["r50"][0]))) for c in cs}
            # the ratio to the oracle only where the oracle itself reaches +0.5 (else there is nothing to compare with)
            ratios = {c.concept: log_r50(c) - log_r50(oracle[(measure, pos, layer, c.concept)]) for c in cs
                      if (measure, pos, layer, c.concept) in oracle
                      and np.isfinite(per[id(oracle[(measure, pos, layer, c.concept)])]["r50"][0])}
            if key != "oracle":
                row["oracle_reached"] = len(ratios)
                if ratios:
                    _with_ci(row, "log2_vs_oracle", bs.over_concepts(ratios))
            cos = [c.cosine_to_oracle for c in cs if c.cosine_to_oracle is not None]
            row["cos_oracle"] = float(np.mean(cos)) if cos else None
            if len(cs[0].strengths) > 1:
                K = len(cs[0].strengths)
                eff = np.stack([bs.over_concepts({c.concept: per[id(c)]["effect"][:, k] for c in cs}) for k in range(K)], 1)
                pres = np.stack([bs.over_concepts({c.concept: per[id(c)]["preservation"][:, k] for c in cs})
                                 for k in range(K)], 1)
                lo_hi = [_interval(eff[:, k]) for k in range(K)]
                bands.setdefault(measure, {}).setdefault(pos, {}).setdefault(key, {})[str(layer)] = {
                    "strengths": list(cs[0].strengths), "effect": eff[0].tolist(), "low": [x[0] for x in lo_hi],
                    "high": [x[1] for x in lo_hi], "preservation": [None if np.isnan(v) else float(v) for v in pres[0]]}
        rows.append(row)
    tests = _comparisons(stash, bs)
    adjusted = holm({k: v["p_value"] for k, v in tests.items() if v["p_value"] is not None})
    for k, v in tests.items():
        v["p_holm"] = adjusted.get(k)
    return {"curves": rows_c, "rows": rows, "bands": bands, "tests": tests, "level": LEVEL, "target": TARGET,
            "n_boot": n_boot}


#: the comparisons reported per (measure, positions, layer): a − b of log2 r50 (censored), paired by concept
COMPARISONS = (("jsae:text", "jsae-none:text"), ("jsae:vision", "jsae-none:vision"),
               ("jsae:vision", "saelens-topk:vision"), ("jsae:text", "saelens-topk:vision"), ("jsae:text", "oracle"),
               ("text-oracle:text", "oracle"), ("jsae:text", "text-oracle:text"))


def _comparisons(stash: dict[tuple, dict[str, tuple[np.ndarray, bool]]], bs: Bootstrap) -> dict[str, dict[str, Any]]:
    """``stash[(measure, positions, key, layer)][concept] = (censored log2 r50 per draw, reached at the point)``."""
    out: dict[str, dict[str, Any]] = {}
    for (measure, pos, key, layer), a in stash.items():
        if measure != "steering":
            continue
        for ka, kb in COMPARISONS:
            if key != ka or (measure, pos, kb, layer) not in stash:
                continue
            b = stash[(measure, pos, kb, layer)]
            # a concept neither direction moves to +0.5 on the grid says nothing about which needs less
            common = [c for c in a if c in b and (a[c][1] or b[c][1])]
            name = f"{measure}@{pos} L{layer}: log2 r50 {ka} − {kb}"
            if not common:
                out[name] = {"statistic": None, "low": None, "high": None, "p_value": None, "n": 0,
                             "note": "neither direction reaches +0.5 for any concept: not compared"}
                continue
            diff = bs.over_concepts({c: a[c][0] - b[c][0] for c in common})
            lo, hi = _interval(diff)
            out[name] = {
                "statistic": float(diff[0]), "low": lo, "high": hi, "p_value": _boot_p(diff), "n": len(common),
                "note": "bootstrap over images and concepts; r50 censored at 2× the grid top"}
    return out


def model_layer_interaction(runs: dict[str, dict[str, Any]], measure: str = "steering") -> dict[str, dict[str, Any]]:
    """Model × layer interaction of log2 r50 per direction, from the metrics of one run per model (same
    layers, concepts and grid): ``y[concept, model, layer]`` (r50 censored at 2× the grid top), tested with
    :func:`jsae.protocol.stats.interaction_signflip` (each concept's double-centred table sign-flipped),
    Holm-corrected across directions.  A direction that cannot be tested says why in ``note``."""
    from jsae.protocol.stats import holm, interaction_signflip

    models = list(runs)
    out: dict[str, dict[str, Any]] = {}
    if len(models) < 2:
        return {"all": {"p_value": None, "note": "needs at least two models"}}
    layer_sets = [tuple(runs[m]["layers"]) for m in models]
    keys = sorted({r["key"] for m in models for r in runs[m]["summary"]["curves"] if r["measure"] == measure})
    for key in keys:
        if len(set(layer_sets)) != 1:
            out[key] = {"p_value": None, "note": f"the models were swept at different layers {layer_sets}"}
            continue
        layers = layer_sets[0]
        concepts = sorted(set.intersection(*[{r["concept"] for r in runs[m]["summary"]["curves"]} for m in models]))
        y = np.full((len(concepts), len(models), len(layers)), np.nan)
        for j, m in enumerate(models):
            pos = (runs[m]["config"].get("positions") or ["image"])[0]
            grid_top = max(runs[m]["config"].get("alphas") or runs[m]["config"]["ratios"])
            for r in runs[m]["summary"]["curves"]:
                if (r["measure"], r["key"], r["positions"]) == (measure, key, pos) and r["concept"] in concepts:
                    r50 = r["r50"] if r["r50"] is not None else np.inf
                    y[concepts.index(r["concept"]), j, layers.index(r["layer"])] = np.log2(min(r50, 2 * grid_top))
        if len(layers) < 2 or len(concepts) < 2:
            out[key] = {"p_value": None, "note": "needs >= 2 layers and >= 2 concepts"}
            continue
        res = interaction_signflip(y)
        out[key] = {"statistic": float(res["statistic"]), "p_value": float(res["p_value"]),
                    "p_value_f": float(res["p_value_f"]), "n_concepts": int(res["n_concepts"]),
                    "mean_contrast": np.asarray(res["mean_contrast"]).round(3).tolist(), "models": models,
                    "layers": list(layers), "note": "log2 r50 censored at 2x the grid top; sign flips over concepts"}
    adj = holm({k: v["p_value"] for k, v in out.items() if v.get("p_value") is not None})
    for k, v in out.items():
        if k in adj:
            v["p_holm"] = adj[k]
    return out


__all__ = ["COMPARISONS", "Bootstrap", "model_layer_interaction", "summarise_curves"]
