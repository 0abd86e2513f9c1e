"""Quality of the shipped toy VLMs on held-out world scenes (issue 5, item 5).

Measures, on ``--n`` test-split scenes per model (default 500), with greedy decoding:
- object accuracy of captions: each object's type and colour named correctly (at its position);
- captions with no hallucinated object (no object type named that is not in the image);
- QA accuracy, describe-then-answer (the trained protocol: the model captions the image, then answers the
  question that follows its own caption) and, with ``--direct-qa``, questions asked right after the image.

Usage: python benchmarks/world_quality.py [--n 500] [--models llava qwen3-vl-moe] [--models-dir DIR] [--out results.json]
(``--models`` defaults to every toy model, ``jsae.world.models.MODEL_NAMES``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="held-out test scenes per model")
    ap.add_argument("--models", nargs="+", default=None, help="toy models (default: all of them)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--direct-qa", action="store_true", help="also measure QA without the caption first")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--models-dir", default=None, help="parent directory of trained models (default: the shipped ones)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from jsae.files import write_json
    from jsae.world.evaluate import evaluate
    from jsae.world.models import MODEL_NAMES, load_toy_hf, model_dir

    results = {}
    for name in args.models or MODEL_NAMES:
        where = model_dir(name) if args.models_dir is None else os.path.join(args.models_dir, name)
        model, processor = load_toy_hf(name, directory=where)
        t0 = time.time()
        r = evaluate(model, processor, name, n=args.n, split=args.split, seed=args.seed, direct_qa=args.direct_qa)
        r["eval_seconds"] = round(time.time() - t0, 1)
        info = Path(where) / "training.json"
        if info.exists():
            tr = json.loads(info.read_text())
            r["training_json"] = {k: tr.get(k) for k in ("seconds", "total_seconds", "device", "init_from")}
        r["params"] = sum(p.numel() for p in model.parameters())
        results[name] = r
        print(json.dumps({name: r}), flush=True)
    print()
    print("| model | images | object accuracy | no hallucination | QA (describe-then-answer) | QA direct | exact captions |")
    print("|---|---|---|---|---|---|---|")
    for name, r in results.items():
        d = "—" if r["qa_accuracy_direct"] is None else f"{100 * r['qa_accuracy_direct']:.1f}%"
        print(f"| {name} | {r['n_images']} | {100 * r['object_accuracy']:.1f}% | {100 * r['no_hallucination']:.1f}% | "
              f"{100 * r['qa_accuracy']:.1f}% ({r['n_questions']} q) | {d} | {100 * r['captions_exact']:.1f}% |")
    if args.out:
        write_json(args.out, results)


if __name__ == "__main__":
    main()
