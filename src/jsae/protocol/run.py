"""The JSAE paper's protocol end to end on one VLM (``jsae demo``; by default the shipped toy LLaVA), one
function per stage, called in order by :func:`run_protocol`:

1. :func:`capture_stage` — pooled (image, caption) pairs at every layer, per data part;
2. :func:`train_stage` — every method of :mod:`jsae.protocol.methods` at every swept layer;
3. :func:`label_stage` — each SAE's features labelled on held-out pairs, SAE metrics, saved SAELens-style;
4. :func:`choose_concepts` — the concepts to sweep;
5. :func:`sweep_stage` — dose–response steering and suppression curves of every method's directions and
   of the oracle (difference of means) on a fixed strength grid (:mod:`jsae.protocol.sweep`);
6. :func:`statistics_stage` — r50, effect at a small strength and at matched preservation, image-bootstrap
   intervals, comparisons with the oracle (:mod:`jsae.protocol.stats`);
7. :func:`jsae.report.write_run_report` — ``report.md``, ``dose_response.png``, ``features.html`` read back
   from the run directory.

``ProtocolConfig(preset="reference")`` (``jsae demo --preset reference``) runs the JSAE reference code's
protocol as closely as this runner allows (:func:`apply_preset`; the prompts by :func:`reference_prompts`),
and the report lists every remaining difference (:func:`reference_differences`).

Writes into ``out`` (layout in :mod:`jsae.report.rundir`): ``run.json`` records the configuration and the
fingerprint of every data part, so that a directory holding another run, or the same run on other data, is
refused unless ``overwrite``.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from jsae.data.sources import CaptionSource, DataSource, WorldSource, check_fingerprint
from jsae.files import apply_umask, write_json
from jsae.labels import FeatureLabels, label_features
from jsae.protocol.methods import DEFAULT_RECIPE, METHODS, Method, train_methods
from jsae.protocol.sweep import RATIOS, Curve, SweepConfig, run_sweep, token_norm
from jsae.report.rundir import RunDir
from jsae.vlm import VLM
from jsae.saes.metrics import fvu

ARTEFACTS = ("report.md", "metrics.json", "dose_response.png", "features.html")


PRESETS = ("default", "reference")
#: The reference's absolute steering strengths: 0.2, 0.4, ..., 3.0.
REFERENCE_ALPHAS = tuple(round(0.2 * i, 1) for i in range(1, 16))
#: The reference's capture prompt (text view pooled over every attended non-image token of it).
REFERENCE_CAPTURE_TEMPLATE = "USER: <image>\n{caption}\nASSISTANT:"
#: The reference's captioning prompt: ``[INST] <image>\nDescribe the image. [/INST]``.
REFERENCE_CAPTION_TEMPLATE = "[INST] <image>\n{caption} [/INST]"
REFERENCE_CAPTION_PROMPT = "Describe the image."
REFERENCE_EPOCHS = 20

#: Where the default protocol steers, each reported on its own: the image tokens at prefill, the generated tokens at
#: every step, and both (what the JSAE reference does), so an effect at image+generated can be decomposed.
DEFAULT_POSITIONS = ("image", "generated", "image+generated")

#: What each preset sets for the fields left unset (``None``) — explicit values always win.  Under
#: ``"reference"``, ``d_sae=None`` means ``4 · d_in`` and ``steps`` is the TopK baseline's budget only (the JSAE
#: methods train ``epochs`` epochs by the reference recipe).
PRESET_CHOICES: dict[str, dict[str, Any]] = {
    "default": {"d_sae": 128, "steps": 2000, "max_new_tokens": 32, "text_positions": "caption", "steer_at": "image",
                "alphas": None, "epochs": None},
    "reference": {"d_sae": None, "steps": 600, "max_new_tokens": 50, "text_positions": "non_image",
                  "steer_at": "image+generated", "alphas": REFERENCE_ALPHAS, "epochs": REFERENCE_EPOCHS},
}


@dataclass
class ProtocolConfig:
    """The protocol's settings.  Fields marked *preset* are filled by :func:`apply_preset` when left unset
    (``None``): ``preset="default"`` gives jsae's own protocol, ``preset="reference"`` the JSAE reference code's."""

    model: str = "llava"
    n_train: int = 2000
    n_label: int = 400
    n_eval: int = 1200
    layers: list[int] | None = None  # default: 4 layers spread over the depth
    n_sweep_layers: int = 4
    concepts: list[str] | None = None  # default: every object type of the world (real data: the most frequent words)
    concept_set: str = "types"  # world default concepts: "types" | "types+colours" | "all" (types, categories, colours)
    max_concepts: int = 6
    methods: tuple[str, ...] = METHODS
    d_sae: int | None = None  # preset: 128 (default) | None = 4 · d_in (reference)
    expansion_factor: int | None = None  # d_sae = expansion_factor · d_in instead of d_sae (the paper: 4)
    revival: bool = True  # dead-latent revival: JSAE resampling, AuxK for the TopK baseline (methods.py)
    steps: int | None = None  # preset: 2000 (default: every method) | 600 (reference: the TopK baseline only)
    epochs: int | None = None  # preset: None (default: steps) | 20 (reference: epochs of the JSAE methods)
    batch_size: int = 128
    lr: float = DEFAULT_RECIPE.lr
    n_images: int = 5  # sweep images per concept (without it: steering; with it: suppression), the same at every strength
    top_k: int = 3  # latents per (method, decoder, concept), ranked by correlation with the concept
    ratios: tuple[float, ...] = RATIOS  # strength grid × the mean per-token image-state norm (shared by every method)
    positions: tuple[str, ...] | None = None  # steering position sets reported separately (default: DEFAULT_POSITIONS; (steer_at,) when steer_at is given or under the reference preset)
    decoders: tuple[str, ...] = ("text", "vision")  # joint methods steer with each ("cross": vision labels, text rows)
    gen_batch: int = 256
    max_new_tokens: int | None = None  # preset: 32 (default) | 50 (reference)
    seed: int = 0
    data: str | None = None  # a COCO-captions-style dataset (path or hub id); required for a real VLM
    data_split: str = "train"
    prompt: str | None = None  # captioning prompt; default "" on the world, "Describe the image." on real data
    min_count: int = 5  # real data: a caption word is a concept when it occurs in this many labelling captions
    max_perplexity: float | None = None  # real data: fluency threshold (default 1.5x the unsteered 95th percentile)
    text_positions: str | None = None  # preset: "caption" | "non_image" (reference). Text pooling: "caption" tokens | every attended "non_image" token (the reference)
    prompt_template: str | None = None  # a raw capture prompt instead of the chat template, e.g. "USER: <image>\n{caption}\nASSISTANT:"
    caption_template: str | None = None  # a raw captioning prompt ({caption} = prompt), e.g. "[INST] <image>\n{caption} [/INST]"
    steer_at: str | None = None  # preset: "image" | "image+generated" (reference); the first steering position set
    alphas: tuple[float, ...] | None = None  # preset: None = relative ratios (default) | 0.2..3.0 absolute (reference)
    dedup_images: bool = True  # real data: one row per image, caption drawn with the seed
    dtype: str = "auto"  # of the VLM's weights ("auto": the checkpoint's; the toy models load in float32)
    device: str | None = None  # move the VLM to this device ("cuda")
    device_map: str | None = None  # or spread it with transformers' device_map ("auto")
    preset: str = "default"  # "default" | "reference" (see apply_preset)
    text_source: str = "dataset"  # text view: the dataset's captions | "generated": the VLM's own greedy captions
    reference_faults: bool = False  # reproduce the reference's faults: sweep on training images, in-sample latents, best α per image

    def __post_init__(self) -> None:
        steer_given = self.steer_at is not None
        apply_preset(self)
        if self.positions is None:
            self.positions = (self.steer_at,) if steer_given or self.preset == "reference" else DEFAULT_POSITIONS
        self.positions = tuple(self.positions)
        self.ratios, self.decoders = tuple(float(r) for r in self.ratios), tuple(self.decoders)

    @classmethod
    def reference(cls, **overrides: Any) -> "ProtocolConfig":
        """The JSAE reference protocol (:func:`apply_preset`), with ``overrides`` winning."""
        return cls(preset="reference", **overrides)

    @property
    def recipe(self) -> str:
        """The JSAE methods' training recipe (:func:`jsae.protocol.methods.train_methods`)."""
        return "reference" if self.preset == "reference" else "default"


