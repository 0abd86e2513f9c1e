"""The JSAE reference's experiment table on a run of the reference preset: every α on every image (sound), and
the reference's per-image upward walk with its faulty stopping rules replayed (``--reference-faults``).

The reference's table names latents by hand; here it is built from the run's own labels, the same way for every
concept: per layer and concept (the six types and six colours), the (up to) three JSAE latents labelled with the
concept, purest first; ``--n-images`` images of the world's test split *without* the concept; keyword = the
concept; target = "a cat" / "a red object".  Concepts with
no labelled latent at a layer are listed as skipped.

Offline there is no GPT-2 and no SBERT: perplexity is measured under the world's own text-only language model
(``llava-text-lm``, shipped), and without a similarity model the reference's rules (a) and (d) cannot fire —
the result says so; rule (b) (the sign-reversed perplexity rule) and (c) do.  Pass ``--similarity-model`` /
``--perplexity-model`` to use real ones.

    python benchmarks/reference_experiments.py --run RUN --model llava

RUN is a ``jsae demo --preset reference`` run with its SAEs (the committed ``benchmarks/results/reference/llava``
keeps results only; ``benchmarks/results/README.md`` names the command that rebuilds it).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path


def build_table(run: Path, layers: list[int] | None, n_images: int, method: str = "jsae") -> tuple[list[dict], list[dict]]:
    """Experiment rows (the reference's CSV columns) from ``run``'s labels, and the (layer, concept) pairs skipped."""
    from jsae.world.scenes import COLORS, TYPES
    from jsae.world.data import iter_world

    scenes = [scene for scene, _ in iter_world("test", 400, seed=0)]
    rows, skipped = [], []
    root = run / "saes" / method
    found = sorted(int(p.name.split("_")[1]) for p in root.glob("layer_*"))
    for layer in layers or found:
        labels = json.loads((root / f"layer_{layer}" / "labels.json").read_text())["labels"]
        for concept in [*TYPES, *COLORS]:
            mine = sorted((r for r in labels if r["label"] == concept), key=lambda r: -r["purity"])[:3]
            if not mine:
                skipped.append({"layer": layer, "concept": concept, "why": "no latent labelled with it"})
                continue
            kind = "type" if concept in TYPES else "colour"
            without = [i for i, s in enumerate(scenes)
                       if all((o.name if kind == "type" else o.color) != concept for o in s.objects)][:n_images]
            article = "an" if concept[0] in "aeiou" else "a"
            target = f"{article} {concept}" if kind == "type" else f"{article} {concept} object"
            rows.append({"name": f"L{layer}-{concept}", "layer": layer,
                         "latents": ";".join(str(r["feature"]) for r in mine), "keywords": concept, "target": target,
                         "image_ids": ";".join(map(str, without))})
    return rows, skipped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True, help="a run of `jsae demo --preset reference`")
    ap.add_argument("--model", default="llava")
    ap.add_argument("--layers", default=None, help="comma-separated (default: every layer of the run)")
    ap.add_argument("--n-images", type=int, default=8)
    ap.add_argument("--perplexity-model", default=None, help="default: the shipped toy text-only LM")
    ap.add_argument("--similarity-model", default=None)
    ap.add_argument("--alphas", default=None, help="comma-separated α grid (default: the reference's 0.2, 0.4, ..., 3.0)")
    ap.add_argument("--out", type=Path, default=None, help="default: RUN/experiments")
    args = ap.parse_args()
    from jsae.protocol.experiments import run_experiments, write_experiments_report
    from jsae.protocol.reference_metrics import LMPerplexity, SentenceSimilarity
    from jsae.protocol.reference import REFERENCE_ALPHAS
    from jsae.world.training import part_dir

    out = args.out or args.run / "experiments"
    out.mkdir(parents=True, exist_ok=True)
    layers = [int(x) for x in args.layers.split(",")] if args.layers else None
    rows, skipped = build_table(args.run, layers, args.n_images)
    table = out / "table.csv"
    with table.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["name", "layer", "latents", "keywords", "target", "image_ids"])
        w.writeheader()
        w.writerows(rows)
    ppl = LMPerplexity(args.perplexity_model or str(part_dir("lm")))
    sim = SentenceSimilarity(args.similarity_model) if args.similarity_model else None
    t0 = time.perf_counter()
    alphas = tuple(float(a) for a in args.alphas.split(",")) if args.alphas else REFERENCE_ALPHAS
    result = run_experiments(table, args.run, model=args.model, perplexity=ppl, similarity=sim, alphas=alphas,
                             reference_faults=True)
    result["table_skipped"] = skipped
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    result["perplexity_model"] = ppl.name
    paths = write_experiments_report(result, out)
    print(f"{len(rows)} experiments ({len(skipped)} skipped) in {result['seconds']} s: " + ", ".join(map(str, paths)),
          file=sys.stderr)


if __name__ == "__main__":
    main()
