"""World fidelity of VLMs on the embedded world (the gauges of ``jsae world fidelity``), one JSON per model.

    .venv/bin/python benchmarks/world_fidelity.py --model llava --model qwen3-vl-moe --label new

``--model`` takes a toy name or a model directory (an older world's models, or a real VLM); results go to
``benchmarks/results/world_fidelity/<label>-<model name>.json`` with the per-layer table beside them (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from jsae.files import write_atomic
from jsae.protocol.fidelity import world_fidelity
from jsae.report.markdown import fidelity_table

OUT = Path(__file__).resolve().parent / "results" / "world_fidelity"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="toy name or model directory (repeatable)")
    ap.add_argument("--label", default="new", help="prefix of the result files (e.g. old / new)")
    ap.add_argument("--n-images", type=int, default=300, help="validation scenes read for the lens and the oracles")
    ap.add_argument("--n-steer", type=int, default=8, help="images per type steered (without the type)")
    ap.add_argument("--n-captions", type=int, default=300, help="test scenes captioned for caption quality")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--plot-only", action="store_true", help="only redraw fidelity.png from the JSON files in --out")
    a = ap.parse_args()
    if a.plot_only:
        return plot(a.out)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    for m in a.model:
        load = os.getloadavg()
        t0 = time.time()
        r = world_fidelity(m, n_images=a.n_images, n_steer=a.n_steer, n_captions=a.n_captions)
        r["load_average_before"] = [round(x, 2) for x in load]
        r["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        tag = f"{a.label}-{Path(m).name}"
        write_atomic(a.out / f"{tag}.json", json.dumps(r, indent=1))
        table = fidelity_table(r)
        write_atomic(a.out / f"{tag}.md", f"# {tag}\n\n{table}\n\nsummary: `{json.dumps(r['summary'])}`\n")
        print(f"== {tag} ({time.time() - t0:.0f}s)\n{table}\n{json.dumps(r['summary'])}", flush=True)
    plot(a.out)


def plot(out: Path) -> None:
    """fidelity.png: every result in ``out`` on one figure (old world dashed)."""
    from jsae.report.plots import plot_fidelity

    results = {f.stem: json.loads(f.read_text()) for f in sorted(out.glob("*.json"))}
    if results:
        print(f"wrote {plot_fidelity(results, out / 'fidelity.png')}")


if __name__ == "__main__":
    main()
