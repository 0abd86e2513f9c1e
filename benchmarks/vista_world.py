"""VISTA in the embedded world, the paper's way: the run behind benchmarks/results/vista_world/ (CPU, one thread).

    python benchmarks/vista_world.py OUT_DIR [--retrain-text-saes] [--steps N] [--model toy-text-lm|toy-dino-text-lm] [--edit-layer L]

Model: ``jsae.vista.compose_toy()`` — the toy *text-only* LM (the toy LLaVA's language model after its text stage
only) + the toy vision tower (after its vision-pretraining stage) + a new LLaVA projector.  Text SAEs: the shipped
release ``jsae-vista-toy-text-lm-text-sae`` (SAELens TopK, every layer, trained on that LM's per-token states of
plain-text captions; ``--retrain-text-saes`` trains them again, as the release was made), labelled from text.
Projectors: from scratch (same seed) for every setting — baseline λ=0; VISTA λ=1 on layer 4; on layers 0–4; on all
8 layers; on layer 4 with the raw-MSE loss — then evaluated on 300 held-out images (matching rate, localisation,
caption quality, patch-local removal / replacement against the text-labelled and the mask-labelled vision-only SAE).
Writes OUT_DIR/{report.md, metrics.json, edit_example.png, ...}; copy those three to benchmarks/results/vista_world/.
"""

import argparse
import json
import os
import time

import torch

from jsae.vista.experiment import RELEASE, EvalConfig, WorldVistaConfig, eval_world, train_world

torch.set_num_threads(1)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("out", nargs="?", default="runs/vista-world")
    ap.add_argument("--retrain-text-saes", action="store_true")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--model", default="toy-composed", choices=["toy-composed", "toy-text-lm", "toy-dino-text-lm"],
                    help="toy-composed: the toy LLaVA's own tower + LM recomposed; toy-text-lm: the paper's setup, the "
                         "text-only LM (never trained with images) + the pre-VLM tower (text SAEs are then always trained "
                         "on that LM); toy-dino-text-lm: the same LM + the DINOv2-style tower (no labels; jsae.world.dino)")
    ap.add_argument("--edit-layer", type=int, default=4,
                    help="the single-layer VISTA setting's layer and where patch-local edits act (the paper: a middle layer); "
                         "in the retrained world image tokens are read only in the first layers, so edits deeper than that "
                         "cannot change a caption for any method")
    args = ap.parse_args()
    t = time.time()
    load0 = os.getloadavg()
    cfg = WorldVistaConfig(model=args.model, n_train=1000, n_label=400,
                           text_sae=None if args.retrain_text_saes or args.model != "toy-composed" else RELEASE,
                           proj_steps=args.steps, batch_size=16, edit_layer=args.edit_layer)
    train_world(args.out, cfg, overwrite=True)
    t_train = time.time() - t
    m = eval_world(args.out, EvalConfig(n_eval=args.n_eval))
    wall = time.time() - t
    run = {"wall_s": round(wall, 1), "train_s": round(t_train, 1), "eval_s": round(wall - t_train, 1),
           "loadavg_start": load0, "loadavg_end": os.getloadavg(), "threads": torch.get_num_threads(), "cpus": os.cpu_count()}
    m["run"] = run
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(m, f, indent=2, default=str)
    with open(os.path.join(args.out, "report.md"), "a") as f:
        f.write(f"\nRun: {run['wall_s']:.0f} s wall ({run['train_s']:.0f} s training, {run['eval_s']:.0f} s evaluation) on "
                f"{run['threads']} torch thread of a {run['cpus']}-core machine shared with other jobs; load average "
                f"{run['loadavg_start'][0]:.1f} at the start, {run['loadavg_end'][0]:.1f} at the end.\n")
    print(f"done in {wall:.0f}s; see {args.out}/report.md")