def apply_preset(cfg: ProtocolConfig) -> ProtocolConfig:
    """Fill the unset (``None``) preset fields of ``cfg`` with the choices of ``cfg.preset`` (in place; returns
    ``cfg``).  Explicit values win.  ``"reference"`` (the JSAE reference code, ``anonymous-lab25/anonymous-jsae``):
    text pooled over every attended non-image token; steering at the image tokens and every generated token;
    absolute strengths 0.2, 0.4, ..., 3.0; 50 new tokens; the JSAE methods trained by
    :func:`jsae.training.recipes.reference_configs` (``d_sae = 4 · d_in``, batch 8, 20 epochs); the reference's
    prompts when the tokenizer knows their words (:func:`reference_prompts`, at run time)."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {list(PRESETS)}")
    if cfg.expansion_factor is not None:
        from jsae.protocol.methods import resolve_d_sae

        resolve_d_sae(1, cfg.d_sae, cfg.expansion_factor)  # one-line errors: both given, or not a whole number >= 1
    for key, value in PRESET_CHOICES[cfg.preset].items():
        if getattr(cfg, key) is None and not (key == "d_sae" and cfg.expansion_factor is not None):
            setattr(cfg, key, value)
    if cfg.alphas is not None:
        cfg.alphas = tuple(float(a) for a in cfg.alphas)
    if cfg.epochs is not None and cfg.preset != "reference":
        raise ValueError("epochs is an option of the reference recipe (preset 'reference'); the default recipe "
                         "trains --steps steps")
    return cfg


def _unknown_words(processor: Any, text: str) -> list[str]:
    """The words of ``text`` that the processor's tokenizer maps to its unknown token (none for a tokenizer
    without one, e.g. byte-level BPE)."""
    tok = getattr(processor, "tokenizer", processor)
    unk = getattr(tok, "unk_token_id", None)
    if unk is None:
        return []
    return [w for w in text.split() if unk in tok(w, add_special_tokens=False).input_ids]


def reference_prompts(cfg: ProtocolConfig, processor: Any, adapter: Any) -> tuple[ProtocolConfig, dict[str, Any]]:
    """Under ``preset="reference"``, the reference's raw prompts (capture ``USER: <image>\n{caption}\nASSISTANT:``,
    captioning ``[INST] <image>\nDescribe the image. [/INST]``) for the templates left unset, each only when
    the processor's tokenizer knows every word of it (decided from the vocabulary, not the model's name;
    ``<image>`` becomes the model's own image placeholder).  Otherwise the model's own prompt is kept and the
    note says why.  Returns ``(cfg with the templates set, notes)``; the default preset returns ``cfg``
    unchanged and no notes."""
    from dataclasses import replace

    if cfg.preset != "reference":
        return cfg, {}
    image = adapter.plain_prompt("", 1, processor)
    notes: dict[str, Any] = {}
    changes: dict[str, Any] = {}
    if cfg.prompt_template is None:
        unknown = _unknown_words(processor, REFERENCE_CAPTURE_TEMPLATE.replace("<image>", " ").replace("{caption}", " "))
        notes["capture"] = {"reference": REFERENCE_CAPTURE_TEMPLATE, "used": not unknown, "unknown_words": unknown}
        if not unknown:
            changes["prompt_template"] = REFERENCE_CAPTURE_TEMPLATE.replace("<image>", image)
    else:
        notes["capture"] = {"reference": REFERENCE_CAPTURE_TEMPLATE, "used": False, "given": cfg.prompt_template}
    if cfg.caption_template is None and cfg.prompt in (None, REFERENCE_CAPTION_PROMPT):
        text = REFERENCE_CAPTION_TEMPLATE.replace("<image>", " ").replace("{caption}", REFERENCE_CAPTION_PROMPT)
        unknown = _unknown_words(processor, text)
        notes["caption"] = {"reference": REFERENCE_CAPTION_TEMPLATE.replace("{caption}", REFERENCE_CAPTION_PROMPT),
                            "used": not unknown, "unknown_words": unknown}
        if not unknown:
            changes["caption_template"] = REFERENCE_CAPTION_TEMPLATE.replace("<image>", image)
            changes["prompt"] = REFERENCE_CAPTION_PROMPT
    else:
        notes["caption"] = {"reference": REFERENCE_CAPTION_TEMPLATE.replace("{caption}", REFERENCE_CAPTION_PROMPT),
                            "used": False, "given": cfg.caption_template or cfg.prompt}
    return (replace(cfg, **changes) if changes else cfg), notes


def data_source(cfg: ProtocolConfig) -> DataSource:
    """The world, or consecutive slices of ``cfg.data``: parts ``train``, ``label`` and ``eval``."""
    if cfg.data is None:
        return WorldSource.protocol(cfg.n_train, cfg.n_label, cfg.n_eval, cfg.seed)
    src = CaptionSource.protocol(cfg.data, cfg.data_split, cfg.n_train, cfg.n_label, cfg.n_eval, min_count=cfg.min_count,
                                 max_perplexity=cfg.max_perplexity)
    src.dedup_images, src.seed = cfg.dedup_images, cfg.seed
    return src


def default_layers(n_layers: int, k: int, last: bool = False) -> list[int]:
    """``k`` layers spread from the first to the last decoder layer (``last``) or to the one before it: at the
    last layer, edits of the prompt's states at prefill are read by nothing, so they are null by construction."""
    top = n_layers - 1 if last or n_layers < 2 else n_layers - 2
    return sorted({int(round(x)) for x in np.linspace(0, top, k)})


