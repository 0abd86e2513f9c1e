"""The protocol's settings: :class:`ProtocolConfig`, its presets (:func:`apply_preset`; the reference preset's
choices live in :mod:`jsae.protocol.reference`), its validation before anything is loaded (:func:`check_config`),
what a run may change and still grow in place (:data:`GROWABLE`, :data:`SWEEP_ONLY`, :func:`config_differences`),
and what the settings resolve to at run time (layers, data source, prompts)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from jsae.data.sources import CaptionSource, DataSource, WorldSource
from jsae.protocol.methods import DEFAULT_RECIPE, METHODS
from jsae.protocol.reference import REFERENCE_CHOICES
from jsae.protocol.sweep import RATIOS

PRESETS = ("default", "reference")

#: Where the default protocol steers, each reported on its own: the image tokens at prefill, the generated tokens at
#: every step, and both (what the JSAE reference does), so an effect at image+generated can be decomposed.
DEFAULT_POSITIONS = ("image", "generated", "image+generated")


#: What each preset sets for the fields left unset (``None``) — explicit values always win.  Under
#: ``"reference"`` (:data:`jsae.protocol.reference.REFERENCE_CHOICES`), ``d_sae=None`` means ``4 · d_in`` and
#: ``steps`` is the TopK baseline's budget only (the JSAE methods train ``epochs`` epochs by the reference recipe).
PRESET_CHOICES: dict[str, dict[str, Any]] = {
    "default": {"d_sae": 128, "steps": 2000, "max_new_tokens": 32, "text_positions": "caption", "steer_at": "image",
                "alphas": None, "epochs": None},
    "reference": REFERENCE_CHOICES,
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
    prompts when the tokenizer knows their words (:func:`~jsae.protocol.reference.reference_prompts`, at run time)."""
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
        check_concepts(cfg.concepts, world_concepts(), "the world's")
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


CONCEPT_SETS = ("types", "types+colours", "all")


def check_concepts(asked: list[str], known: list[str], whose: str) -> None:
    """A one-line error naming the concepts of ``asked`` that are not in ``known`` (``whose`` concepts)."""
    unknown = [c for c in asked if c not in known]
    if unknown:
        raise ValueError(f"unknown concept(s) {unknown}; {whose} concepts are {known[:60]}")


def caption_prompt(cfg: ProtocolConfig) -> str:
    """The captioning prompt: ``cfg.prompt``, else the world's (``describe the image``) or the reference's."""
    from jsae.world.processors import CAPTION_PROMPT

    return cfg.prompt if cfg.prompt is not None else (CAPTION_PROMPT if cfg.data is None else "Describe the image.")


def world_prompts(cfg: ProtocolConfig, processor: Any) -> ProtocolConfig:
    """On the world, text is pooled where the toy model expects a caption: as the answer to its captioning
    prompt (:func:`jsae.world.models.answer_template`), unless a capture template is given."""
    from dataclasses import replace

    from jsae.world import MODEL_NAMES

    if cfg.data is not None or cfg.prompt_template is not None or cfg.model not in MODEL_NAMES:
        return cfg
    from jsae.world.models import answer_template

    return replace(cfg, prompt_template=answer_template(cfg.model, processor))


def config_record(cfg: ProtocolConfig) -> dict[str, Any]:
    """``cfg`` as the plain JSON record a run keeps in ``run.json`` and ``metrics.json`` (tuples as lists)."""
    return json.loads(json.dumps(asdict(cfg)))


__all__ = ["CONCEPT_SETS", "DEFAULT_POSITIONS", "GROWABLE", "PRESETS", "PRESET_CHOICES", "SWEEP_ONLY", "ProtocolConfig",
           "apply_preset", "caption_prompt", "check_concepts", "check_config", "config_differences", "config_record",
           "data_source", "default_layers", "world_prompts"]
