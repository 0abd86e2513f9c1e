"""Does the toy Qwen3-VL-MoE's feature-alignment stage decide how close its image and caption states are?

    # stages 1-2 of the shipped recipe, kept (≈ 40 min of one core; deterministic, so the shipped model's own)
    .venv/bin/python benchmarks/qwen_alignment_variants.py base --out RUNS
    # feature alignment from that checkpoint, one variant per call (8-25 min each)
    .venv/bin/python benchmarks/qwen_alignment_variants.py align --out RUNS --variant shipped   # 600 steps, merger
    .venv/bin/python benchmarks/qwen_alignment_variants.py align --out RUNS --variant longer    # 1,800 steps
    .venv/bin/python benchmarks/qwen_alignment_variants.py align --out RUNS --variant tower     # + the vision tower
    .venv/bin/python benchmarks/qwen_alignment_variants.py align --out RUNS --variant fresh     # merger re-initialised
    # the gauge: per decoder layer, the mean over types of the image-vs-text oracle cosine (as `jsae world
    # fidelity` computes it, 300 validation scenes) and each variant's caption quality
    .venv/bin/python benchmarks/qwen_alignment_variants.py gauge --out RUNS

The toy Qwen's text oracle steers its image tokens at layers 0-4 but the oracles' cosine there stays at
0.43-0.49 after fine-tuning (target 0.6; the toy LLaVA: 0.63-0.72).  Three ways a real recipe could differ are
tried at the feature-alignment stage, the stage where the projector learns to write into the frozen LM's input
space, and gauged *before* fine-tuning (fine-tuning moved the cosine by ≤ 0.04 in the shipped model):

* ``longer``: three times the shipped stage (the LLaVA papers' stage 1 is one epoch of 558-595k pairs);
* ``tower``: the vision tower trained with the merger, LM frozen (the Qwen-VL papers' first stage);
* ``fresh``: the merger re-initialised before the stage (in the toy, vision pretraining trains the merger with
  the tower, as its label heads read the merged tokens; Qwen3-VL's merger starts from scratch).

Results: ``benchmarks/results/world_fidelity/qwen_alignment_variants.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from jsae.files import write_atomic

OUT = Path(__file__).resolve().parent / "results" / "world_fidelity"
NAME = "qwen3-vl-moe"
VARIANTS = {"shipped": (600, set()), "longer": (1800, set()), "tower": (600, {"tower"}), "fresh": (600, {"fresh"})}


def base(out: Path) -> None:
    from jsae.world.training import default_config, train_toy_vlm

    cfg = default_config(NAME, finetune_steps=0, align_steps=0)
    train_toy_vlm(NAME, out / "base", cfg, threads=1, workers=0, progress=False, keep_stages=True)


def _reinit(module: torch.nn.Module, std: float) -> None:
    """Linear layers N(0, std) with zero bias, LayerNorms to identity (transformers' own ``_init_weights`` skips
    parameters already loaded, so it cannot re-initialise them)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, torch.nn.LayerNorm):
                m.weight.fill_(1.0)
                m.bias.zero_()


def align(out: Path, variant: str) -> None:
    import jsae.world.training as T

    steps, modes = VARIANTS[variant]
    if "tower" in modes:  # the stage trains the tower as well as the merger(s)
        own = T.stage_parameters

        def stage_parameters(model, stage):
            ps = own(model, stage)
            if stage == "feature_alignment":
                seen = {id(p) for p in ps}
                ps = ps + [p for p in T.for_model(model).vision_tower.parameters() if id(p) not in seen]
            return ps

        T.stage_parameters = stage_parameters
    if "fresh" in modes:
        own_fa = T._ToyTraining.feature_alignment

        def feature_alignment(self):
            torch.manual_seed(1234)
            std = float(self.model.config.vision_config.initializer_range)
            for m in T.for_model(self.model).projector_modules:
                _reinit(m, std)
            own_fa(self)

        T._ToyTraining.feature_alignment = feature_alignment
    cfg = T.default_config(NAME, text_steps=0, vision_steps=0, align_steps=steps, finetune_steps=0)
    init = out / "base.stage-vision_pretraining"
    if not init.is_dir():
        raise SystemExit(f"no vision-pretraining checkpoint at {init}: run `base --out {out}` first")
    T.train_toy_vlm(NAME, out / variant, cfg, threads=1, workers=0, progress=False, init_from=init)