def check_config(cfg: ProtocolConfig) -> None:
    """One-line errors for a configuration that cannot run, before anything is loaded or written."""
    from jsae.world import MODEL_NAMES, world_concepts

    if cfg.model not in MODEL_NAMES and cfg.data is None:
        raise ValueError(f"{cfg.model!r} is not a shipped toy model ({', '.join(MODEL_NAMES)}): pass --data with a "
                         "COCO-captions-style dataset (path or hub id) to run the protocol on it")
    if cfg.data is None and cfg.concepts:
        _check_concepts(cfg.concepts, world_concepts(), "the world's")
    if cfg.data is None:  # before the model is loaded: the world's parts are generated in memory
        from jsae.data.sources import check_world_pairs

        check_world_pairs(cfg.n_train + cfg.n_label + cfg.n_eval, "n_train + n_label + n_eval")
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    from jsae.capture import TEXT_POSITIONS
    from jsae.protocol.sweep import STEER_AT

    if cfg.text_positions not in TEXT_POSITIONS:
        raise ValueError(f"unknown text pooling {cfg.text_positions!r}; choose one of {list(TEXT_POSITIONS)}")
    if cfg.steer_at not in STEER_AT:
        raise ValueError(f"unknown steer_at {cfg.steer_at!r}; choose one of {list(STEER_AT)}")
    bad = [p for p in cfg.positions if p not in STEER_AT]
    if bad:
        raise ValueError(f"unknown steering positions {bad}; choose from {list(STEER_AT)}")
    if cfg.text_source not in ("dataset", "generated"):
        raise ValueError(f"unknown text source {cfg.text_source!r}; choose 'dataset' or 'generated'")
    if cfg.concept_set not in CONCEPT_SETS:
        raise ValueError(f"unknown concept set {cfg.concept_set!r}; choose one of {list(CONCEPT_SETS)}")
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {list(PRESETS)}")


#: Settings by which a run can grow in place (``jsae demo --out DIR`` again with more of them): the capture and the
#: SAEs of the run stay valid, and the curves of its layers and concepts are reused; only what is missing runs.
GROWABLE = ("layers", "concepts")
#: Settings of the sweep alone: a run with other values of these reuses the capture and the SAEs, and measures its
#: curves again (``--n-images`` for more images per concept, another ``--ratios`` grid, ...).
SWEEP_ONLY = ("n_images", "top_k", "ratios", "positions", "decoders", "max_new_tokens", "alphas", "gen_batch")


def config_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The settings (other than :data:`GROWABLE` ones) in which two runs' recorded configurations differ, each as
    ``"name: old there, new here"``."""
    keys = [k for k in [*old, *(k for k in new if k not in old)]
            if k not in GROWABLE + SWEEP_ONLY and old.get(k) != new.get(k)]
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} here" for k in keys]


def open_run(out: Path, cfg: ProtocolConfig, source: DataSource, overwrite: bool, progress: bool = False) -> RunDir:
    """The run directory for ``cfg``: a new one, the same run to resume or to grow (other ``layers`` or
    ``concepts``, :data:`GROWABLE`), or (``overwrite``) a replaced one; a directory holding a run with other
    settings (the error names them), or this run on other data, is refused — the settings are compared before the
    data is generated and fingerprinted."""
    from jsae.locks import LOCK_FILE

    run = RunDir(out)
    config = _jsonable(asdict(cfg))
    old = None
    if out.exists() and any(f.name != LOCK_FILE for f in out.iterdir()):
        if not run.exists() and not overwrite:
            raise FileExistsError(f"{out} is not empty and holds no jsae run; choose a new --out or pass --overwrite")
        if run.exists() and not overwrite:
            old = run.run_info()
            diff = config_differences(old.get("config") or {}, config)
            if diff:
                raise FileExistsError(f"{out} holds a run with other settings ({'; '.join(diff)}); a run grows in "
                                      "place only by --layers, --concepts and the sweep's own options ("
                                      f"{', '.join('--' + g.replace('_', '-') for g in SWEEP_ONLY if g != 'gen_batch')}):"
                                      " pass its other options as they were, --overwrite to replace it, or a new --out")
    if progress:
        tqdm.write(f"{'checking the data against the run in ' + str(out) if old else 'preparing the data'}: generating "
                   f"and fingerprinting the {' / '.join(source.parts)} pairs (this can take a minute)")
    fingerprints = {part: source.fingerprint(part) for part in source.parts}
    if old is not None:
        for part, fp in fingerprints.items():
            check_fingerprint(old.get("data", {}).get(part), fp, f"the run in {out} ({part} part)",
                              "pass --overwrite to redo it or choose a new --out")
    if overwrite and out.exists():
        _empty(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(run.run_file, {"config": config, "data": fingerprints, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return run


def _empty(out: Path) -> None:
    """Remove everything in ``out`` but its lock file (held by this process)."""
    from jsae.locks import LOCK_FILE

    for f in out.iterdir():
        if f.name == LOCK_FILE:
            continue
        if f.is_dir() and not f.is_symlink():
            shutil.rmtree(f)
        else:
            f.unlink()


def _jsonable(obj: Any) -> Any:
    import json

    return json.loads(json.dumps(obj))


# ---- 1. capture ---------------------------------------------------------------------------------------


def capture_stage(run: RunDir, cfg: ProtocolConfig, vlm: VLM, source: DataSource, parts: tuple[str, ...] = ("train", "label"),
                  progress: bool = True) -> dict[str, Path]:
    """Pooled pairs of every part at every decoder layer (resumable; the manifest holds the fingerprint)."""
    from jsae.capture import capture_pairs

    model, processor, adapter = vlm
    return {part: capture_pairs(model, source.pairs(part), layers=list(range(adapter.n_layers)), out_dir=run.capture_dir(part),
                                processor=processor, adapter=adapter, batch_size=64, progress=progress,
                                fingerprint=source.fingerprint(part), prompt_template=cfg.prompt_template,
                                text_positions=cfg.text_positions, dataset_path=getattr(source, "path", None))
            for part in parts}


# ---- 2. train -----------------------------------------------------------------------------------------


@dataclass
class LayerData:
    """One layer's pooled pairs: training (``v``, ``t``) and held-out labelling (``vl``, ``tl``)."""

    v: torch.Tensor
    t: torch.Tensor
    vl: torch.Tensor
    tl: torch.Tensor

    @property
    def state_norm(self) -> float:
        """Mean norm of the pooled vision vectors (the steering strength unit)."""
        return float(self.v.norm(dim=-1).mean())


