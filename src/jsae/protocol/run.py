"""``jsae demo``: the JSAE protocol end to end on one VLM (by default the shipped toy LLaVA).

Writes into ``out``: ``capture/`` (pooled pairs at every layer), ``saes/<method>/layer_<L>/`` (SAELens
directories), ``labels/``, ``metrics.json`` (schema in the README), ``report.md``, ``layer_sweep.png``
and ``features.html``; ``run.json`` records the configuration so that a directory holding another run is
refused unless ``overwrite``.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from jsae.labels import FeatureLabels, label_features
from jsae.adapters.base import GRID_COL, GRID_REGION, GRID_ROW
from jsae.protocol.methods import METHODS, Method, train_methods
from jsae.data.judges import CaptionJudge, Judge, WorldJudge, text_perplexity
from jsae.protocol.sweep import Cell, SweepConfig, run_sweep
from jsae.protocol.stats import summarise
from jsae.files import write_json
from jsae.report.plots import feature_browser, markdown_table, plot_layer_sweep

ARTEFACTS = ("report.md", "metrics.json", "layer_sweep.png", "features.html")


@dataclass
class DemoConfig:
    model: str = "llava"
    n_train: int = 2000
    n_label: int = 400
    n_eval: int = 1200
    layers: list[int] | None = None  # default: 4 layers spread over the depth
    n_sweep_layers: int = 4
    concepts: list[str] | None = None  # default: the object types with a shared JSAE feature at every layer
    max_concepts: int = 2
    methods: tuple[str, ...] = METHODS
    d_sae: int = 128
    steps: int = 600
    batch_size: int = 128
    lr: float = 3e-3
    n_start: int = 200
    n_max: int = 400  # 385 images give ±0.05 at the worst-case rate 0.5
    halfwidth: float = 0.05
    gen_batch: int = 200
    max_new_tokens: int = 28
    seed: int = 0
    data: str | None = None  # a COCO-captions-style dataset (path or hub id); required for a real VLM
    data_split: str = "train"
    prompt: str | None = None  # captioning prompt; default "" on the world, "Describe the image." on real data
    min_count: int = 5  # real data: a caption word is a concept when it occurs in this many labelling captions
    max_perplexity: float | None = None  # real data: fluency threshold (default 1.5x the unsteered 95th percentile)

    def key(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items()}


def _check_out(out: Path, cfg: DemoConfig, overwrite: bool) -> None:
    run = out / "run.json"
    if out.exists() and any(out.iterdir()):
        if not run.exists() and not overwrite:
            raise FileExistsError(f"{out} is not empty and holds no jsae run; choose a new --out or pass --overwrite")
        if run.exists():
            old = json.loads(run.read_text()).get("config")
            if old != json.loads(json.dumps(cfg.key())) and not overwrite:
                raise FileExistsError(f"{out} holds another run (model {old.get('model')!r}); "
                                      "pass --overwrite to replace it or choose a new --out")
        if overwrite:
            shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(run, {"config": cfg.key(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")})


def load_model(name: str) -> tuple[Any, Any, Any, bool]:
    """(model, processor, adapter, is_world_model)."""
    from jsae.vlm import load_vlm
    from jsae.world import MODEL_NAMES

    model, processor, adapter = load_vlm(name)
    return model, processor, adapter, name in MODEL_NAMES


def default_layers(n_layers: int, k: int) -> list[int]:
    return sorted({int(round(x)) for x in np.linspace(0, n_layers - 1, k)})


def make_captioner(model: Any, processor: Any, adapter: Any, cfg: DemoConfig):
    """(images, interventions) -> greedy captions, in batches, through ``jsae.generate``."""
    from jsae.interventions import generate

    text = cfg.prompt if cfg.prompt is not None else ("" if cfg.data is None and cfg.model in _world_names() else
                                                          "Describe the image.")
    prompt = adapter.render_prompt(processor, text, 1, add_generation_prompt=True)
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"

    def caption(images: list[Any], interventions: list[Any]) -> list[str]:
        out: list[str] = []
        for i in range(0, len(images), cfg.gen_batch):
            chunk = images[i:i + cfg.gen_batch]
            enc = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt", padding=True)
            enc = adapter.complete_inputs(enc)
            out += generate(model, enc, interventions, max_new_tokens=cfg.max_new_tokens, processor=processor,
                            adapter=adapter)
        return [c.strip() for c in out]

    return caption


def run_demo(out: str | Path, cfg: DemoConfig | None = None, overwrite: bool = False, progress: bool = True,
             scores_out: bool = False) -> dict[str, Any]:
    """Run the protocol into ``out``; returns the metrics (with the cells under ``"_cells"`` if ``scores_out``)."""
    from jsae.capture import capture_pairs
    from jsae.training import load_pairs
    from jsae import world
    from jsae.interventions import Ablate, Steer

    cfg = cfg or DemoConfig()
    if cfg.model in world.MODEL_NAMES and cfg.data is None and cfg.concepts:
        _check_concepts(cfg.concepts, WorldJudge().concepts, "the world's")
    if cfg.model not in world.MODEL_NAMES and cfg.data is None:
        raise ValueError(f"{cfg.model!r} is not a shipped toy model ({', '.join(world.MODEL_NAMES)}): pass --data with a "
                         "COCO-captions-style dataset (path or hub id) to run the protocol on it")
    out = Path(out)
    _check_out(out, cfg, overwrite)
    t0 = time.time()
    timings: dict[str, float] = {}
    model, processor, adapter, _ = load_model(cfg.model)
    n_layers = adapter.n_layers
    layers = cfg.layers or default_layers(n_layers, cfg.n_sweep_layers)
    for layer in layers:
        adapter.check_layer(layer)

    # 1. data and capture at every layer
    splits, test = _load_splits(cfg)
    caps = {}
    for split, ds in splits.items():
        pairs = [(ex["image"], ex["caption"]) for ex in ds]
        where = f"data:{cfg.data}:{cfg.data_split}" if cfg.data else "world"
        caps[split] = capture_pairs(model, pairs, layers=list(range(n_layers)), out_dir=out / "capture" / split,
                                    processor=processor, adapter=adapter, batch_size=64, progress=progress,
                                    fingerprint=f"{where}:{split}:{len(pairs)}:{cfg.seed}")
    timings["capture_s"] = time.time() - t0

    # 2. train every method at every swept layer; 3. label its features on held-out pairs
    judge = _judge(cfg, model, processor, splits["label"])
    if cfg.concepts:
        _check_concepts(cfg.concepts, judge.concepts, "the labelling data's")
    concepts_all = judge.concepts
    y_label = judge.presence(list(splits["label"]))
    methods_by_layer: dict[int, dict[str, Method]] = {}
    labels_by_layer: dict[int, dict[str, FeatureLabels]] = {}
    sae_rows: list[dict[str, Any]] = []
    norms: dict[int, float] = {}
    for layer in tqdm(layers, desc="training SAEs", disable=not progress):
        v, t = _tensors(load_pairs(caps["train"], layer, batch_size=1))
        vl, tl = _tensors(load_pairs(caps["label"], layer, batch_size=1))
        norms[layer] = float(v.norm(dim=-1).mean())
        meta = {"model_name": cfg.model, "hook_name": adapter.hook_name(layer), "pooling": "mean"}
        methods = train_methods(v, t, layer=layer, d_sae=cfg.d_sae, steps=cfg.steps, batch_size=cfg.batch_size,
                                lr=cfg.lr, seed=cfg.seed, methods=cfg.methods, metadata=meta)
        methods_by_layer[layer], labels_by_layer[layer] = methods, {}
        for name, m in methods.items():
            zv = m.codes(vl, "vision")
            zt = m.codes(tl, "text") if m.joint else torch.zeros_like(zv)
            labels = label_features(zv, zt, y_label, concepts_all)
            labels_by_layer[layer][name] = labels
            d = out / "saes" / name / f"layer_{layer}"
            m.sae.save_model(d) if m.joint else m.sae.save_model(str(d))
            labels.save(d / "labels.json")
            sae_rows.append({"layer": layer, "method": name, **_sae_metrics(m, vl, tl), **labels.counts()})
    timings["train_label_s"] = time.time() - t0 - timings["capture_s"]

    # 4. the sweep, on held-out test images
    images, items = [ex["image"] for ex in test], list(test)
    if cfg.concepts:
        labelled = sorted({lab.label for L in layers for lab in labels_by_layer[L]["jsae"].labels
                           if lab.label and lab.kind == "shared"})
        missing = [c for c in cfg.concepts if c not in labelled]
        if missing:
            raise ValueError(f"no shared JSAE feature is labelled {missing} at layers {layers}; "
                             f"concepts with one: {labelled}")
    # a concept can be steered and suppressed only if some sweep images lack it and some have it
    rate = judge.presence(items).mean(0)
    eligible = [c for c, r in zip(judge.concepts, rate.tolist()) if 0.05 <= r <= 0.8]
    concepts = cfg.concepts or _pick_concepts(labels_by_layer, layers, cfg.max_concepts, eligible)
    if not concepts:
        raise RuntimeError("no concept has a shared JSAE feature at any swept layer; train longer (--steps) or wider (--d-sae)")
    captioner = make_captioner(model, processor, adapter, cfg)
    sweep_cfg = SweepConfig(layers=layers, concepts=concepts, methods=cfg.methods, n_start=cfg.n_start,
                            n_max=cfg.n_max, halfwidth=cfg.halfwidth)
    cells = run_sweep(
        captioner,
        lambda layer, direction, alpha: Steer(layer=layer, positions="image", timing="prefill", direction=direction,
                                              strength=alpha),
        lambda layer, sae, feats, modality: Ablate(layer=layer, positions="image", timing="prefill", sae=sae,
                                                   features=feats, sae_modality=modality),
        methods_by_layer, labels_by_layer, norms, images, items, sweep_cfg, progress=progress, judge=judge)
    timings["sweep_s"] = time.time() - t0 - timings["capture_s"] - timings["train_label_s"]

    # 5. report
    summary = summarise(cells)
    metrics = {
        "model": cfg.model, "data": cfg.data or "world", "judge": type(judge).__name__, "n_layers": n_layers,
        "layers": layers, "concepts": concepts, "methods": list(cfg.methods),
        "config": cfg.key(), "saes": sae_rows, "cells": [_cell_dict(c) for c in cells], "summary": summary,
        "timings": timings,
    }
    write_json(out / "metrics.json", metrics)
    plot_layer_sweep(summary, n_layers, out / "layer_sweep.png", title=f"{cfg.model}: steering vs suppression by layer")
    mid = layers[len(layers) // 2]
    feature_browser(_browser_features(model, processor, adapter, methods_by_layer[mid]["jsae"], labels_by_layer[mid]["jsae"],
                                      splits["label"], mid, cells), out / "features.html",
                    title=f"{cfg.model} layer {mid}: JSAE features")
    (out / "report.md").write_text(_report_md(metrics))
    timings["total_s"] = time.time() - t0
    write_json(out / "metrics.json", metrics)
    if scores_out:
        metrics["_cells"] = cells
    return metrics


def _world_names() -> tuple[str, ...]:
    from jsae import world

    return tuple(world.MODEL_NAMES)


def _check_concepts(asked: list[str], known: list[str], whose: str) -> None:
    unknown = [c for c in asked if c not in known]
    if unknown:
        raise ValueError(f"unknown concept(s) {unknown}; {whose} concepts are {known[:60]}")


def _load_splits(cfg: DemoConfig) -> tuple[dict[str, Any], Any]:
    """({"train", "label"} datasets, sweep dataset): world splits, or consecutive slices of ``cfg.data``."""
    from jsae.world import load_caption_dataset, world_dataset

    if cfg.data is None:
        return ({"train": world_dataset("train", cfg.n_train, cfg.seed),
                 "label": world_dataset("validation", cfg.n_label, cfg.seed)}, world_dataset("test", cfg.n_eval, cfg.seed))
    need = cfg.n_train + cfg.n_label + cfg.n_eval
    ds = load_caption_dataset(cfg.data, split=cfg.data_split, limit=need)
    if len(ds) < need:
        raise ValueError(f"{cfg.data!r} ({cfg.data_split}) has {len(ds)} rows but n_train + n_label + n_eval = {need}; "
                         "lower --n-train / --n-label / --n-eval or use a larger dataset")
    a, b = cfg.n_train, cfg.n_train + cfg.n_label
    return {"train": ds.select(range(a)), "label": ds.select(range(a, b))}, ds.select(range(b, need))


def _judge(cfg: DemoConfig, model: Any, processor: Any, label_ds: Any) -> Judge:
    """The world's exact judge, or on real data caption words as concepts and a perplexity fluency guard."""
    if cfg.data is None:
        return WorldJudge()
    from jsae.labels import concepts_from_captions

    _, words = concepts_from_captions([ex["caption"] for ex in label_ds], min_count=cfg.min_count)
    return CaptionJudge(words, lambda texts: text_perplexity(model, processor, texts), max_perplexity=cfg.max_perplexity)


