"""How many latents the world's pooled activations can keep alive: the protocol's methods trained at several
widths on one capture, dead latents and the ``converged`` check per width, beside the data's effective dimension.

The protocol counts a latent dead when it never fires on the held-out labelling pairs and calls an SAE converged
below 10% dead (and a late loss plateau).  If the number of *alive* latents stops growing with the width, the
dead ones at 4 × d_in are latents the data has no use for, not a training failure.

    python benchmarks/sae_width.py --capture RUN/capture --layer 2 --out benchmarks/results/sae_width/llava-l2.json

``RUN`` is a ``jsae demo`` run directory (its ``capture/train`` and ``capture/label``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch


def effective_dims(x: torch.Tensor, shares=(0.9, 0.95, 0.99, 0.999)) -> dict[str, int]:
    """Principal components needed for each share of the variance."""
    x = x.float() - x.float().mean(0)
    s = torch.linalg.svdvals(x) ** 2
    c = torch.cumsum(s, 0) / s.sum()
    return {f"{q:g}": int((c < q).sum()) + 1 for q in shares}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--capture", type=Path, required=True, help="a demo run's capture folder (train/ and label/)")
    ap.add_argument("--layer", type=int, required=True)
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--methods", default="jsae,jsae-none,saelens-topk")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from jsae.capture import read_layer
    from jsae.files import write_json
    from jsae.protocol.methods import train_methods
    from jsae.protocol.stages import sae_metrics

    v, t, _ = read_layer(args.capture / "train", args.layer)
    vl, tl, _ = read_layer(args.capture / "label", args.layer)
    v, t, vl, tl = v.float(), t.float(), vl.float(), tl.float()
    out = {"capture": str(args.capture), "layer": args.layer, "n_train": len(v), "n_label": len(vl), "d_in": v.shape[1],
           "steps": args.steps, "effective_dims": {"vision": effective_dims(v), "text": effective_dims(t)}, "rows": [],
           "load_average_1min_at_start": round(os.getloadavg()[0], 2)}
    methods = [m for m in args.methods.split(",") if m]
    for width in (int(w) for w in args.widths.split(",")):
        t0 = time.perf_counter()
        trained = train_methods(v, t, layer=args.layer, d_sae=width, steps=args.steps, batch_size=128, lr=3e-3, seed=0,
                                methods=methods, metadata={}, revival=True)
        for name, m in trained.items():
            r = sae_metrics(m, vl, tl)
            row = {"d_sae": width, "method": name, **{k: r[k] for k in r if k.startswith(("fvu_", "l0_", "dead_"))},
                   "loss_drop_last_quarter": r["loss_drop_last_quarter"], "converged": r["converged"]}
            for mod in ("vision", "text"):
                if f"dead_{mod}" in r:
                    row[f"alive_{mod}"] = width - r[f"dead_{mod}"]
            out["rows"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
        print(f"d_sae {width}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    out["load_average_1min_at_end"] = round(os.getloadavg()[0], 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, out)


if __name__ == "__main__":
    main()