def layer_data(captures: dict[str, Path], layer: int) -> LayerData:
    from jsae.capture import read_layer

    v, t, _ = read_layer(captures["train"], layer)
    vl, tl, _ = read_layer(captures["label"], layer)
    return LayerData(v.float(), t.float(), vl.float(), tl.float())


def train_stage(cfg: ProtocolConfig, vlm: VLM, captures: dict[str, Path], layers: list[int],
                progress: bool = True) -> tuple[dict[int, dict[str, Method]], dict[int, LayerData]]:
    """Every method at every swept layer, on the same pairs and budget."""
    from jsae.capture import EVAL_METADATA, sae_metadata

    methods_by_layer, data = {}, {}
    for layer in tqdm(layers, desc="training SAEs", disable=not progress):
        data[layer] = d = layer_data(captures, layer)
        evals = {k: v for k, v in sae_metadata(captures["train"], layer).items() if k in EVAL_METADATA}
        meta = {**evals, "model_name": cfg.model, **vlm.adapter.sae_metadata(layer, vlm.processor), "pooling": "mean"}
        methods_by_layer[layer] = train_methods(d.v, d.t, layer=layer, d_sae=cfg.d_sae, steps=cfg.steps,
                                                batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed, methods=cfg.methods,
                                                metadata=meta, recipe=cfg.recipe, expansion_factor=cfg.expansion_factor,
                                                revival=cfg.revival,
                                                reference={"epochs": cfg.epochs} if cfg.recipe == "reference" else None)
    return methods_by_layer, data


# ---- 3. label -----------------------------------------------------------------------------------------


def label_stage(run: RunDir, source: DataSource, methods_by_layer: dict[int, dict[str, Method]],
                data: dict[int, LayerData], vlm: VLM | None = None,
                cfg: ProtocolConfig | None = None) -> tuple[dict[int, dict[str, FeatureLabels]], list[dict[str, Any]]]:
    """Label every SAE's features on the held-out pairs, measure it (also on per-token image states of 32
    labelling images when ``vlm`` is given), and save it with its labels."""
    from jsae.protocol.sweep import image_token_states, text_token_states

    y, names = source.presence("label")
    described = source.describe("label")
    labels_by_layer: dict[int, dict[str, FeatureLabels]] = {}
    rows: list[dict[str, Any]] = []
    images = [ex["image"] for ex in source.items("label")[:32]] if vlm is not None else []
    label_pairs = source.pairs("label") if vlm is not None else []
    pairs = [label_pairs[i] for i in range(min(32, len(label_pairs)))]
    for layer, methods in methods_by_layer.items():
        d = data[layer]
        tokens = (image_token_states(vlm, images, layer, caption_prompt(cfg or ProtocolConfig()),
                                     (cfg.caption_template if cfg else None)) if images else None)
        text_tokens = (text_token_states(vlm, pairs, layer, cfg.prompt_template if cfg else None,
                                         (cfg.text_positions or "caption") if cfg else "caption") if pairs else None)
        labels_by_layer[layer] = {}
        for name, m in methods.items():
            zv = m.codes(d.vl, "vision")
            zt = m.codes(d.tl, "text") if m.joint else torch.zeros_like(zv)
            labels = label_features(zv, zt, y, names, data=described)
            labels_by_layer[layer][name] = labels
            folder = run.sae_dir(name, layer)
            m.sae.save_model(folder) if m.joint else apply_umask(m.sae.save_model(str(folder))[0])
            labels.save(folder / "labels.json")
            row = sae_metrics(m, d.vl, d.tl, tokens, text_tokens)
            if m.joint:  # the model card's metrics (`jsae release push`)
                alignment = getattr(m.sae.cfg, "alignment", None)
                alignment = f"{alignment} + matching after training" if name == "separate" else alignment
                write_json(folder / "metrics.json", card_metrics(row, alignment, len(d.vl)))
            rows.append({"layer": layer, "method": name, **row, **labels.counts()})
    return labels_by_layer, rows


def _fvu(m: Method, x: torch.Tensor, modality: str) -> tuple[float, torch.Tensor]:
    z = m.codes(x, modality)
    recon = m.sae.decode(z, modality) if m.joint else m.sae.decode(z)
    return float(fvu(recon, x)), z


def _late_loss_drop(history: list[dict[str, float]] | None) -> float | None:
    """Relative drop of the logged training loss from the third to the last quarter of training (< 0.05: a
    plateau); None without a history of at least 8 points."""
    losses = [h["losses/overall_loss"] for h in history or [] if "losses/overall_loss" in h]
    if len(losses) < 8:
        return None
    q = len(losses) // 4
    prev, last = float(np.mean(losses[-2 * q:-q])), float(np.mean(losses[-q:]))
    return (prev - last) / prev if prev > 0 else None


