"""VISTA in the embedded world, end to end (what ``jsae vista train`` / ``jsae vista eval`` run), the paper's way.

``train_world(out, cfg)``:
  0. the model, composed with :func:`jsae.vista.compose` and a new projector: by default
     (``model="toy-composed"``) the shipped toy LLaVA's vision tower and language model taken apart and
     recomposed; ``model="toy-text-lm"`` is the paper's exact setting — the toy *text-only* LM (the toy LLaVA's
     LM after its text stage only, never trained with images) + the pre-VLM vision tower — which a projector
     trained from scratch on a CPU budget does not teach to caption (measured: caption CE stays at the
     image-blind ~0.62 after 750 steps; see the README); ``model="llava"`` is the shipped toy LLaVA itself;
  1. a SAELens TopK text SAE per layer in ``cfg.text_layers`` on that LM's per-token activations of
     plain-text captions (no image), by SAELens's ``SAETrainer`` (or loaded from ``cfg.text_sae``: a
     release such as ``jsae-vista-toy-lm-text-sae`` or a directory of SAE folders);
  2. labels of its latents from text only: Neuronpedia-style, from the words each latent's max-activating
     tokens are (:func:`jsae.vista.metrics.label_from_top_examples`); labelled fraction and purity recorded;
  3. one projector per setting (``baseline`` λ=0 and the VISTA settings: one layer, layers 0–4, all layers,
     and the raw-MSE loss form), each trained from scratch from the same seed for the same steps.

``eval_world(run)``: matching rate and localisation per layer and setting (ratios with paired intervals),
caption quality per setting, a vision-only SAE on the baseline projector's image tokens labelled two ways
(from its activations and the caption words — the fair baseline — and from ground-truth patch masks — an
upper reference), patch-local removal / replacement for the three, ``metrics.json``, ``report.md``,
``edit_example.png``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from jsae.files import write_atomic, write_json
from jsae.report.markdown import vista_world_report
from jsae.saes.metrics import fvu as sae_fvu
from jsae.vista.core import (VistaConfig, check_text_sae, collect_text_states, load_projector, load_text_sae, save_projector,
                             save_sae, train_projector, train_text_sae)
from jsae.vista.metrics import (context_concepts, image_concepts, interval, label_from_top_examples, label_summary,
                                localisation_scores, matching_scores, object_cells, object_concepts, patch_edit,
                                ratio_interval)

#: text SAEs on the toy LLaVA's language model (all 8 layers, plain-text captions), for ``model="toy-composed"``
RELEASE = "jsae-vista-toy-lm-text-sae"
RELEASE_DIR = Path(__file__).parent / "releases" / "toy-lm-text-sae"
#: the earlier release (layers 2/4/6, trained on an earlier toy LLaVA's LM)
LLAVA_RELEASE = "jsae-vista-toy-llava-text-sae"
#: toy-composed: the toy LLaVA's tower + LM recomposed with a new projector; toy-text-lm: the toy text-only LM +
#: the pre-VLM tower; toy-dino-text-lm: the toy text-only LM + the DINOv2-style tower (jsae.world.dino); llava: the
#: shipped toy LLaVA itself (its own projector unless reinit)
MODELS = ("toy-composed", "toy-text-lm", "toy-dino-text-lm", "llava")


def world_concept_names() -> list[str]:
    from jsae.world.concepts import world_concepts

    return world_concepts()


def _layer_tag(layers: Sequence[int]) -> str:
    ls = sorted(layers)
    if len(ls) > 2 and ls == list(range(ls[0], ls[-1] + 1)):
        return f"l{ls[0]}-{ls[-1]}"
    return "l" + "".join(map(str, ls))


@dataclass(frozen=True)
class VistaSetting:
    """One projector's training setting: its ``name``, the VISTA weight ``lam`` (λ; 0 = the baseline, the same
    training without the SAE term), the text-SAE ``layers`` it constrains and the ``loss_form`` of the SAE term
    (``"normalised"`` or ``"mse"``, :class:`jsae.vista.core.VistaConfig`).  ``train.json`` records it as the list
    ``[name, λ, layers, loss form]``."""

    name: str
    lam: float
    layers: tuple[int, ...] = ()
    loss_form: str = "normalised"

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", str(self.name))
        object.__setattr__(self, "lam", float(self.lam))
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        object.__setattr__(self, "loss_form", str(self.loss_form))
        VistaConfig(lam=self.lam, layers=self.layers, loss_form=self.loss_form)  # validates λ, layers, form

    @classmethod
    def of(cls, st: "VistaSetting | Sequence[Any] | dict[str, Any]") -> "VistaSetting":
        """A setting from itself, a ``{"name", "lam", "layers"[, "loss_form"]}`` dict, or a ``(name, λ, layers[,
        loss form])`` sequence (as ``train.json`` records it)."""
        if isinstance(st, cls):
            return st
        if isinstance(st, dict):
            return cls(**st)
        if isinstance(st, (str, bytes)) or len(st) not in (3, 4):
            raise ValueError(f"a setting is (name, λ, layers) or (name, λ, layers, loss form), got {st!r}")
        return cls(*st)

    def record(self) -> list[Any]:
        """``[name, λ, layers, loss form]``: the setting as ``train.json`` records it."""
        return [self.name, self.lam, list(self.layers), self.loss_form]


def default_settings(text_layers: Sequence[int], lam: float, edit_layer: int) -> tuple[VistaSetting, ...]:
    """baseline; VISTA on one layer; on layers 0..edit_layer; on every text layer; one layer with the raw-MSE loss."""
    tl = tuple(sorted(text_layers))
    out = [VistaSetting("baseline", 0.0), VistaSetting(f"vista-{_layer_tag((edit_layer,))}", lam, (edit_layer,))]
    first = tuple(x for x in tl if x <= edit_layer)
    if len(first) > 1 and first != tl:
        out.append(VistaSetting(f"vista-{_layer_tag(first)}", lam, first))
    if len(tl) > 1:
        out.append(VistaSetting(f"vista-{_layer_tag(tl)}", lam, tl))
    out.append(VistaSetting(f"vista-{_layer_tag((edit_layer,))}-mse", lam, (edit_layer,), "mse"))
    return tuple(out)


@dataclass
class WorldVistaConfig:
    model: str = "toy-composed"
    seed: int = 0
    n_train: int = 1000
    n_label: int = 400
    text_layers: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7)
    edit_layer: int = 4
    text_sae: str | None = None  # release name or directory of SAE folders; None = train
    d_sae: int = 256
    k: int = 16
    sae_steps: int = 2000
    lam: float = 1.0
    #: the projectors to train (:class:`VistaSetting`, or ``(name, λ, layers[, loss form])``); default
    #: :func:`default_settings`
    settings: tuple[VistaSetting, ...] = ()
    proj_steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    top_n: int = 20  # max-activating examples a label is read from
    min_purity: float = 0.5
    context: int = 0  # words before the token that count as its context when labelling
    reinit: bool = True  # the paper's way: every projector from scratch (same seed); False: from the model's own

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {list(MODELS)}, got {self.model!r}")
        if self.lam < 0:
            raise ValueError(f"lam (λ) must be >= 0, got {self.lam}; use 0 for the baseline and a positive weight for VISTA")
        self.text_layers = tuple(int(x) for x in self.text_layers)
        if not self.text_layers:
            raise ValueError("text_layers needs at least one layer, e.g. (4,)")
        if self.edit_layer not in self.text_layers:
            raise ValueError(f"edit layer {self.edit_layer} has no text SAE; add it to text_layers {list(self.text_layers)}")
        if not self.settings:
            self.settings = default_settings(self.text_layers, self.lam, self.edit_layer)
        settings = tuple(VistaSetting.of(st) for st in self.settings)
        for st in settings:
            bad = [x for x in st.layers if x not in self.text_layers]
            if bad:
                raise ValueError(f"setting {st.name!r} constrains layer(s) {bad} with no text SAE; add them to text_layers "
                                 f"{list(self.text_layers)}")
        if not any(st.lam == 0 for st in settings):
            raise ValueError("the settings need a baseline with λ = 0 (the same training without the SAE term)")
        self.settings = settings


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def _load_world(model: str, seed: int = 0) -> tuple[Any, Any, Any]:
    if model in ("toy-composed", "toy-text-lm", "toy-dino-text-lm"):
        from jsae.vista.compose import compose_toy

        return compose_toy("vlm" if model == "toy-composed" else "text-only", seed=seed,
                           tower="dino" if model == "toy-dino-text-lm" else "supervised")
    from jsae.vlm import load_vlm

    return load_vlm(model)


def _model_name(adapter: Any) -> str:
    from jsae.vlm import model_name as name

    return name(adapter)


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


def label_text_sae(sae: Any, states: torch.Tensor, words: Sequence[str], owners: Sequence[int], concepts: list[str],
                   top_n: int = 20, min_purity: float = 0.5, context: int = 0) -> dict[str, Any]:
    """Labels of a text SAE's latents from text alone: the concept words of each latent's max-activating tokens
    (and ``context`` words before them).  Returns labels, purity, the summary and 5 top tokens per latent."""
    with torch.no_grad():
        z = sae.encode(states)
    labels, purity = label_from_top_examples(z, context_concepts(words, owners, context), concepts, top_n, min_purity)
    top = z.topk(min(5, z.shape[0]), dim=0).indices.T.tolist()
    return {"labels": labels, "purity": purity, "summary": label_summary(labels, purity),
            "top_tokens": [[words[t] for t in row] for row in top], "codes": z}


def train_world(out: str | Path, cfg: WorldVistaConfig | None = None, overwrite: bool = False,
                progress: bool = True) -> dict[str, Any]:
    """Steps 0–3 of the module docstring into ``out``; returns the training summary."""
    from jsae.world import world_dataset

    cfg = cfg or WorldVistaConfig()
    out = Path(out)
    _check_out(out, overwrite)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    model, processor, adapter = _load_world(cfg.model, cfg.seed)
    for layer in cfg.text_layers:
        adapter.check_layer(layer)
    train = world_dataset("train", cfg.n_train, cfg.seed)
    label = world_dataset("validation", cfg.n_label, cfg.seed)
    concepts = world_concept_names()
    timings: dict[str, float] = {}

    # 1. text SAEs on the LM's per-token states of plain-text captions
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
            sae = train_text_sae(states[layer], hook_name=adapter.hook_name(layer), model_name=_model_name(adapter),
                                 d_sae=cfg.d_sae, k=cfg.k, steps=cfg.sae_steps, seed=cfg.seed, progress=progress)
            save_sae(sae, out / "text_sae" / adapter.hook_name(layer))
            saes[layer] = load_text_sae(str(out / "text_sae" / adapter.hook_name(layer)))
        del states
    timings["text_sae_s"] = time.time() - t0

    # 2. labels from text only (held-out captions, every template): the words the latents fire on
    lcaps = [c for ex in label for c in ex["captions"]]
    lstates, owners, ids = collect_text_states(model, processor, adapter, lcaps, cfg.text_layers, progress=progress)
    words = getattr(processor, "tokenizer", processor).convert_ids_to_tokens(ids)
    owners_l = owners.tolist()
    for layer, sae in saes.items():
        got = label_text_sae(sae, lstates[layer], words, owners_l, concepts, cfg.top_n, cfg.min_purity, cfg.context)
        x = lstates[layer]
        with torch.no_grad():
            fvu = float(sae_fvu(sae.decode(got["codes"]), x))
        d = out / "text_sae" / adapter.hook_name(layer)
        d.mkdir(parents=True, exist_ok=True)
        if not (d / "cfg.json").exists():
            save_sae(sae, d)
        write_json(d / "labels.json", {"labels": got["labels"], "purity": got["purity"], "top_tokens": got["top_tokens"],
                                       "concepts": concepts, "summary": got["summary"],
                                       "method": f"Neuronpedia-style: the concept words of each latent's top-{cfg.top_n} tokens "
                                                 f"(context {cfg.context}); label = largest lift over the base rate, kept when "
                                                 f"purity >= {cfg.min_purity} and lift >= 0.2"})
        sae_rows.append({"layer": layer, "fvu_text": fvu, "l0": float((got["codes"] > 0).float().sum(-1).mean()), **got["summary"]})
    del lstates
    timings["labels_s"] = time.time() - t0 - timings["text_sae_s"]

    # 3. projectors, from scratch (same seed) and the same steps for every setting
    images, captions = [ex["image"] for ex in train], [ex["captions"][0] for ex in train]  # canonical template
    (out / "projectors").mkdir(exist_ok=True)
    runs = {}
    from jsae.vista.core import check_projector

    init = {k: v.detach().clone() for k, v in check_projector(adapter).state_dict().items()}
    for st in cfg.settings:
        check_projector(adapter).load_state_dict(init)  # reinit=False: every setting starts from the model's own
        vc = VistaConfig(lam=st.lam, layers=st.layers, steps=cfg.proj_steps, batch_size=cfg.batch_size, lr=cfg.lr,
                         seed=cfg.seed, reinit=cfg.reinit, loss_form=st.loss_form)
        hist = train_projector(model, processor, adapter, saes, images, captions, vc, progress=progress)
        save_projector(adapter, out / "projectors" / f"{st.name}.safetensors", {"name": st.name, **asdict(vc)})
        runs[st.name] = hist
    timings["projectors_s"] = time.time() - t0 - timings["text_sae_s"] - timings["labels_s"]
    config = {**asdict(cfg), "settings": [st.record() for st in cfg.settings]}
    summary = {"config": config, "text_saes": sae_rows, "projectors": runs, "timings": timings}
    write_json(out / "train.json", summary)
    return summary


# ---- evaluation ---------------------------------------------------------------------------------


@torch.no_grad()
def _image_states(model: Any, processor: Any, adapter: Any, images: list[Any], captions: list[str], layers: Sequence[int],
                  batch: int = 50) -> dict[int, torch.Tensor]:
    """{layer: [n_images, n_patches, d]} image-token states in row-major patch order (every image of the
    world has the same patch grid; a batch whose images differ is refused)."""
    from jsae.activations import states_at

    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for i in range(0, len(images), batch):
        enc = adapter.build_inputs(processor, images[i:i + batch], captions[i:i + batch])
        img = adapter.image_token_mask(enc)
        counts = img.sum(1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(f"images {i}..{i + len(counts) - 1} have different numbers of image tokens {counts.tolist()}; "
                             "the world evaluation needs one patch grid")
        n = int(counts[0])
        for layer, states in states_at(model, adapter, enc, layers, img).items():
            out[layer].append(states.reshape(img.shape[0], n, -1))
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
    """Per eligible image: target object index and replacement type (same for every method; the new type is one
    that at least one method's SAE has a latent for — a method without one cannot succeed)."""
    from jsae.world import TYPES

    rng = np.random.default_rng(seed)
    ok_types = [t for t in TYPES if any(t in set(lab for lab in labels if lab) for labels in labels_list)]
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


@dataclass
class _EvalRun:
    """What every stage of :func:`eval_world` reads: the run, its model and text SAEs, the settings compared, the
    held-out test images and the label split."""

    run: Path
    cfg: "EvalConfig"
    wcfg: dict[str, Any]
    model: Any
    processor: Any
    adapter: Any
    saes: dict[int, Any]
    text_labels: dict[int, list[str | None]]
    settings: list[VistaSetting]
    vista_name: str
    base_name: str
    edit_layer: int
    test: list[dict]
    label: list[dict]
    captioner: Any

    @property
    def layers(self) -> list[int]:
        return sorted(self.saes)

    @property
    def images(self) -> list[Any]:
        return [ex["image"] for ex in self.test]

    @property
    def objects(self) -> list[list[dict]]:
        return [ex["objects"] for ex in self.test]


def _open_eval(run: Path, cfg: "EvalConfig") -> _EvalRun:
    """Stage 0: the trained run, the VISTA and baseline settings compared and the edit layer (one-line errors)."""
    from jsae.world import world_dataset

    if not (run / "train.json").exists():
        raise FileNotFoundError(f"{run} has no train.json; run `jsae vista train --out {run}` first")
    wcfg = json.loads((run / "train.json").read_text())["config"]
    settings = [VistaSetting.of(st) for st in wcfg["settings"]]
    model, processor, adapter = _load_world(wcfg["model"], wcfg["seed"])
    saes, text_labels = _text_saes(run)
    by_name = {st.name: st for st in settings}
    vista_name = cfg.vista or next((st.name for st in settings if st.lam > 0 and len(st.layers) == 1), None) or settings[-1].name
    if vista_name not in by_name:
        raise ValueError(f"no setting {vista_name!r} in this run; choose one of {list(by_name)}")
    vista_layers = by_name[vista_name].layers
    edit_layer = cfg.edit_layer if cfg.edit_layer is not None else (vista_layers[0] if vista_layers else wcfg["edit_layer"])
    if edit_layer not in saes:
        raise ValueError(f"edit layer {edit_layer} has no text SAE; choose one of {sorted(saes)}")
    base_name = next((st.name for st in settings if st.lam == 0), settings[0].name)
    return _EvalRun(run, cfg, wcfg, model, processor, adapter, saes, text_labels, settings, vista_name, base_name, edit_layer,
                    test=list(world_dataset("test", cfg.n_eval, cfg.seed)),
                    label=list(world_dataset("validation", wcfg["n_label"], wcfg["seed"])),
                    captioner=_captioner(model, processor, adapter, cfg.max_new_tokens))


def _matching_stage(ev: _EvalRun, progress: bool) -> dict[str, Any]:
    """Stage 1, per setting: the matching rate, localisation and reconstruction error of every text SAE on the test
    images' tokens, greedy captions, and the label split's image states at the edit layer (VISTA and baseline)."""
    images, objects = ev.images, ev.objects
    captions = [ex["caption"] for ex in ev.test]
    present = [image_concepts(o) for o in objects]
    per_setting: dict[str, Any] = {}
    scores: dict[tuple[str, int], np.ndarray] = {}
    unedited: dict[str, list[str]] = {}
    label_states: dict[str, torch.Tensor] = {}
    for st in tqdm(ev.settings, desc="settings", disable=not progress):
        load_projector(ev.adapter, ev.run / "projectors" / f"{st.name}.safetensors")
        states = _image_states(ev.model, ev.processor, ev.adapter, images, captions, ev.layers)
        row: dict[str, Any] = {"lam": st.lam, "layers": list(st.layers), "per_layer": {}}
        for layer in ev.layers:
            with torch.no_grad():
                z = ev.saes[layer].encode(states[layer])  # [n, P, d_sae]
                x = states[layer]
                err = float(((ev.saes[layer].decode(z) - x).pow(2).sum(-1) / x.pow(2).sum(-1)).mean())
            ms = matching_scores(z.mean(1), ev.text_labels[layer], present, ev.cfg.k)
            loc = localisation_scores(z, ev.text_labels[layer], objects)
            scores[(st.name, layer)] = ms
            row["per_layer"][str(layer)] = {"matching_rate": interval(ms), "localisation": interval(loc), "recon_err": err}
        del states
        caps = ev.captioner(images)
        unedited[st.name] = caps
        row["captions"] = caption_quality(caps, objects)
        row["examples"] = caps[:3]
        per_setting[st.name] = row
        if st.name in (ev.vista_name, ev.base_name):
            label_states[st.name] = _image_states(ev.model, ev.processor, ev.adapter, [ex["image"] for ex in ev.label],
                                                  [ex["caption"] for ex in ev.label], [ev.edit_layer])[ev.edit_layer]
    ratios = {str(layer): {st.name: ratio_interval(scores[(st.name, layer)], scores[(ev.base_name, layer)])
                           for st in ev.settings if st.name != ev.base_name} for layer in ev.layers}
    return {"settings": per_setting, "matching_ratio": ratios, "unedited": unedited, "label_states": label_states}


def _vision_only_stage(ev: _EvalRun, label_states: dict[str, torch.Tensor], progress: bool) -> dict[str, Any]:
    """Stage 2: a vision-only TopK SAE on the baseline projector's image tokens at the edit layer (label split),
    labelled (a) from its top images' captions — the fair baseline — and (b) from ground-truth patch masks — an
    upper reference; the three edit methods (VISTA's text SAE and the two vision-only labellings)."""
    from jsae.vista.core import train_text_sae as _train_topk
    from jsae.world.concepts import mentions, world_concepts

    cfg, wcfg, edit_layer = ev.cfg, ev.wcfg, ev.edit_layer
    lobjects, lcaptions = [ex["objects"] for ex in ev.label], [ex["caption"] for ex in ev.label]
    concepts = world_concepts()
    base = label_states[ev.base_name]
    n_patch = base.shape[1]
    patches = base.reshape(-1, base.shape[-1])
    vsae = _train_topk(patches, hook_name=ev.adapter.hook_name(edit_layer), model_name=_model_name(ev.adapter),
                       d_sae=cfg.vision_d_sae, k=cfg.vision_k, steps=cfg.vision_steps, seed=cfg.seed, progress=progress)
    save_sae(vsae, ev.run / "vision_sae")
    vsae = load_text_sae(str(ev.run / "vision_sae"))
    with torch.no_grad():
        vcodes = vsae.encode(patches)
    top_n, min_purity = wcfg.get("top_n", 20), wcfg.get("min_purity", 0.5)
    # (a) fair: from its activations and the caption words — an image is an example, its concepts the ones its
    # caption names (the max over its patches is the latent's activation on it)
    cap_conc = [{c for c in concepts if mentions(cap, c)} for cap in lcaptions]
    img_codes = vcodes.reshape(len(lobjects), n_patch, -1).amax(1)
    vlabels_cap, vpur_cap = label_from_top_examples(img_codes, cap_conc, concepts, top_n, min_purity)
    # (b) upper reference: ground-truth patch masks — a patch is an example, its concepts the object's there
    patch_conc = []
    for objs in lobjects:
        pc: list[set[str]] = [set() for _ in range(n_patch)]
        for o in objs:
            for q in np.nonzero(np.asarray(o["mask"], bool))[0]:
                pc[q] |= object_concepts(o)
        patch_conc += pc
    vlabels_mask, vpur_mask = label_from_top_examples(vcodes, patch_conc, concepts, top_n, min_purity)
    write_json(ev.run / "vision_sae" / "labels.json", {
        "labels": vlabels_cap, "purity": vpur_cap, "concepts": concepts,
        "method": "Neuronpedia-style from the top images (max over patches) and the concepts their captions name",
        "mask_labels": vlabels_mask, "mask_purity": vpur_mask,
        "mask_method": "upper reference: top patches and the ground-truth object at each (patch masks)"})
    with torch.no_grad():
        tcodes = ev.saes[edit_layer].encode(label_states[ev.vista_name].reshape(-1, patches.shape[-1]))
    vscale = _act_scale(vcodes)
    methods = {
        "vista": (ev.vista_name, ev.saes[edit_layer], ev.text_labels[edit_layer], _act_scale(tcodes),
                  "text SAE, labelled from text tokens"),
        "vision-only": (ev.base_name, vsae, vlabels_cap, vscale, "vision SAE, labelled from its top images' captions (fair baseline)"),
        "vision-only-masks": (ev.base_name, vsae, vlabels_mask, vscale,
                              "vision SAE, labelled from ground-truth patch masks (upper reference)"),
    }
    lpresent = [image_concepts(o) for o in lobjects]
    rows = {}
    for key, labs, pur in (("vision-only", vlabels_cap, vpur_cap), ("vision-only-masks", vlabels_mask, vpur_mask)):
        vm = matching_scores(vcodes.reshape(len(lobjects), n_patch, -1).mean(1), labs, lpresent, cfg.k)
        rows[key] = {**label_summary(labs, pur), "matching_rate_on_label_split": interval(vm)}
    return {"methods": methods, "vision_only_sae": rows, "grid": int(round(n_patch ** 0.5))}


def _edit_stage(ev: _EvalRun, methods: dict[str, tuple], unedited: dict[str, list[str]], grid: int) -> dict[str, Any]:
    """Stage 3: patch-local removal and replacement of one object per image by each method, on the images both
    projectors caption correctly; the replacement gain chosen per method on the first ``n_calib`` of them."""
    cfg, objects, images = ev.cfg, ev.objects, ev.images
    label_sets = [m[2] for m in methods.values()]
    plan_all = _edit_plan(objects, unedited[ev.vista_name], label_sets, cfg.seed)
    plan_ok_base = {p["image"] for p in _edit_plan(objects, unedited[ev.base_name], label_sets, cfg.seed)}
    plan = [p for p in plan_all if p["image"] in plan_ok_base]  # images both projectors caption correctly
    calib, evalp = plan[:cfg.n_calib], plan[cfg.n_calib:]
    edits: dict[str, Any] = {}
    example: dict[str, Any] = {}
    per_image: dict[str, dict[str, np.ndarray]] = {}

    def run_edits(method: str, pl: list[dict], mode: str, gain: float) -> tuple[list[str], dict[str, np.ndarray]]:
        _, sae, labels, scale, _ = methods[method]
        if not pl:
            return [], {"success": np.zeros(0), "in_place": np.zeros(0)}
        zero, setv = _edit_vectors(pl, objects, labels, scale, mode, gain)
        cells = [object_cells(objects[p["image"]][p["target"]], grid) for p in pl]

        def edit(start: int, stop: int) -> list[Any]:
            return [patch_edit(ev.edit_layer, sae, cells[start:stop], zero[start:stop], setv[start:stop])]

        caps = ev.captioner([images[p["image"]] for p in pl], edit)
        return caps, _score_edits(pl, objects, caps, mode)

    for method, (proj, _, labels, _, what) in methods.items():
        load_projector(ev.adapter, ev.run / "projectors" / f"{proj}.safetensors")
        res: dict[str, Any] = {"projector": proj, "what": what, "labelled_latents": sum(lab is not None for lab in labels)}
        caps, sc = run_edits(method, evalp, "remove", 1.0)
        res["removal"] = interval(sc["success"])
        per_image[method] = {"removal": sc["success"]}
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
        per_image[method]["replacement"] = sc["success"]
        edits[method] = res
    return {"edits": {"n_eligible": len(plan), "n_calibration": len(calib), "n_scored": len(evalp), **edits},
            "edit_gains": edit_gains(edits, per_image), "evalp": evalp, "example": example}


def _relative_gain(a: float, b: float) -> float:
    """``(a - b) / b``; ``inf`` when only VISTA succeeds, 0 when neither does, NaN when nothing was scored."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return float("nan")
    return (a - b) / b if b > 0 else (float("inf") if a > b else 0.0)


def edit_gains(edits: dict[str, Any], per_image: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    """VISTA's removal and replacement success against each vision-only reference: both means, their difference
    with a paired interval over the same images and edits, and the relative gain ``(a - b) / b`` (``inf`` when only
    VISTA succeeds, 0 when neither does, NaN when no image was scored)."""
    rel: dict[str, Any] = {}
    for ref in ("vision-only", "vision-only-masks"):
        rel[ref] = {}
        for measure in ("removal", "replacement"):
            a, b = edits["vista"][measure]["mean"], edits[ref][measure]["mean"]
            diff = per_image["vista"][measure] - per_image[ref][measure]  # paired: the same images and edits
            rel[ref][measure] = {"vista": a, "reference": b, "absolute_gain": a - b,
                                 "absolute_gain_interval": interval(diff),
                                 "relative_gain": _relative_gain(a, b)}
    return rel


def eval_world(run: str | Path, cfg: EvalConfig | None = None, progress: bool = True) -> dict[str, Any]:
    """Evaluate a ``train_world`` run directory; writes ``metrics.json``, ``report.md``, ``edit_example.png``.

    Stages: open the run (:func:`_open_eval`), matching rate per setting (:func:`_matching_stage`), the vision-only
    SAE (:func:`_vision_only_stage`), patch-local edits (:func:`_edit_stage`, scored by :func:`edit_gains`)."""
    cfg = cfg or EvalConfig()
    run = Path(run)
    t0 = time.time()
    ev = _open_eval(run, cfg)
    matching = _matching_stage(ev, progress)
    timings = {"matching_s": time.time() - t0}
    vision = _vision_only_stage(ev, matching["label_states"], progress)
    timings["vision_sae_s"] = time.time() - t0 - timings["matching_s"]
    edited = _edit_stage(ev, vision["methods"], matching["unedited"], vision["grid"])
    timings["edits_s"] = time.time() - t0 - timings["matching_s"] - timings["vision_sae_s"]
    fig_path = None
    if edited["evalp"]:
        fig_path = _figure(run / "edit_example.png", edited["evalp"], ev.images, ev.objects, vision["grid"],
                           matching["unedited"][ev.vista_name], edited["example"], ev.vista_name)
    train_summary = json.loads((run / "train.json").read_text())
    metrics = {
        "train": {"config": ev.wcfg, "text_saes": train_summary["text_saes"],
                  "final": {n: h["history"][-1] for n, h in train_summary["projectors"].items()},
                  "timings": train_summary.get("timings", {})},
        "eval_config": asdict(cfg), "edit_layer": ev.edit_layer, "vista_setting": ev.vista_name,
        "baseline_setting": ev.base_name, "settings": matching["settings"], "matching_ratio": matching["matching_ratio"],
        "vision_only_sae": vision["vision_only_sae"], "edits": edited["edits"], "edit_gains": edited["edit_gains"],
        "paper": {"matching_rate_ratio": 3.0, "removal_gain": "+35% (arXiv v1) / +38% (ICML)",
                  "replacement_gain": "+47% (arXiv v1) / +58% (ICML)", "localisation": "DINOv2 best among encoders"},
        "timings": timings,
    }
    write_json(run / "metrics.json", metrics)
    write_atomic(run / "report.md", vista_world_report(metrics, fig_path is not None))
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
    for method in ("vista", "vision-only", "vision-only-masks"):
        lines.append((f"{method} remove", example[method]["remove"][pick]))
        lines.append((f"{method} replace → {p['new']}", example[method]["replace"][pick]))
    for k, (title, cap) in enumerate(lines):
        ax.text(0, 1 - k * 0.135, f"{title}:", fontsize=8.5, weight="bold", va="top", transform=ax.transAxes)
        ax.text(0, 1 - k * 0.135 - 0.055, cap, fontsize=8, va="top", wrap=True, transform=ax.transAxes)
    fig.suptitle(f"patch-local edits ({vista_name} projector + text SAE vs baseline projector + vision SAE, two labellings)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


__all__ = ["EvalConfig", "LLAVA_RELEASE", "MODELS", "RELEASE", "VistaSetting", "WorldVistaConfig", "caption_quality", "default_settings", "edit_gains", "eval_world",
           "label_text_sae", "train_world"]
