"""World fidelity of VLMs on the embedded world (the gauges of ``jsae world fidelity``), one JSON per model.

    .venv/bin/python benchmarks/world_fidelity.py --model llava --model qwen3-vl-moe --label new

``--model`` takes a toy name or a model directory (an older world's models, or a real VLM); results go to
``benchmarks/results/world_fidelity/<label>-<model name>.json`` with the per-layer table beside them (``.md``).
``--cosines-only`` re-reads the scenes and writes the oracles' cosines (plain and count-matched) into an existing
result without generating (how the old world's results got their count-matched cosines).
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
    ap.add_argument("--cosines-only", action="store_true",
                    help="re-read the scenes (no generation) and write the oracle cosines, plain and count-matched, "
                         "into the existing <label>-<model>.json, keeping its steering and captions")
    a = ap.parse_args()
    if a.plot_only:
        return plot(a.out)
    torch.set_num_threads(a.threads)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.cosines_only:
        for m in a.model:
            update_cosines(m, a.out / f"{a.label}-{Path(m).name}.json", a.n_images)
        return plot(a.out)
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


def update_cosines(model: str, path: Path, n_images: int) -> None:
    """The oracle cosines (plain and count-matched) of ``model`` written into its earlier result ``path``."""
    from jsae.protocol.fidelity import oracle_cosines, read_world, summarise
    from jsae.vlm import load_vlm
    from jsae.world.data import iter_world
    from jsae.world.processors import CAPTION_PROMPT

    if not path.is_file():
        raise SystemExit(f"{path} does not exist; run this benchmark on {model} without --cosines-only first")
    r = json.loads(path.read_text())
    if r.get("n_images") != n_images:
        raise SystemExit(f"{path} was measured on {r.get('n_images')} scenes; pass --n-images {r.get('n_images')}")
    pairs = list(iter_world("validation", n_images, 0))
    read = read_world(load_vlm(model), [s for s, _ in pairs], CAPTION_PROMPT, progress=False)
    for L, rec in oracle_cosines(read, [it for _, it in pairs], [int(L) for L in r["oracles"]]).items():
        r["oracles"][L].update(rec)
    r["summary"] = summarise(r)
    r["cosines_updated"] = time.strftime("%Y-%m-%d")
    write_atomic(path, json.dumps(r, indent=1))
    write_atomic(path.with_suffix(".md"), f"# {path.stem}\n\n{fidelity_table(r)}\n\nsummary: `{json.dumps(r['summary'])}`\n")
    print(f"== {path.stem}: cosines updated\n{fidelity_table(r)}", flush=True)


def plot(out: Path) -> None:
    """fidelity.png: every result in ``out`` on one figure (old world dashed)."""
    from jsae.report.plots import plot_fidelity

    results = {f.stem: r for f in sorted(out.glob("*.json"))
               if "logit_lens" in (r := json.loads(f.read_text()))}  # other benchmarks' results sit beside them
    if results:
        print(f"wrote {plot_fidelity(results, out / 'fidelity.png')}")


if __name__ == "__main__":
    main()