@torch.no_grad()
def sae_metrics(m: Method, v: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor | None = None,
                text_tokens: torch.Tensor | None = None) -> dict[str, Any]:
    """FVU, L0 and dead latents per modality on held-out pools (dead: never fire on them), and the FVU on
    per-token states: ``fvu_vision_tokens`` on image-token states (``tokens``), ``fvu_text_tokens`` (joint SAEs)
    on the text tokens the text view pools (``text_tokens``); for a JSAE the alignment diagnostics: paired cosine of codes, *centred* paired cosine (each modality's
    mean code removed, so always-on latents do not count), the median over latents alive in both of the
    vision–text correlation of a latent's codes across pairs, and the share of code mass on the top latent.
    ``converged``: fewer than 10% dead latents in every modality and (when the trainer logged its loss: the JSAE
    trainer and, through :func:`~jsae.training.recipes.train_saelens_topk`, SAELens's) a late plateau: the loss
    fell by less than 5% from the third to the last quarter of training."""
    out: dict[str, Any] = {}
    codes = {}
    for name, x in (("vision", v), ("text", t)):
        if not m.joint and name == "text":
            continue
        out[f"fvu_{name}"], z = _fvu(m, x, name)
        codes[name] = z
        out[f"l0_{name}"] = float((z > 0).float().sum(-1).mean())
        out[f"dead_{name}"] = int((z.max(0).values <= 0).sum())
    if tokens is not None and len(tokens):
        out["fvu_vision_tokens"], _ = _fvu(m, tokens, "vision")
    if m.joint and text_tokens is not None and len(text_tokens):
        out["fvu_text_tokens"], _ = _fvu(m, text_tokens, "text")
    d_sae = out["d_sae"] = codes["vision"].shape[1]
    out["loss_drop_last_quarter"] = _late_loss_drop(getattr(m.sae, "training_history", None))
    out["converged"] = all(out[f"dead_{k}"] < 0.1 * d_sae for k in codes) and (
        out["loss_drop_last_quarter"] is None or out["loss_drop_last_quarter"] < 0.05)
    if m.joint:
        zv, zt = codes["vision"], codes["text"]
        cos = torch.nn.functional.cosine_similarity
        out["paired_cosine"] = float(cos(zv, zt, dim=-1).mean())
        out["centred_paired_cosine"] = float(cos(zv - zv.mean(0), zt - zt.mean(0), dim=-1).mean())
        alive = (zv.std(0) > 0) & (zt.std(0) > 0)
        if alive.any():
            a, b = zv[:, alive] - zv[:, alive].mean(0), zt[:, alive] - zt[:, alive].mean(0)
            r = (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0)).clamp(min=1e-12)
            out["median_latent_corr"] = float(r.median())
        else:
            out["median_latent_corr"] = None
        mass = zv.clamp(min=0).sum(0) + zt.clamp(min=0).sum(0)
        out["top_latent_mass"] = float(mass.max() / mass.sum().clamp(min=1e-12))
    return out


def card_metrics(row: dict[str, Any], alignment: str | None = None, n_pairs: int | None = None,
                 measured_on: str = "held-out pairs") -> dict[str, Any]:
    """An SAE folder's ``metrics.json`` (what ``jsae release push`` puts in the model card and ``jsae release
    list`` shows) from a :func:`sae_metrics` row: L0 and variance explained (1 − FVU) of the text branch under
    SAELens's names, the vision branch's with ``_vision``, dead latents, the paired code cosine, the alignment loss."""
    ve = lambda fvu: None if fvu is None else 1.0 - float(fvu)  # noqa: E731
    out = {"l0": row.get("l0_text"), "variance_explained": ve(row.get("fvu_text")), "l0_vision": row.get("l0_vision"),
           "variance_explained_vision": ve(row.get("fvu_vision")), "dead_text": row.get("dead_text"),
           "dead_vision": row.get("dead_vision"), "d_sae": row.get("d_sae"), "paired_cosine": row.get("paired_cosine"),
           "alignment": alignment, "measured_on": measured_on, "n_pairs": n_pairs}
    return {k: v for k, v in out.items() if v is not None}


# ---- 4. concepts --------------------------------------------------------------------------------------

CONCEPT_SETS = ("types", "types+colours", "all")


def choose_concepts(cfg: ProtocolConfig, judge: Any, items: list[dict]) -> tuple[list[str], dict[str, str]]:
    """``cfg.concepts``, or on the world every concept of ``cfg.concept_set`` (object types by default), or on
    real data the ``max_concepts`` most frequent concept words; a concept that some sweep images have and
    others lack (5–95%) is kept, the others are returned with the reason.  Returns (concepts, dropped)."""
    from jsae.world.scenes import COLORS, TYPES

    if cfg.concepts:
        _check_concepts(cfg.concepts, judge.concepts, "the labelling data's")
        return list(cfg.concepts), {}
    if cfg.data is None:
        wanted = {"types": list(TYPES), "types+colours": list(TYPES) + list(COLORS), "all": list(judge.concepts)}[cfg.concept_set]
    else:
        wanted = list(judge.concepts)
    rate = judge.presence(items).float().mean(0)
    dropped: dict[str, str] = {}
    kept = []
    for c in wanted:
        r = float(rate[judge.concepts.index(c)])
        if 0.05 <= r <= 0.95:
            kept.append((-r if cfg.data is not None else 0.0, c))
        else:
            dropped[c] = f"present in {r:.0%} of the sweep images (needs 5-95% to steer and suppress)"
    concepts = [c for _, c in sorted(kept, key=lambda x: x[0])] if cfg.data is not None else [c for _, c in kept]
    if cfg.data is not None:
        for c in concepts[cfg.max_concepts:]:
            dropped[c] = f"beyond the {cfg.max_concepts} most frequent (--max-concepts)"
        concepts = concepts[:cfg.max_concepts]
    if not concepts:
        raise RuntimeError("no concept is present in 5-95% of the sweep images; pass --concepts or more --n-eval")
    return concepts, dropped


def _check_concepts(asked: list[str], known: list[str], whose: str) -> None:
    unknown = [c for c in asked if c not in known]
    if unknown:
        raise ValueError(f"unknown concept(s) {unknown}; {whose} concepts are {known[:60]}")


# ---- 5. sweep -----------------------------------------------------------------------------------------


def caption_prompt(cfg: ProtocolConfig) -> str:
    """The captioning prompt: ``cfg.prompt``, else the world's (``describe the image``) or the reference's."""
    from jsae.world.processors import CAPTION_PROMPT

    return cfg.prompt if cfg.prompt is not None else (CAPTION_PROMPT if cfg.data is None else "Describe the image.")


