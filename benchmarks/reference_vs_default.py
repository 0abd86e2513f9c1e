"""Steering under ``--preset reference`` against jsae's defaults on the same concepts and images.

Usage: python benchmarks/reference_vs_default.py DEFAULT_RUN REFERENCE_RUN [--out results.json]

Both runs' per-image scores are restricted to the images they share (the sweep takes the first images without
each concept, so a run with fewer images per concept is a prefix of one with more) and summarised the same way
(:func:`jsae.protocol.summary.summarise_curves`).  Strengths are put on one scale: the norm added per image
token divided by the layer's mean per-token image-state norm (the default grid's ``r``; the reference's
absolute ``α`` times the norm of its un-normalised direction).  Printed per (direction, layer): concepts that
reach +0.5, r50 on that scale, the effect at the strongest point, the effect at matched preservation.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from jsae.protocol.summary import summarise_curves
from jsae.protocol.sweep import Curve


def curves_of(run: Path, keep: dict[str, set[int]] | None = None) -> tuple[list[Curve], dict]:
    m = json.loads((run / "metrics.json").read_text())
    norms = {int(k): v for k, v in m["token_norms"].items()}
    out = []
    for c, sc in zip(m["curves"], m["scores"]):
        if c["measure"] != "steering":
            continue
        ids = list(sc["image_ids"])
        cols = [k for k, i in enumerate(ids) if keep is None or i in keep[c["concept"]]]
        eff = np.asarray(sc["effect"], float)[:, cols]
        pres = np.array([[np.nan if v is None else v for v in row] for row in sc["preservation"]], float)[:, cols]
        x = [a / norms[c["layer"]] for a in c["alphas"]]  # added norm in units of the per-token state norm
        out.append(Curve("steering", c["method"], c["decoder"], c["positions"], c["layer"], c["concept"], x, c["alphas"],
                         [ids[k] for k in cols], eff, pres, np.ones_like(eff, bool), np.zeros_like(eff, bool),
                         c["features"], c["feature_corr"], c["cosine_to_oracle"]))
    return out, m


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("default_run", type=Path)
    ap.add_argument("reference_run", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    d_curves, d_m = curves_of(args.default_run)
    r_curves, r_m = curves_of(args.reference_run)
    shared = {}
    for c in d_curves:
        other = {i for r in r_curves if r.concept == c.concept for i in r.image_ids}
        shared[c.concept] = set(c.image_ids) & other
    d_curves, _ = curves_of(args.default_run, shared)
    r_curves, _ = curves_of(args.reference_run, shared)
    table = {}
    for name, cs in (("default", d_curves), ("reference", r_curves)):
        s = summarise_curves(cs, n_boot=200)
        for c, row in zip(cs, s["curves"]):
            table.setdefault((row["key"], row["layer"]), {}).setdefault(name, []).append(
                {"concept": row["concept"], "r50": row["r50"], "max_effect": float(np.mean(c.effect[-1])),
                 "matched": row["effect_matched"]})
    rows = []
    print(f"{'direction':22s} {'layer':>5s} | {'default: reached  r50  max  matched':38s} | reference: reached  r50  max  matched")
    for (key, layer), by in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        line = {"key": key, "layer": layer}
        parts = []
        for name in ("default", "reference"):
            xs = by.get(name, [])
            r50 = [x["r50"] for x in xs if x["r50"] is not None and np.isfinite(x["r50"])]
            rec = {"reached": f"{len(r50)}/{len(xs)}", "r50_geo": float(np.exp(np.mean(np.log(r50)))) if r50 else None,
                   "max_effect": float(np.mean([x["max_effect"] for x in xs])) if xs else None,
                   "matched": float(np.nanmean([np.nan if x["matched"] is None else x["matched"] for x in xs])) if xs else None}
            line[name] = rec
            f = lambda v: "   –" if v is None else f"{v:5.2f}"  # noqa: E731
            parts.append(f"{rec['reached']:>7s} {f(rec['r50_geo'])} {f(rec['max_effect'])} {f(rec['matched'])}")
        rows.append(line)
        print(f"{key:22s} {layer:5d} | {parts[0]:38s} | {parts[1]}")
    n_img = {c: len(v) for c, v in shared.items()}
    print(f"shared images per concept: {n_img}")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "shared_images": n_img,
                                        "default_grid": d_m["config"]["ratios"], "reference_alphas": r_m["config"]["alphas"]},
                                       indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