def gauge(out: Path, dest: Path) -> None:
    from jsae.data.judges import WorldJudge
    from jsae.protocol.fidelity import read_world
    from jsae.vlm import load_vlm
    from jsae.world.data import iter_world
    from jsae.world.processors import CAPTION_PROMPT
    from jsae.world.scenes import TYPES

    pairs = list(iter_world("validation", 300, 0))
    scenes, items = [s for s, _ in pairs], [r for _, r in pairs]
    judge = WorldJudge()
    presence = judge.presence(items)
    res: dict[str, dict] = {}

    def cosines(model: str) -> dict[str, float]:
        read = read_world(load_vlm(model), scenes, CAPTION_PROMPT, progress=False)
        cos = {}
        for L in sorted(read["vision_pools"]):
            v, t = read["vision_pools"][L], read["text_pools"][L]
            per = []
            for c in TYPES:
                y = presence[:, judge.concepts.index(c)].bool()
                io, to = v[y].mean(0) - v[~y].mean(0), t[y].mean(0) - t[~y].mean(0)
                per.append(float(torch.nn.functional.cosine_similarity(io, to, dim=0)))
            cos[str(L)] = round(sum(per) / len(per), 3)
        return cos

    for variant in VARIANTS:
        path = out / variant
        if not path.is_dir():
            print(f"{variant}: no model at {path}, skipped", flush=True)
            continue
        t0 = time.time()
        cos = cosines(str(path))
        tr = json.loads((path / "training.json").read_text())
        val = tr.get("validation") or {}
        res[variant] = {"align_steps": VARIANTS[variant][0], "modes": sorted(VARIANTS[variant][1]),
                        "align_seconds": tr["seconds"]["feature_alignment"], "mean_cosine": cos,
                        "validation": {k: val.get(k) for k in ("object_accuracy", "type_recall", "no_hallucination")},
                        "final_loss": next((h["loss"] for h in reversed(tr.get("history", []))
                                            if h["stage"] == "feature_alignment"), None)}
        print(variant, json.dumps(cos), f"({time.time() - t0:.0f} s)", flush=True)
    shipped = {name: cosines(name) for name in ("qwen3-vl-moe", "llava")}  # the shipped models, fine-tuned
    load = os.getloadavg()
    record = {"model": NAME, "n_images": 300, "stage": "after feature alignment, before fine-tuning",
              "variants": res, "shipped_after_finetuning": shipped, "loadavg": [round(x, 2) for x in load]}
    dest.mkdir(parents=True, exist_ok=True)
    write_atomic(dest / "qwen_alignment_variants.json", json.dumps(record, indent=1))
    layers = sorted({L for r in res.values() for L in r["mean_cosine"]}, key=int)
    lines = ["# qwen3-vl-moe: feature-alignment variants, gauged before fine-tuning", "",
             "Mean over the six types of the image-vs-text oracle cosine per decoder layer (300 validation scenes), "
             "and caption quality on 100 validation images (`training.json`).", "",
             "| variant | steps | " + " | ".join(f"layer {L}" for L in layers) + " | type + colour | type | no hallucination | final loss |",
             "|---|---|" + "---|" * len(layers) + "---|---|---|---|"]
    for v, r in res.items():
        val = r["validation"]
        lines.append(f"| {v} | {r['align_steps']} | " + " | ".join(f"{r['mean_cosine'].get(L, float('nan')):.2f}" for L in layers)
                     + f" | {val['object_accuracy']} | {val['type_recall']} | {val['no_hallucination']} | {r['final_loss']} |")
    for name, cos in shipped.items():
        lines.append(f"| shipped {name}, fine-tuned (reference) | | " + " | ".join(f"{cos.get(L, float('nan')):.2f}" for L in layers)
                     + " | | | | |")
    write_atomic(dest / "qwen_alignment_variants.md", "\n".join(lines) + "\n")
    print(f"wrote {dest / 'qwen_alignment_variants.md'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=("base", "align", "gauge"))
    ap.add_argument("--out", type=Path, required=True, help="directory for the checkpoints")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="shipped")
    ap.add_argument("--results", type=Path, default=OUT)
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.what == "base":
        base(a.out)
    elif a.what == "align":
        align(a.out, a.variant)
    else:
        gauge(a.out, a.results)


if __name__ == "__main__":
    main()