def captioner_for(cfg: ProtocolConfig, vlm: VLM) -> Any:
    """Greedy captions of images with interventions, after the captioning prompt."""
    from jsae.interventions import Captioner

    return Captioner(vlm.model, vlm.processor, vlm.adapter, prompt=caption_prompt(cfg), batch_size=cfg.gen_batch,
                     max_new_tokens=cfg.max_new_tokens, prompt_template=cfg.caption_template)


def sweep_stage(cfg: ProtocolConfig, vlm: VLM, judge: Any, source: DataSource, methods_by_layer: dict[int, dict[str, Method]],
                data: dict[int, LayerData], layers: list[int], concepts: list[str], items: list[dict],
                progress: bool = True) -> tuple[list[Curve], list[Any], dict[str, str], dict[int, float]]:
    """Dose–response curves of every direction (oracle and methods) at every layer on the sweep images.
    Returns (curves, directions, skipped reasons, per-token image-state norm per layer)."""
    y, names = source.presence("train" if cfg.reference_faults else "label")  # in-sample latents: a reference fault
    pools = {L: (data[L].v, data[L].t) if cfg.reference_faults else (data[L].vl, data[L].tl) for L in layers}
    sweep_cfg = SweepConfig(layers=layers, concepts=concepts, methods=cfg.methods, decoders=cfg.decoders,
                            ratios=cfg.ratios, alphas=tuple(cfg.alphas) if cfg.alphas is not None else None,
                            n_images=cfg.n_images, top_k=cfg.top_k, positions=cfg.positions)
    images = [ex["image"] for ex in items]
    norms = {L: token_norm(vlm, images[:32], L, caption_prompt(cfg), cfg.caption_template) for L in layers}
    caption = captioner_for(cfg, vlm)
    if getattr(judge, "needs_calibration", False):
        judge.calibrate(caption(images[:64], []))
    curves, dirs, skipped = run_sweep(vlm, caption, methods_by_layer, pools, y, names, images, items, sweep_cfg, judge,
                                      norms, progress=progress)
    return curves, dirs, skipped, norms


# ---- 6. statistics ------------------------------------------------------------------------------------


def statistics_stage(cfg: ProtocolConfig, judge: Any, n_layers: int, layers: list[int], concepts: list[str],
                     sae_rows: list[dict[str, Any]], curves: list[Curve], timings: dict[str, float],
                     prompt_notes: dict[str, Any] | None = None, skipped: dict[str, str] | None = None,
                     norms: dict[int, float] | None = None, dropped: dict[str, str] | None = None) -> dict[str, Any]:
    """The run's metrics: SAE rows, every curve (per-strength means, per-image scores) with its summary and
    image-bootstrap intervals, the oracle comparisons, and (under the reference preset) the remaining
    differences from the reference."""
    from jsae.protocol.summary import summarise_curves

    metrics = {
        "model": cfg.model, "data": cfg.data or "world", "judge": type(judge).__name__, "n_layers": n_layers,
        "layers": layers, "concepts": concepts, "concepts_dropped": dropped or {}, "methods": list(cfg.methods),
        "config": _jsonable(asdict(cfg)), "saes": sae_rows, "token_norms": {str(k): v for k, v in (norms or {}).items()},
        "curves": [c.record() for c in curves], "scores": [c.scores() for c in curves], "skipped": skipped or {},
        "summary": summarise_curves(curves), "timings": timings,
    }
    metrics["model_quality"] = _toy_quality(cfg.model)
    if cfg.preset == "reference":
        metrics["reference"] = {"prompts": prompt_notes or {}, "differences": reference_differences(cfg, prompt_notes or {},
                                                                                                     n_layers, layers)}
    return metrics


def _toy_quality(model: str) -> dict[str, Any] | None:
    """The shipped toy model's validation record (``training.json``: caption accuracy, caption cross-entropy per
    template), None for other models."""
    import json

    from jsae.world import MODEL_NAMES
    from jsae.world.models import model_dir

    path = model_dir(model) / "training.json" if model in MODEL_NAMES else None
    if path is None or not path.is_file():
        return None
    out = dict(json.loads(path.read_text()).get("validation") or {})
    quality = path.with_name("quality.json")  # the world-fidelity gauges (`jsae world fidelity --write-quality`)
    if quality.is_file():
        fid = json.loads(quality.read_text()).get("fidelity") or {}
        if fid.get("summary"):
            out["fidelity"] = fid["summary"]
    return out


