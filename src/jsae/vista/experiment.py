"""VISTA in the embedded world, end to end (what ``jsae vista train`` / ``jsae vista eval`` run).

``train_world(out, cfg)``:
  1. a SAELens TopK text SAE per layer in ``cfg.text_layers`` on the toy LM's per-token activations of
     plain-text captions (no image), by SAELens's ``SAETrainer`` (or loaded from ``cfg.text_sae``:
     a release such as ``jsae-vista-toy-llava-text-sae`` or a directory of SAE folders);
  2. labels of its latents from text only (the world concept words they fire on);
  3. one projector per setting (``baseline`` λ=0 and the VISTA settings), each re-initialised from the
     same seed and trained for the same steps; weights as safetensors.

``eval_world(run)``: matching rate and localisation per layer and setting, caption quality, the
vision-only baseline SAE, patch-local removal / replacement, ``metrics.json``, ``report.md`` and
``edit_example.png``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from jsae.files import write_atomic, write_json
from jsae.report.markdown import markdown_table
from jsae.vista.core import (VistaConfig, check_text_sae, collect_text_states, load_projector, load_text_sae, save_projector,
                             save_sae, train_projector, train_text_sae)
from jsae.vista.metrics import (image_concepts, interval, label_latents_from_patches, label_latents_from_text, label_latents_from_words,
                                localisation_scores, matching_scores, object_cells, object_concepts, patch_edit,
                                ratio_interval)

RELEASE = "jsae-vista-toy-llava-text-sae"
RELEASE_DIR = Path(__file__).parent / "releases" / "toy-llava-text-sae"


def world_concept_names() -> list[str]:
    from jsae.world.concepts import world_concepts

    return world_concepts()


@dataclass
class WorldVistaConfig:
    model: str = "llava"
    seed: int = 0
    n_train: int = 1000
    n_label: int = 400
    text_layers: tuple[int, ...] = (2, 4, 6)
    text_sae: str | None = None  # release name or directory of SAE folders; None = train
    d_sae: int = 256
    k: int = 16
    sae_steps: int = 2000
    lam: float = 1.0
    settings: tuple[tuple[str, float, tuple[int, ...]], ...] = ()  # (name, λ, layers); default baseline + 2 VISTA
    proj_steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    labelling: str = "token"  # "token": the concept word a latent fires on; "caption": caption-level presence
    reinit: bool = False  # False: both projectors start from the shipped one; True: from the same seeded re-init

    def __post_init__(self) -> None:
        if self.lam < 0:
            raise ValueError(f"lam (λ) must be >= 0, got {self.lam}; use 0 for the baseline and a positive weight for VISTA")
        self.text_layers = tuple(int(x) for x in self.text_layers)
        if self.labelling not in ("token", "caption"):
            raise ValueError(f"labelling must be 'token' or 'caption', got {self.labelling!r}")
        if not self.settings:
            mid = self.text_layers[len(self.text_layers) // 2]
            self.settings = (("baseline", 0.0, ()), (f"vista-l{mid}", self.lam, (mid,)),
                             ("vista-l" + "".join(map(str, self.text_layers)), self.lam, self.text_layers))
        self.settings = tuple((str(n), float(lam), tuple(int(x) for x in ls)) for n, lam, ls in self.settings)
        for n, lam, ls in self.settings:
            VistaConfig(lam=lam, layers=ls)  # validates λ and layers
            bad = [x for x in ls if x not in self.text_layers]
            if bad:
                raise ValueError(f"setting {n!r} constrains layer(s) {bad} with no text SAE; add them to text_layers {list(self.text_layers)}")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def _load_world(model: str) -> tuple[Any, Any, Any]:
    from jsae.vlm import load_vlm

    return load_vlm(model)


def _text_saes(run: Path) -> tuple[dict[int, Any], dict[int, list[str | None]]]:
    from jsae.adapters import layer_of_hook

    saes, labels = {}, {}
    for d in sorted((run / "text_sae").iterdir()):
        if (d / "cfg.json").exists():
            sae = load_text_sae(str(d))
            layer = layer_of_hook(sae.cfg.metadata.hook_name)
            saes[layer] = sae
            labels[layer] = json.loads((d / "labels.json").read_text())["labels"]
    return saes, labels


def train_world(out: str | Path, cfg: WorldVistaConfig | None = None, overwrite: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """Steps 1–3 of the module docstring into ``out``; returns the training summary."""
    from jsae.world import world_dataset

    cfg = cfg or WorldVistaConfig()
    out = Path(out)
    _check_out(out, overwrite)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    model, processor, adapter = _load_world(cfg.model)
    for layer in cfg.text_layers:
        adapter.check_layer(layer)
    train = world_dataset("train", cfg.n_train, cfg.seed)
    label = world_dataset("validation", cfg.n_label, cfg.seed)
    concepts = world_concept_names()
    timings: dict[str, float] = {}

    # 1. text SAEs
    (out / "text_sae").mkdir(exist_ok=True)
    saes: dict[int, Any] = {}
    sae_rows = []
    if cfg.text_sae:

        for layer in cfg.text_layers:
            src = Path(cfg.text_sae)
            spec = str(src / adapter.hook_name(layer)) if src.is_dir() else f"{cfg.text_sae}:{adapter.hook_name(layer)}"
            saes[layer] = load_text_sae(spec)
            check_text_sae(saes[layer], adapter, layer)
    else:
        caps = [c for ex in train for c in ex["captions"]]
        states, _, _ = collect_text_states(model, processor, adapter, caps, cfg.text_layers, progress=progress)
        for layer in cfg.text_layers:
            sae = train_text_sae(states[layer], hook_name=adapter.hook_name(layer), model_name=f"jsae-toy-{cfg.model}",
                                 d_sae=cfg.d_sae, k=cfg.k, steps=cfg.sae_steps, seed=cfg.seed, progress=progress)
            save_sae(sae, out / "text_sae" / adapter.hook_name(layer))
            saes[layer] = load_text_sae(str(out / "text_sae" / adapter.hook_name(layer)))
        del states
    timings["text_sae_s"] = time.time() - t0

    # 2. labels from text only (validation captions, every template)
    lcaps, lconc = [], []
    for ex in label:
        for c in ex["captions"]:
            lcaps.append(c)
            lconc.append(image_concepts(ex["objects"]))
    lstates, owners, ids = collect_text_states(model, processor, adapter, lcaps, cfg.text_layers, progress=progress)
    words = getattr(processor, "tokenizer", processor).convert_ids_to_tokens(ids)
    for layer, sae in saes.items():
        with torch.no_grad():
            z = sae.encode(lstates[layer])
            x = lstates[layer]
            fvu = float((sae.decode(z) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
        if cfg.labelling == "token":
            labels = label_latents_from_words(z, words, concepts)
        else:
            labels = label_latents_from_text(z, owners, lconc, concepts)
        d = out / "text_sae" / adapter.hook_name(layer)
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "cfg.json").exists():
            save_sae(sae, d)
        write_json(d / "labels.json", {"labels": labels, "concepts": concepts, "method": ("per-token code vs the token being the concept word" if cfg.labelling == "token"
                                                                               else "max-over-tokens code vs caption concept presence") + ", Pearson >= 0.3"})
        n_lab = sum(lab is not None for lab in labels)
        sae_rows.append({"layer": layer, "fvu_text": fvu, "l0": float((z > 0).float().sum(-1).mean()), "labelled": n_lab,
                         "concepts_covered": len({lab for lab in labels if lab})})
    timings["labels_s"] = time.time() - t0 - timings["text_sae_s"]

    # 3. projectors, same init and steps
    images, captions = [ex["image"] for ex in train], [ex["captions"][0] for ex in train]  # canonical template
    (out / "projectors").mkdir(exist_ok=True)
    runs = {}
    from jsae.vista.core import check_projector

    init = {k: v.detach().clone() for k, v in check_projector(adapter).state_dict().items()}
    for name, lam, layers in cfg.settings:
        check_projector(adapter).load_state_dict(init)  # every setting starts from the same weights
        vc = VistaConfig(lam=lam, layers=layers, steps=cfg.proj_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                         reinit=cfg.reinit)
        hist = train_projector(model, processor, adapter, saes, images, captions, vc, progress=progress)
        save_projector(adapter, out / "projectors" / f"{name}.safetensors", {"name": name, **asdict(vc)})
        runs[name] = hist
    timings["projectors_s"] = time.time() - t0 - timings["text_sae_s"] - timings["labels_s"]
    summary = {"config": asdict(cfg), "text_saes": sae_rows, "projectors": runs, "timings": timings}
    write_json(out / "train.json", summary)
    return summary


# ---- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def _image_states(model: Any, processor: Any, adapter: Any, images: list[Any], captions: list[str], layers: Sequence[int],
                  batch: int = 50) -> dict[int, torch.Tensor]:
    """{layer: [n_images, n_patches, d]} image-token states in row-major patch order (every image of the
    world has the same patch grid; a batch whose images differ is refused)."""
    from jsae.activations import read_layers

    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for i in range(0, len(images), batch):
        enc = adapter.build_inputs(processor, images[i:i + batch], captions[i:i + batch])
        img = adapter.image_token_mask(enc)
        counts = img.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"images {i}..{i + len(counts) - 1} have different numbers of image tokens {counts.tolist()}; "
                             "the world evaluation needs one patch grid")
        n = int(counts[0])
        for layer, states in read_layers(model, adapter, enc, layers).items():
            out[layer].append(states[img].reshape(img.shape[0], n, -1).float())
    return {layer: torch.cat(v) for layer, v in out.items()}


def _captioner(model: Any, processor: Any, adapter: Any, max_new_tokens: int = 32, batch: int = 64) -> Any:
    from jsae.interventions import Captioner

    return Captioner(model, processor, adapter, prompt="", batch_size=batch, max_new_tokens=max_new_tokens)


def caption_quality(captions: list[str], objects: list[list[dict]]) -> dict[str, Any]:
    """Object recall (ground-truth (type, colour) pairs named) and precision (named pairs that exist)."""
    from jsae.world import parse_caption

    rec, prec = [], []
    for cap, objs in zip(captions, objects):
        gt = {(o["name"], o["color"]) for o in objs}
        found = {(f["name"], f["color"]) for f in parse_caption(cap)}
        rec.append(len(gt & found) / len(gt))
        prec.append(len(gt & found) / len(found) if found else 0.0)
    return {"object_recall": interval(np.array(rec)), "object_precision": interval(np.array(prec))}


def _names(cap: str) -> list[dict]:
    from jsae.world import parse_caption

    return parse_caption(cap)


@dataclass
class EvalConfig:
    n_eval: int = 300
    k: int = 5
    edit_layer: int | None = None  # default: the single-layer VISTA setting's layer
    vista: str | None = None  # the VISTA setting used for edits; default the single-layer one
    gains: tuple[float, ...] = (1.0, 2.0, 4.0)
    n_calib: int = 40
    vision_d_sae: int = 256
    vision_k: int = 16
    vision_steps: int = 2000
    max_new_tokens: int = 32
    seed: int = 0


def _act_scale(codes: torch.Tensor) -> torch.Tensor:
    """Per latent, the 90th percentile of its positive activations (1 where it never fires)."""
    out = torch.ones(codes.shape[1])
    for j in range(codes.shape[1]):
        v = codes[:, j]
        v = v[v > 0]
        if v.numel():
            out[j] = torch.quantile(v, 0.9)
    return out


def _edit_plan(objects: list[list[dict]], captions: list[str], labels_list: list[list[str | None]], seed: int) -> list[dict]:
    """Per eligible image: target object index and replacement type (same for every method)."""
    from jsae.world import TYPES

    rng = np.random.default_rng(seed)
    ok_types = [t for t in TYPES if all(t in set(lab for lab in labels if lab) for labels in labels_list)]
    plan = []
    for i, (objs, cap) in enumerate(zip(objects, captions)):
        types = [o["name"] for o in objs]
        if len(objs) < 2 or len(set(types)) != len(types):
            continue
        named = {f["name"] for f in _names(cap)}
        if not set(types) <= named:
            continue
        o = int(rng.integers(len(objs)))
        cand = [t for t in ok_types if t not in types]
        plan.append({"image": i, "target": o, "new": str(rng.choice(cand)) if cand else None})
    return plan


def _edit_vectors(plan: list[dict], objects: list[list[dict]], labels: list[str | None], scale: torch.Tensor, mode: str,
                  gain: float) -> tuple[torch.Tensor, torch.Tensor]:
    from jsae.world import TYPE_TO_CATEGORY

    d = len(labels)
    zero = torch.zeros(len(plan), d, dtype=torch.bool)
    setv = torch.full((len(plan), d), float("nan"))
    for r, p in enumerate(plan):
        o = objects[p["image"]][p["target"]]
        kill = object_concepts(o) if mode == "remove" else {o["name"], o["category"]}
        for j, lab in enumerate(labels):
            if lab in kill:
                zero[r, j] = True
        if mode == "replace" and p["new"]:
            add = {p["new"], TYPE_TO_CATEGORY[p["new"]]}
            for j, lab in enumerate(labels):
                if lab in add:
                    zero[r, j] = False
                    setv[r, j] = float(scale[j]) * gain
    return zero, setv


def _score_edits(plan: list[dict], objects: list[list[dict]], edited: list[str], mode: str) -> dict[str, np.ndarray]:
    succ, in_place = [], []
    for p, cap in zip(plan, edited):
        objs = objects[p["image"]]
        o = objs[p["target"]]
        found = _names(cap)
        names = {f["name"] for f in found}
        others = all(x["name"] in names for k, x in enumerate(objs) if k != p["target"])
        gone = o["name"] not in names
        if mode == "remove":
            succ.append(float(gone and others))
            in_place.append(float(gone and others))
        else:
            new = p["new"] is not None and p["new"] in names
            succ.append(float(gone and others and new))
            in_place.append(float(gone and others and any(f["name"] == p["new"] and f["position"] == o["position"] for f in found)))
    return {"success": np.array(succ), "in_place": np.array(in_place)}


def eval_world(run: str | Path, cfg: EvalConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate a ``train_world`` run directory; writes ``metrics.json``, ``report.md``, ``edit_example.png``."""
    from jsae.world import world_dataset

    cfg = cfg or EvalConfig()
    run = Path(run)
    if not (run / "train.json").exists():
        raise FileNotFoundError(f"{run} has no train.json; run `jsae vista train --out {run}` first")
    t0 = time.time()
    train_summary = json.loads((run / "train.json").read_text())
    wcfg = train_summary["config"]
    settings = [(n, lam, tuple(ls)) for n, lam, ls in wcfg["settings"]]
    model, processor, adapter = _load_world(wcfg["model"])
    saes, text_labels = _text_saes(run)
    layers = sorted(saes)
    vista_name = cfg.vista or next((n for n, lam, ls in settings if lam > 0 and len(ls) == 1), None) or settings[-1][0]
    vista_layers = dict((n, ls) for n, _, ls in settings)[vista_name]
    edit_layer = cfg.edit_layer if cfg.edit_layer is not None else vista_layers[0]
    if edit_layer not in saes:
        raise ValueError(f"edit layer {edit_layer} has no text SAE; choose one of {layers}")
    test = world_dataset("test", cfg.n_eval, cfg.seed)
    label = world_dataset("validation", wcfg["n_label"], wcfg["seed"])
    images, captions, objects = [ex["image"] for ex in test], [ex["caption"] for ex in test], [ex["objects"] for ex in test]
    limages, lcaptions, lobjects = [ex["image"] for ex in label], [ex["caption"] for ex in label], [ex["objects"] for ex in label]
    present = [image_concepts(o) for o in objects]
    captioner = _captioner(model, processor, adapter, cfg.max_new_tokens)
    per_setting: dict[str, Any] = {}
    scores: dict[tuple[str, int], np.ndarray] = {}
    unedited: dict[str, list[str]] = {}
    label_states: dict[str, torch.Tensor] = {}
    for name, lam, ls in tqdm(settings, desc="settings", disable=not progress):
        load_projector(adapter, run / "projectors" / f"{name}.safetensors")
        states = _image_states(model, processor, adapter, images, captions, layers)
        row: dict[str, Any] = {"lam": lam, "layers": list(ls), "per_layer": {}}
        for layer in layers:
            with torch.no_grad():
                z = saes[layer].encode(states[layer])  # [n, P, d_sae]
                x = states[layer]
                err = float(((saes[layer].decode(z) - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean())
            ms = matching_scores(z.mean(1), text_labels[layer], present, cfg.k)
            loc = localisation_scores(z, text_labels[layer], objects)
            scores[(name, layer)] = ms
            row["per_layer"][str(layer)] = {"matching_rate": interval(ms), "localisation": interval(loc), "recon_err": err}
        caps = captioner(images)
        unedited[name] = caps
        row["captions"] = caption_quality(caps, objects)
        row["examples"] = caps[:3]
        per_setting[name] = row
        if name == vista_name or name == "baseline":
            label_states[name] = _image_states(model, processor, adapter, limages, lcaptions, [edit_layer])[edit_layer]
    base_name = next((n for n, lam, _ in settings if lam == 0), settings[0][0])
    ratios = {str(layer): {n: ratio_interval(scores[(n, layer)], scores[(base_name, layer)]) for n, lam, _ in settings if n != base_name}
              for layer in layers}
    timings = {"matching_s": time.time() - t0}

    # vision-only baseline SAE on the baseline projector's image tokens at the edit layer
    from jsae.world.concepts import world_concepts
    from jsae.vista.core import train_text_sae as _train_topk

    concepts = world_concepts()
    grid = int(round(label_states[base_name].shape[1] ** 0.5))
    patches = label_states[base_name].reshape(-1, label_states[base_name].shape[-1])
    vsae = _train_topk(patches, hook_name=adapter.hook_name(edit_layer), model_name=f"jsae-toy-{wcfg['model']}-baseline-image-tokens",
                       d_sae=cfg.vision_d_sae, k=cfg.vision_k, steps=cfg.vision_steps, seed=cfg.seed, progress=progress)
    save_sae(vsae, run / "vision_sae")
    vsae = load_text_sae(str(run / "vision_sae"))
    patch_conc = []
    for objs in lobjects:
        pc = [set() for _ in range(grid * grid)]
        for o in objs:
            for p in np.nonzero(np.asarray(o["mask"], bool))[0]:
                pc[p] |= object_concepts(o)
        patch_conc += pc
    with torch.no_grad():
        vcodes = vsae.encode(patches)
    vlabels = label_latents_from_patches(vcodes, patch_conc, concepts)
    write_json(run / "vision_sae" / "labels.json", {"labels": vlabels, "concepts": concepts, "method": "per-patch code vs concept presence at the patch"})
    with torch.no_grad():
        tcodes = saes[edit_layer].encode(label_states[vista_name].reshape(-1, patches.shape[-1]))
    methods = {
        "vista": (vista_name, saes[edit_layer], text_labels[edit_layer], _act_scale(tcodes)),
        "vision-only": (base_name, vsae, vlabels, _act_scale(vcodes)),
    }
    vision_match = matching_scores(vcodes.reshape(len(lobjects), grid * grid, -1).mean(1), vlabels,
                                   [image_concepts(o) for o in lobjects], cfg.k)
    timings["vision_sae_s"] = time.time() - t0 - timings["matching_s"]

    # patch-local removal and replacement
    plan_all = _edit_plan(objects, unedited[vista_name], [methods["vista"][2], methods["vision-only"][2]], cfg.seed)
    plan_ok_base = {p["image"] for p in _edit_plan(objects, unedited[base_name], [methods["vista"][2], methods["vision-only"][2]], cfg.seed)}
    plan = [p for p in plan_all if p["image"] in plan_ok_base]  # images both projectors caption correctly
    calib, evalp = plan[:cfg.n_calib], plan[cfg.n_calib:]
    edits: dict[str, Any] = {}
    example: dict[str, Any] = {}

    def run_edits(method: str, pl: list[dict], mode: str, gain: float) -> tuple[list[str], dict[str, np.ndarray]]:
        proj, sae, labels, scale = methods[method]
        zero, setv = _edit_vectors(pl, objects, labels, scale, mode, gain)
        cells = [object_cells(objects[p["image"]][p["target"]], grid) for p in pl]

        def edit(start: int, stop: int) -> list[Any]:
            return [patch_edit(edit_layer, sae, cells[start:stop], zero[start:stop], setv[start:stop])]

        caps = captioner([images[p["image"]] for p in pl], edit)
        return caps, _score_edits(pl, objects, caps, mode)

    for method, (proj, sae, labels, scale) in methods.items():
        load_projector(adapter, run / "projectors" / f"{proj}.safetensors")
        res: dict[str, Any] = {"projector": proj, "sae": "text" if method == "vista" else "vision",
                               "labelled_latents": sum(lab is not None for lab in labels)}
        caps, sc = run_edits(method, evalp, "remove", 1.0)
        res["removal"] = interval(sc["success"])
        example.setdefault(method, {})["remove"] = caps
        best, best_rate, calib_rows = cfg.gains[0], -1.0, []
        for gain in cfg.gains:  # gain chosen on calibration images, per method
            _, csc = run_edits(method, calib, "replace", gain)
            rate = float(csc["success"].mean()) if len(calib) else 0.0
            calib_rows.append({"gain": gain, "success": rate})
            if rate > best_rate:
                best, best_rate = gain, rate
        caps, sc = run_edits(method, evalp, "replace", best)
        res["replacement"] = interval(sc["success"])
        res["replacement_in_place"] = interval(sc["in_place"])
        res["gain"] = best
        res["calibration"] = calib_rows
        example[method]["replace"] = caps
        edits[method] = res
    timings["edits_s"] = time.time() - t0 - timings["matching_s"] - timings["vision_sae_s"]
    rel = {}
    for measure in ("removal", "replacement"):
        a, b = edits["vista"][measure]["mean"], edits["vision-only"][measure]["mean"]
        rel[measure] = {"vista": a, "vision_only": b, "absolute_gain": a - b, "relative_gain": (a - b) / b if b > 0 else float("inf")}

    fig_path = None
    if evalp:
        fig_path = _figure(run / "edit_example.png", evalp, images, objects, grid, unedited[vista_name], example, vista_name)
    metrics = {
        "train": {"config": wcfg, "text_saes": train_summary["text_saes"],
                  "final": {n: h["history"][-1] for n, h in train_summary["projectors"].items()}},
        "eval_config": asdict(cfg), "edit_layer": edit_layer, "vista_setting": vista_name, "baseline_setting": base_name,
        "settings": per_setting, "matching_ratio": ratios,
        "vision_only_sae": {"labelled_latents": sum(lab is not None for lab in vlabels),
                            "matching_rate_on_label_split": interval(vision_match)},
        "edits": {"n_eligible": len(plan), "n_calibration": len(calib), "n_scored": len(evalp), **edits},
        "edit_gains_vs_vision_only": rel,
        "paper": {"matching_rate_ratio": 3.0, "removal_gain": "+35% (arXiv v1) / +38% (ICML)",
                  "replacement_gain": "+47% (arXiv v1) / +58% (ICML)"},
        "timings": timings,
    }
    write_json(run / "metrics.json", metrics)
    write_atomic(run / "report.md", _report(metrics, fig_path is not None))
    return metrics


def _figure(path: Path, plan: list[dict], images: list[Any], objects: list[list[dict]], grid: int, before: list[str],
            example: dict[str, Any], vista_name: str) -> Path:
    """An image, its patch grid with the edited patches outlined, and the captions before / after."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    # prefer an example where VISTA removal succeeded
    pick = 0
    for r, p in enumerate(plan):
        o = objects[p["image"]][p["target"]]
        if o["name"] not in {f["name"] for f in _names(example["vista"]["remove"][r])}:
            pick = r
            break
    p = plan[pick]
    img = images[p["image"]]
    o = objects[p["image"]][p["target"]]
    cells = object_cells(o, grid)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
    ax = axes[0]
    ax.imshow(np.asarray(img.convert("RGB")))
    step = img.width / grid
    for k in range(grid + 1):
        ax.axhline(k * step - 0.5, color="white", lw=0.6)
        ax.axvline(k * step - 0.5, color="white", lw=0.6)
    for r, c in cells:
        ax.add_patch(Rectangle((c * step - 0.5, r * step - 0.5), step, step, fill=False, ec="red", lw=2))
    ax.set_title(f"edited patches: the {o['color']} {o['name']}")
    ax.axis("off")
    ax = axes[1]
    ax.axis("off")
    lines = [("before", before[p["image"]])]
    for method in ("vista", "vision-only"):
        lines.append((f"{method} remove", example[method]["remove"][pick]))
        lines.append((f"{method} replace → {p['new']}", example[method]["replace"][pick]))
    for k, (title, cap) in enumerate(lines):
        ax.text(0, 1 - k * 0.18, f"{title}:", fontsize=9, weight="bold", va="top", transform=ax.transAxes)
        ax.text(0, 1 - k * 0.18 - 0.07, cap, fontsize=8.5, va="top", wrap=True, transform=ax.transAxes)
    fig.suptitle(f"patch-local edits ({vista_name} projector + text SAE vs baseline projector + vision SAE)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def _fmt(iv: dict[str, float]) -> str:
    return f"{iv['mean']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}] (n={iv['n']})"


def _report(m: dict[str, Any], figure: bool) -> str:
    c = m["train"]["config"]
    lines = ["# VISTA in the embedded world", "",
             f"Toy LLaVA ({c['model']}); text SAEs (SAELens TopK, d_sae {c['d_sae']}, k {c['k']}) at layers {c['text_layers']} "
             f"trained on plain-text captions; projectors re-initialised={c['reinit']} from seed {c['seed']}, "
             f"{c['proj_steps']} steps × batch {c['batch_size']} each.", "",
             "## Text SAEs", "", markdown_table(m["train"]["text_saes"], ["layer", "fvu_text", "l0", "labelled", "concepts_covered"]),
             "## Matching rate (top-k text-SAE latents of the mean image-token code whose label is present; 95% CI)", ""]
    rows = []
    for name, s in m["settings"].items():
        for layer, r in s["per_layer"].items():
            ratio = m["matching_ratio"][layer].get(name)
            rows.append({"setting": name, "λ": s["lam"], "constrained": s["layers"], "layer": layer,
                         "matching_rate": _fmt(r["matching_rate"]), "localisation": _fmt(r["localisation"]),
                         "recon_err": round(r["recon_err"], 3),
                         "ratio_vs_baseline": "" if ratio is None else f"{ratio['ratio']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"})
    lines += [markdown_table(rows, ["setting", "λ", "constrained", "layer", "matching_rate", "ratio_vs_baseline", "localisation", "recon_err"]),
              "## Task performance (greedy captions of held-out images)", ""]
    rows = [{"setting": n, "object_recall": _fmt(s["captions"]["object_recall"]), "object_precision": _fmt(s["captions"]["object_precision"]),
             "final_train_ce": round(m["train"]["final"][n]["ce"], 4)} for n, s in m["settings"].items()]
    lines += [markdown_table(rows, ["setting", "object_recall", "object_precision", "final_train_ce"]),
              f"## Patch-local edits at layer {m['edit_layer']}", "",
              f"{m['edits']['n_eligible']} eligible images (≥ 2 objects of distinct types, every object named by both projectors' "
              f"unedited captions); the first {m['edits']['n_calibration']} choose the replacement gain per method, "
              f"{m['edits']['n_scored']} are scored.", ""]
    rows = []
    for method in ("vista", "vision-only"):
        e = m["edits"][method]
        rows.append({"method": method, "projector": e["projector"], "sae": e["sae"], "labelled": e["labelled_latents"],
                     "removal": _fmt(e["removal"]), "replacement": _fmt(e["replacement"]),
                     "replacement_in_place": _fmt(e["replacement_in_place"]), "gain": e["gain"]})
    lines += [markdown_table(rows, ["method", "projector", "sae", "labelled", "removal", "replacement", "replacement_in_place", "gain"])]
    g = m["edit_gains_vs_vision_only"]
    lines += [f"Removal: VISTA {g['removal']['vista']:.3f} vs vision-only {g['removal']['vision_only']:.3f} "
              f"({g['removal']['absolute_gain']:+.3f} absolute, {g['removal']['relative_gain']:+.0%} relative; paper +35%/+38%).",
              "", f"Replacement: VISTA {g['replacement']['vista']:.3f} vs vision-only {g['replacement']['vision_only']:.3f} "
              f"({g['replacement']['absolute_gain']:+.3f} absolute, {g['replacement']['relative_gain']:+.0%} relative; paper +47%/+58%).", ""]
    if figure:
        lines += ["![edit example](edit_example.png)", ""]
    lines += ["Definitions: see `jsae.vista.metrics` (matching rate, localisation, removal, replacement).", ""]
    return "\n".join(lines)


__all__ = ["EvalConfig", "RELEASE", "WorldVistaConfig", "caption_quality", "eval_world", "train_world"]
