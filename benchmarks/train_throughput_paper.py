"""Training throughput at the paper's size: d_in 4096, d_sae 16384 (two 4096 -> 16384 SAEs), against SAELens.

``python benchmarks/train_throughput_paper.py`` runs :func:`train_throughput.run` for ReLU + L1 (codes set to
density 0.02, see ``train_throughput.py``) and TopK (k=32), each at batch 8 pairs (the reference code's) and
2048 pairs (4096 did not fit in memory, see CONFIGS), JSAE's default training path against SAELens's
trainer of the same architecture in the same process (the plain-autograd JSAE is left out at this size: a
step of it takes minutes).  Few steps per kind
(each fit's first step is not timed), so each configuration takes a few minutes on 2 threads; the weights,
gradients and Adam moments of a JSAE at this size are 4.3 GB (fp32).  Results go to
``benchmarks/results/train_throughput_paper.json``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from train_throughput import format_report, run  # noqa: E402

CONFIGS = [  # (arch, batch pairs, steps per fit, rounds)
    ("relu", 8, 4, 2),
    ("topk", 8, 4, 2),
    ("relu", 2048, 2, 1),
    ("topk", 2048, 2, 1),
]
# 4096 pairs does not fit: SAELens's trainer on 8192 vectors x 16384 latents holds a dozen [8192, 16384] fp32
# activations (0.5 GB each); the run was OOM-killed at 18 GB resident on the 24 GB machine.


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="JSAE vs SAELens training throughput at the paper's size")
    p.add_argument("--d-in", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--density", type=float, default=0.02)
    p.add_argument("--only", default=None, help="e.g. relu:4096 to run one configuration")
    p.add_argument("--out", default="benchmarks/results/train_throughput_paper.json")
    a = p.parse_args(argv)
    from jsae.files import write_json

    results: dict[str, Any] = {}
    if Path(a.out).exists():  # keep the other configurations' results when re-running one
        import json

        results = json.loads(Path(a.out).read_text())
    for arch, batch, steps, rounds in CONFIGS:
        if a.only and a.only != f"{arch}:{batch}":
            continue
        kinds = ("saelens-standard", "jsae-relu") if arch == "relu" else ("saelens-topk", "jsae-topk")
        out = run(arch, a.d_in, a.d_sae, batch=batch, steps=steps, rounds=rounds, warmup=0, threads=a.threads,
                  density=a.density if arch == "relu" else None, kinds=kinds, pool_rows=max(2048, 2 * batch))
        print(format_report(out), flush=True)
        results[f"{arch}:{batch}"] = out
        write_json(a.out, results)
    print(f"wrote {a.out}")
    return results


if __name__ == "__main__":
    main()