def reference_differences(cfg: ProtocolConfig, prompt_notes: dict[str, Any], n_layers: int, layers: list[int]) -> list[str]:
    """Every remaining difference of a ``preset="reference"`` run from the JSAE reference code, in plain words
    (from the run's own configuration where it decides)."""
    from jsae.world import MODEL_NAMES

    out: list[str] = []
    if cfg.model in MODEL_NAMES:
        out.append(f"Model: the shipped toy `{cfg.model}` (a small model trained on the embedded world), not "
                   "LLaVA-v1.6-Mistral-7B / Llama3-LLaVA-8B / Qwen3-VL-30B.")
    if cfg.data is None:
        out.append("Data: the embedded toy world (rendered scenes, grammar captions), not COCO captions "
                   "(`jxie/coco_captions`, a seeded sample of 50k unique images, one random caption each).")
    else:
        out.append(f"Data: {cfg.data} ({cfg.data_split}), cut into disjoint train / label / eval images"
                   + (" deduplicated by image with a seeded caption" if cfg.dedup_images else "")
                   + f" ({cfg.n_train} / {cfg.n_label} / {cfg.n_eval}), not the reference's 50k seeded sample whose "
                   "evaluation images come from the JSAE's training set (a reference fault not reproduced).")
    out.append(f"Training pairs: {cfg.n_train} (the reference: 50,000).")
    out.append("Concepts: one word each (" + ("an object type, category or colour of the world" if cfg.data is None
               else "a caption word") + ", " + ("given" if cfg.concepts else "every one present in 5-95% of the sweep images")
               + "), not the reference's 7 hand-listed scene categories (3-16 latent ids per layer + keywords + a target "
               "sentence each, from `experiments_config.xlsx`); to run such a table use `jsae run experiments --table`.")
    out.append("Latents: the top " + str(cfg.top_k) + " per concept and decoder ranked by code-concept correlation on "
               + ("the *training* pairs (in-sample, the reference fault)" if cfg.reference_faults else
                  "held-out labelling pairs (sound)") + ", not by hand as in the reference.")
    grid = "the reference grid 0.2..3.0" if cfg.alphas == REFERENCE_ALPHAS else f"the grid {list(cfg.alphas or [])}"
    out.append(f"Strength: every absolute α of {grid} on the same images (a dose-response curve per concept, layer and "
               "direction; r50 and effects read off it), not the reference's per-image upward walk that stops on the "
               "evaluation metric and on a sign-reversed perplexity rule"
               + (" (reproduced here as `effect_best_alpha`: each image's best α picked with the metric)."
                  if cfg.reference_faults else " (`--reference-faults` reproduces the per-image pick)."))
    out.append("Metrics: keyword hit = whole-word mention of the concept against the unsteered caption, preservation of "
               "the other objects, strict fluency and hallucinations per strength; SBERT similarity gain and GPT-2 "
               "perplexity need a target sentence per concept and are computed by `jsae run experiments` "
               "(`--similarity-model`, `--perplexity-model`), not in the demo.")
    if cfg.reference_faults:
        out.append("Reference faults reproduced (`--reference-faults`): sweep images drawn from the SAE's training "
                   "images; latents ranked in-sample on the training pairs; a per-image best α chosen with the "
                   "evaluation metric (`effect_best_alpha`, beside the sound r50 and effects).")
    else:
        out.append("Reference faults not reproduced (pass `--reference-faults` to): evaluation images disjoint from "
                   "training images, latents chosen out of sample, no α chosen with the evaluation metric, no "
                   "perplexity stopping rule.")
    for part, what in (("capture", "Capture prompt"), ("caption", "Captioning prompt")):
        note = prompt_notes.get(part, {})
        if note.get("used"):
            continue
        if "given" in note:
            out.append(f"{what}: {note['given']!r} given explicitly instead of the reference's {note['reference']!r}.")
        else:
            out.append(f"{what}: the model's own prompt kept, because its tokenizer lacks words of the reference's "
                       f"{note.get('reference')!r} (unknown: {note.get('unknown_words')}).")
    out.append(f"Layers: {layers} of {n_layers} (the reference: 7, 13, 25, 30 of LLaVA-v1.6-Mistral-7B's 32).")
    out.append("Training: `PairedTensorData` drops a last partial batch (the reference's DataLoader keeps it); fused "
               "Adam (the same update up to float rounding); the best epoch's weights are returned (the reference "
               "saves the best epoch and returns the last).")
    if "saelens-topk" in cfg.methods:
        out.append(f"Baseline not in the reference: `saelens-topk` keeps its own recipe ({cfg.steps} steps of batch "
                   f"{cfg.batch_size} at lr {cfg.lr}, unit-norm scaling) at the JSAEs' width: a matched width, not a "
                   "matched budget.")
    if "separate" in cfg.methods:
        out.append("Baseline not in the reference: `separate` = the no-alignment JSAE (reference recipe) with its text "
                   "latents paired to the vision latents afterwards (Hungarian matching of codes).")
    ref = PRESET_CHOICES["reference"]
    for key in ("text_positions", "steer_at", "max_new_tokens", "epochs", "d_sae"):
        if getattr(cfg, key) != ref[key]:
            out.append(f"Overridden: {key} = {getattr(cfg, key)!r} (the reference: "
                       f"{'4 · d_in' if key == 'd_sae' else repr(ref[key])}).")
    if cfg.expansion_factor not in (None, 4):
        out.append(f"Overridden: d_sae = {cfg.expansion_factor} · d_in (the reference: 4 · d_in).")
    return out


# ---- the runner ---------------------------------------------------------------------------------------


