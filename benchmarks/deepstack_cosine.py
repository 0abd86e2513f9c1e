"""Why the toy Qwen3-VL-MoE's image and text oracles point apart at its early layers: DeepStack, measured.

    .venv/bin/python benchmarks/deepstack_cosine.py --model qwen3-vl-moe

Qwen3-VL adds a merger of an intermediate vision layer's features ("DeepStack") to the image tokens' residual
after the first decoder layer(s).  That addition is written by the vision side alone; no caption token carries
it.  This script reads the world's validation scenes as ``jsae world fidelity`` does and, per decoder layer and
type, gives the cosine of the image oracle (difference of mean image-token pools with / without the type) with
the text oracle (the same over caption-token pools):

* ``as is``: the model unchanged (the fidelity gauge's number);
* ``minus deepstack``: the image oracle less the DeepStack addition's own oracle (the same difference of means
  taken over the merger's output pooled per image), i.e. the part of the image oracle the DeepStack write does
  not account for (the residual-stream share of it).  A layer's state is read at the decoder layer's output,
  before the DeepStack addition that follows it, so the first layers carrying the addition are those after
  the mergers' count (``n/a`` before);
* ``deepstack off``: the model run with the DeepStack merger's output zeroed (an ablation: later layers change).

Also the norm of the DeepStack oracle relative to the image oracle.  Results go to
``benchmarks/results/world_fidelity/deepstack_cosine-<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from jsae.files import write_atomic

OUT = Path(__file__).resolve().parent / "results" / "world_fidelity"


def _mergers(model: torch.nn.Module) -> torch.nn.ModuleList:
    for name, mod in model.named_modules():
        if name.endswith("deepstack_merger_list"):
            return mod
    raise SystemExit("this model has no DeepStack mergers (deepstack_merger_list): the script is for Qwen3-VL models")


def oracles(pools_v: torch.Tensor, pools_t: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = present.bool()
    return pools_v[y].mean(0) - pools_v[~y].mean(0), pools_t[y].mean(0) - pools_t[~y].mean(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen3-vl-moe", help="toy name or model directory of a Qwen3-VL model")
    ap.add_argument("--n-images", type=int, default=300, help="validation scenes read")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    ap.add_argument("--out", type=Path, default=OUT)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from jsae.data.judges import WorldJudge
    from jsae.protocol.fidelity import read_world
    from jsae.vlm import load_vlm
    from jsae.world.data import iter_world
    from jsae.world.processors import CAPTION_PROMPT
    from jsae.world.scenes import TYPES

    t0 = time.time()
    vlm = load_vlm(a.model)
    model = vlm[0]
    mergers = _mergers(model)
    pairs = list(iter_world("validation", a.n_images, 0))
    scenes, items = [s for s, _ in pairs], [r for _, r in pairs]
    judge = WorldJudge()
    presence = judge.presence(items)
    n_tok = []  # image tokens per image, read from the processor's grid

    captured: list[torch.Tensor] = []

    def keep(_m, _i, out):  # the first merger's output, [image tokens of the batch, d]
        captured.append(out.detach().float().cpu())

    h = mergers[0].register_forward_hook(keep)
    try:
        read = read_world(vlm, scenes, CAPTION_PROMPT, progress=True)
    finally:
        h.remove()
    ds = torch.cat(captured)
    per_image = ds.shape[0] // len(scenes)
    if per_image * len(scenes) != ds.shape[0]:
        raise SystemExit("images do not all have the same number of image tokens; the script assumes one image size")
    n_tok.append(per_image)
    ds_pool = ds.view(len(scenes), per_image, -1).mean(1)

    @contextlib.contextmanager
    def deepstack_off():
        hs = [m.register_forward_hook(lambda _m, _i, out: torch.zeros_like(out)) for m in mergers]
        try:
            yield
        finally:
            for x in hs:
                x.remove()

    with deepstack_off():
        read_off = read_world(vlm, scenes, CAPTION_PROMPT, progress=True)

    cos = lambda x, y: float(torch.nn.functional.cosine_similarity(x, y, dim=0))  # noqa: E731
    layers = sorted(read["vision_pools"])
    res: dict[str, dict] = {}
    for L in layers:
        row: dict[str, dict] = {}
        for c in TYPES:
            y = presence[:, judge.concepts.index(c)]
            io, to = oracles(read["vision_pools"][L], read["text_pools"][L], y)
            ioff, toff = oracles(read_off["vision_pools"][L], read_off["text_pools"][L], y)
            dso = ds_pool[y.bool()].mean(0) - ds_pool[~y.bool()].mean(0)
            carried = L >= len(mergers)  # the addition follows decoder layers 0 .. mergers-1
            row[c] = {"as_is": round(cos(io, to), 4),
                      "minus_deepstack": round(cos(io - dso, to), 4) if carried else None,
                      "deepstack_off": round(cos(ioff, toff), 4), "deepstack_vs_text": round(cos(dso, to), 4),
                      "deepstack_norm_share": round(float(dso.norm() / io.norm()), 4) if carried else None}
        res[str(L)] = row
    out = {"model": str(a.model), "n_images": a.n_images, "image_tokens_per_image": per_image,
           "mergers": len(mergers), "per_layer": res, "seconds": round(time.time() - t0, 1),
           "load_average": os.getloadavg()}
    a.out.mkdir(parents=True, exist_ok=True)
    stem = f"deepstack_cosine-{Path(str(a.model)).name}"
    write_atomic(a.out / f"{stem}.json", json.dumps(out, indent=1))
    lines = [f"# Image vs text oracle cosine with and without DeepStack ({a.model}, {a.n_images} validation images)", "",
             "Mean over the six types (min–max). `minus deepstack`: image oracle less the DeepStack merger's own oracle; "
             "`deepstack off`: merger output zeroed; `ds · text`: cosine of the DeepStack oracle with the text oracle; "
             "`ds share`: its norm over the image oracle's. A layer is read at its output, before the DeepStack addition "
             "that follows the first layer(s).", "",
             "| layer | as is | minus deepstack | deepstack off | ds · text | ds share |", "|---|---|---|---|---|---|"]
    for L in layers:
        r = res[str(L)]
        def cell(k: str) -> str:
            vals = [v[k] for v in r.values()]
            if any(x is None for x in vals):
                return "n/a"
            return f"{np.mean(vals):.2f} ({min(vals):.2f}–{max(vals):.2f})"
        lines.append(f"| {L} | {cell('as_is')} | {cell('minus_deepstack')} | {cell('deepstack_off')} | "
                     f"{cell('deepstack_vs_text')} | {cell('deepstack_norm_share')} |")
    write_atomic(a.out / f"{stem}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