def _tensors(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(data, "vision") and hasattr(data, "text"):
        return data.vision.float(), data.text.float()
    vs, ts = zip(*list(data))
    return torch.cat(vs).float(), torch.cat(ts).float()


@torch.no_grad()
def _sae_metrics(m: Method, v: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, x in (("vision", v), ("text", t)):
        if not m.joint and name == "text":
            continue
        z = m.codes(x, name)
        recon = m.sae.decode(z, name) if m.joint else m.sae.decode(z)
        out[f"fvu_{name}"] = float((recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        out[f"l0_{name}"] = float((z > 0).float().sum(-1).mean())
        out[f"dead_{name}"] = int((z.max(0).values <= 0).sum())
    if m.joint:
        zv, zt = m.codes(v, "vision"), m.codes(t, "text")
        out["paired_cosine"] = float(torch.nn.functional.cosine_similarity(zv, zt, dim=-1).mean())
    return out


def _pick_concepts(labels_by_layer: dict[int, dict[str, FeatureLabels]], layers: list[int], k: int,
                   concepts: list[str]) -> list[str]:
    """The concepts with a shared JSAE feature at the most swept layers (then the most features)."""
    scores = []
    for c in concepts:
        per_layer = [sum(lab.label == c and lab.kind == "shared" for lab in labels_by_layer[L]["jsae"].labels)
                     for L in layers]
        if any(per_layer):
            scores.append((-sum(n > 0 for n in per_layer), -sum(per_layer), c))
    return [c for *_, c in sorted(scores)[:k]]


def _cell_dict(c: Cell) -> dict[str, Any]:
    d = asdict(c)
    d.pop("scores")
    return d


@torch.no_grad()
def _browser_features(model: Any, processor: Any, adapter: Any, method: Method, labels: FeatureLabels, ds: Any,
                      layer: int, cells: list[Cell], n_features: int = 24, n_images: int = 4) -> list[dict[str, Any]]:
    """Per labelled feature: top images with the per-patch activation map, top captions, steering result."""
    items = [ds[i] for i in range(min(len(ds), 200))]
    images, captions = [ex["image"] for ex in items], [ex["caption"] for ex in items]
    states, image_mask, grid, caption_mask = _per_token_states(model, processor, adapter, images, captions, layer)
    sae = method.sae
    zv_tok = sae.encode(states, "vision")  # [B, S, d_sae]
    img_w = image_mask.float()
    zv = (zv_tok * img_w[..., None]).sum(1) / img_w.sum(1, keepdim=True).clamp(min=1)
    zt_tok = sae.encode(states, "text")
    cap_w = caption_mask.float()
    zt = (zt_tok * cap_w[..., None]).sum(1) / cap_w.sum(1, keepdim=True).clamp(min=1)
    steer = {(c.concept, tuple(c.features)): c for c in cells if c.measure == "steering" and c.method == "jsae" and c.layer == layer}
    chosen = sorted([lab for lab in labels.labels if lab.label], key=lambda lab: -(lab.vision_corr + lab.text_corr))[:n_features]
    feats = []
    for lab in chosen:
        j = lab.feature
        top_img = zv[:, j].argsort(descending=True)[:n_images].tolist()
        top_cap = zt[:, j].argsort(descending=True)[:n_images].tolist()
        tops = []
        for b in top_img:
            sel = image_mask[b] & (grid[b, :, GRID_ROW] >= 0) & (grid[b, :, GRID_REGION] == 0)
            g = grid[b][sel]
            heat = np.zeros((int(g[:, GRID_ROW].max()) + 1, int(g[:, GRID_COL].max()) + 1))
            for r, c_, a in zip(g[:, GRID_ROW].tolist(), g[:, GRID_COL].tolist(), zv_tok[b][sel][:, j].tolist()):
                heat[r, c_] = max(heat[r, c_], a)
            tops.append((images[b], heat))
        st = next((c for (concept, fs), c in steer.items() if j in fs), None)
        feats.append({"feature": j, "layer": layer, "label": lab.label, "kind": lab.kind, "purity": lab.purity,
                      "top_images": tops, "top_captions": [captions[b] for b in top_cap],
                      "steering": None if st is None else f"'{st.concept}' {st.mean:+.2f} [{st.low:+.2f}, {st.high:+.2f}] at α={st.alpha:.1f}"})
    return feats


@torch.no_grad()
def _per_token_states(model: Any, processor: Any, adapter: Any, images: list[Any], captions: list[str], layer: int,
                      batch: int = 50) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token states of decoder layer ``layer`` for (image, caption) pairs, with the image mask, patch
    grid and caption mask of each token (a plain forward hook on the adapter's layer module)."""
    from jsae.adapters import unwrap

    hf, outs = unwrap(model), []
    for i in range(0, len(images), batch):
        enc = adapter.build_inputs(processor, images[i:i + batch], captions[i:i + batch])
        got: list[torch.Tensor] = []
        handle = adapter.layer_module(layer).register_forward_hook(
            lambda mod, args, output: got.append(output[0] if isinstance(output, tuple) else output))
        try:
            hf(**adapter.model_kwargs(enc))
        finally:
            handle.remove()
        outs.append((got[0].float(), adapter.image_token_mask(enc), adapter.patch_grid(enc), enc["caption_mask"]))
    width = max(o[0].shape[1] for o in outs)

    def pad(x: torch.Tensor, value: float) -> torch.Tensor:  # left padding, as the processor pads
        return torch.nn.functional.pad(x, (0, 0, width - x.shape[1], 0) if x.dim() == 3 else (width - x.shape[1], 0), value=value)

    return (torch.cat([pad(o[0], 0.0) for o in outs]), torch.cat([pad(o[1], False) for o in outs]),
            torch.cat([pad(o[2], -1) for o in outs]), torch.cat([pad(o[3], False) for o in outs]))


def _report_md(m: dict[str, Any]) -> str:
    lines = [f"# jsae demo: {m['model']}", "",
             f"{m['n_layers']} decoder layers; swept layers {m['layers']}; concepts {m['concepts']}; methods {m['methods']}.", "",
             "## SAEs (held-out pairs)", "",
             markdown_table(m["saes"], ["layer", "method", "fvu_vision", "fvu_text", "l0_vision", "l0_text", "paired_cosine",
                                        "shared", "vision-only", "text-only"]),
             "## Steering and suppression per layer (mean over concepts, 95% CI)", ""]
    rows = []
    for measure, by_method in m["summary"].items():
        for method, by_layer in by_method.items():
            for layer, s in sorted(by_layer.items(), key=lambda kv: int(kv[0])):
                rows.append({"measure": measure, "method": method, "layer": int(layer), "effect": s["mean"],
                             "ci": f"[{s['low']:.3f}, {s['high']:.3f}]", "cohens_h": s["cohens_h"], "images": s["n_images"]})
    lines += [markdown_table(rows, ["measure", "method", "layer", "effect", "ci", "cohens_h", "images"]),
              "## Cells", "", markdown_table(m["cells"], ["measure", "method", "layer", "concept", "n", "mean", "low", "high",
                                                          "alpha", "rate_before", "rate_after", "preservation"]),
              "![layer sweep](layer_sweep.png)", "", "Feature browser: [features.html](features.html)", ""]
    if "interaction" in m:
        lines += ["## Model × layer interaction", "", f"```\n{json.dumps(m['interaction'], indent=1)}\n```", ""]
    return "\n".join(lines)


__all__ = ["ARTEFACTS", "DemoConfig", "load_model", "run_demo"]