def run_protocol(out: str | Path, cfg: ProtocolConfig | None = None, overwrite: bool = False, progress: bool = True,
                 scores_out: bool = False) -> dict[str, Any]:
    """Run the protocol into ``out``; returns the metrics (with the curves under ``"_curves"`` if ``scores_out``).

    ``out`` is checked before anything is loaded and locked for the run (a second run on it gets a one-line
    error naming this process's pid).  A run that fails in a new (or empty) ``out`` removes what it wrote, so
    the corrected retry starts clean; an interrupted one (Ctrl-C, a kill) leaves it to resume."""
    from jsae.guards import check_output_dir
    from jsae.locks import LOCK_FILE, DirLock

    cfg = cfg or ProtocolConfig()
    check_config(cfg)
    out = check_output_dir(out, "--out")
    created = not out.exists()
    fresh = created or not any(f.name != LOCK_FILE for f in out.iterdir())
    try:
        with DirLock(out, "jsae demo run"):
            try:
                return _run_protocol(out, cfg, overwrite, progress, scores_out)
            except Exception:
                if fresh:
                    _empty(out)
                raise
    except Exception:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _run_protocol(out: Path, cfg: ProtocolConfig, overwrite: bool, progress: bool, scores_out: bool) -> dict[str, Any]:
    from jsae.report import write_run_report
    from jsae.vlm import load_vlm

    t0, c0 = time.time(), time.process_time()
    timings: dict[str, float] = {}
    vlm = load_vlm(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map)
    from jsae.protocol.sweep import POSITION_SETS

    every_step = any(tm == "every_step" for p in cfg.positions for _, tm in POSITION_SETS[p])
    layers = cfg.layers or default_layers(vlm.adapter.n_layers, cfg.n_sweep_layers, last=every_step)
    for layer in layers:
        vlm.adapter.check_layer(layer)
    cfg, prompt_notes = reference_prompts(cfg, vlm.processor, vlm.adapter)
    cfg = world_prompts(cfg, vlm.processor)
    source = data_source(cfg)
    if cfg.text_source == "generated":  # the text view pools captions the model itself produces
        caption = captioner_for(cfg, vlm)
        for part in ("train", "label"):
            source.with_captions(part, caption([ex["image"] for ex in source.items(part)], []))
    run = open_run(Path(out), cfg, source, overwrite, progress)  # refuses another run before anything is written
    previous = _previous_run(run, cfg) if not overwrite else None

    captures = capture_stage(run, cfg, vlm, source, progress=progress)
    timings["capture_s"], timings["capture_cpu_s"] = time.time() - t0, time.process_time() - c0
    judge = source.judge(vlm.model, vlm.processor)
    if cfg.concepts:
        _check_concepts(cfg.concepts, judge.concepts, "the labelling data's")
    kept = [L for L in layers if previous and L in previous["layers"]
            and all((run.sae_dir(m, L) / "cfg.json").is_file() for m in cfg.methods)]
    new = [L for L in layers if L not in kept]
    if kept and progress:
        tqdm.write(f"growing the run in {out}: reusing the capture and the SAEs of layer(s) {kept}"
                   + (f"; training layer(s) {new}" if new else ""))
    methods_by_layer, data = train_stage(cfg, vlm, captures, new, progress)
    labels_by_layer, sae_rows = label_stage(run, source, methods_by_layer, data, vlm, cfg)
    for L in kept:
        methods_by_layer[L], data[L] = load_methods(run, L, cfg.methods), layer_data(captures, L)
    sae_rows = sorted(sae_rows + [r for r in (previous or {}).get("saes", []) if r["layer"] in kept],
                      key=lambda r: (layers.index(r["layer"]), list(cfg.methods).index(r["method"])))
    methods_by_layer = {L: methods_by_layer[L] for L in layers}
    timings["train_label_s"] = time.time() - t0 - timings["capture_s"]
    timings["train_label_cpu_s"] = time.process_time() - c0 - timings["capture_cpu_s"]
    items = source.items("train" if cfg.reference_faults else "eval")  # the reference evaluates on training images
    concepts, dropped = choose_concepts(cfg, judge, items)
    same_sweep = previous is not None and all((previous.get("config") or {}).get(k) == _jsonable(asdict(cfg)).get(k)
                                              for k in SWEEP_ONLY)
    old_curves = _previous_curves(previous, kept, concepts) if same_sweep else {}
    curves, skipped, norms = [], dict((previous or {}).get("skipped", {}) if same_sweep else {}), {}
    todo = [(new, concepts)] + [([L], [c for c in concepts if (L, c) not in old_curves]) for L in kept]
    for todo_layers, todo_concepts in todo:
        if todo_layers and todo_concepts:
            c, _, sk, nm = sweep_stage(cfg, vlm, judge, source, methods_by_layer, data, todo_layers, todo_concepts,
                                       items, progress)
            curves += c
            skipped.update(sk)
            norms.update(nm)
    for L in kept:
        if str(L) in (previous or {}).get("token_norms", {}):
            norms.setdefault(L, float(previous["token_norms"][str(L)]))
        curves += [c for (layer, concept), cs in old_curves.items() if layer == L and concept in concepts for c in cs]
    curves.sort(key=lambda c: (layers.index(c.layer), concepts.index(c.concept)))
    norms = {L: norms[L] for L in layers}
    if kept and progress:
        tqdm.write(f"reused {sum(len(v) for v in old_curves.values())} curves of layer(s) {kept}")
    timings["sweep_s"] = time.time() - t0 - timings["capture_s"] - timings["train_label_s"]
    timings["sweep_cpu_s"] = time.process_time() - c0 - timings["capture_cpu_s"] - timings["train_label_cpu_s"]
    timings["total_s"] = time.time() - t0  # capture to statistics (the report is written from the files after)
    timings["total_cpu_s"] = time.process_time() - c0  # CPU time of this process: what a stage costs beside other jobs
    metrics = statistics_stage(cfg, judge, vlm.adapter.n_layers, layers, concepts, sae_rows, curves, timings, prompt_notes,
                               skipped, norms, dropped)
    write_json(run.metrics_file, metrics)
    write_run_report(run, vlm, source.pairs("label"))
    if scores_out:
        metrics["_curves"] = curves
    return metrics


def _previous_run(run: RunDir, cfg: ProtocolConfig) -> dict[str, Any] | None:
    """The metrics of the finished run in ``run`` that this one grows (the same settings but for
    :data:`GROWABLE`; :func:`open_run` has checked them and the data), else None."""
    try:
        metrics = run.metrics()
    except (FileNotFoundError, ValueError):
        return None
    return metrics if not config_differences(metrics.get("config") or {}, _jsonable(asdict(cfg))) else None


def _previous_curves(previous: dict[str, Any] | None, layers: list[int],
                     concepts: list[str]) -> dict[tuple[int, str], list[Curve]]:
    """The curves of a previous run at ``layers`` and ``concepts``, by (layer, concept); none from a run written
    before the per-image scores were kept in full."""
    from jsae.protocol.sweep import Curve

    out: dict[tuple[int, str], list[Curve]] = {}
    if not previous:
        return out
    try:
        for rec, sc in zip(previous["curves"], previous["scores"]):
            if rec["layer"] in layers and rec["concept"] in concepts:
                out.setdefault((rec["layer"], rec["concept"]), []).append(Curve.from_metrics(rec, sc))
    except KeyError:
        return {}
    return out


def load_methods(run: RunDir, layer: int, methods: tuple[str, ...]) -> dict[str, Method]:
    """The SAEs a run saved at ``layer`` (``saes/<method>/layer_<L>``), as :class:`Method` objects."""
    from sae_lens import SAE

    from jsae.saes.joint_sae import JointSAE

    out = {}
    for name in methods:
        folder = run.sae_dir(name, layer)
        if name == "saelens-topk":
            out[name] = Method(name, SAE.load_from_disk(str(folder)), False)
        else:
            out[name] = Method(name, JointSAE.load_from_disk(folder), True)
    return out


def world_prompts(cfg: ProtocolConfig, processor: Any) -> ProtocolConfig:
    """On the world, text is pooled where the toy model expects a caption: as the answer to its captioning
    prompt (:func:`jsae.world.models.answer_template`), unless a capture template is given."""
    from dataclasses import replace

    from jsae.world import MODEL_NAMES

    if cfg.data is not None or cfg.prompt_template is not None or cfg.model not in MODEL_NAMES:
        return cfg
    from jsae.world.models import answer_template

    return replace(cfg, prompt_template=answer_template(cfg.model, processor))


__all__ = ["ARTEFACTS", "PRESETS", "PRESET_CHOICES", "REFERENCE_ALPHAS", "REFERENCE_CAPTION_PROMPT",
           "REFERENCE_CAPTION_TEMPLATE", "REFERENCE_CAPTURE_TEMPLATE", "LayerData", "ProtocolConfig", "apply_preset",
           "reference_differences", "reference_prompts", "capture_stage", "check_config", "choose_concepts", "data_source",
           "GROWABLE", "SWEEP_ONLY", "card_metrics", "config_differences", "default_layers", "label_stage", "load_methods", "open_run", "run_protocol", "statistics_stage", "sweep_stage", "train_stage",
           "world_prompts"]
