"""VISTA in the embedded world: the run behind the figures in the VISTA report (CPU, ~7 min on 2 shared cores).

    python benchmarks/vista_world.py OUT_DIR

Reuses the shipped text SAEs (release ``jsae-vista-toy-llava-text-sae``; drop ``text_sae=`` to retrain them),
trains four projectors from the same (shipped) weights for 250 steps each — baseline λ=0, VISTA λ=1 on
layer 4, VISTA λ=1 on layers 2,4,6, VISTA λ=5 on layer 4 — and evaluates on 300 held-out images.
"""

import sys
import time

import torch

from jsae.vista.experiment import EvalConfig, WorldVistaConfig, eval_world, train_world

torch.set_num_threads(1)

if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "runs/vista-world"
    t = time.time()
    cfg = WorldVistaConfig(n_train=1000, n_label=400, text_sae="jsae-vista-toy-llava-text-sae", proj_steps=250, batch_size=16,
                           settings=(("baseline", 0.0, ()), ("vista-l4", 1.0, (4,)), ("vista-l246", 1.0, (2, 4, 6)),
                                     ("vista-l4-lam5", 5.0, (4,))))
    train_world(out, cfg, overwrite=True)
    m = eval_world(out, EvalConfig(n_eval=300))
    print(f"done in {time.time() - t:.0f}s; see {out}/report.md")
