"""Building jsae releases (the pipeline behind ``jsae release build`` and ``build-shipped``, whose commands
are in :mod:`jsae.cli.release`).

* :func:`build_release` runs release recipes (:class:`BuildConfig`, a YAML file: model, data, layer, SAE and
  training settings): capture of pooled (image, caption) pairs, JSAE training, feature labels, and a
  SAELens directory ``OUT/<release>/<sae_id>/{cfg.json, sae_weights.safetensors, labels.json, metrics.json}``.
  The real-model recipes ship in ``jsae/pretrained/recipes/``.
* :func:`build_shipped` re-trains the toy releases shipped in the package
  (``jsae/pretrained/<release>/<sae_id>/``) and rewrites their entries in ``jsae/releases.yaml``
  (:func:`write_releases_yaml`).
* :func:`list_releases`: every jsae release (shipped, cached or only listed).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from jsae.files import replace_dir
from jsae.protocol.methods import DEFAULT_RECIPE
from jsae.releases.registry import PACKAGE_ROOT, RECIPES, RELEASES, read_releases_yaml, releases_yaml_path
from jsae.saes.metrics import explained_variance

PRETRAINED = "pretrained"
RECIPE_DIR = PACKAGE_ROOT / PRETRAINED / "recipes"
SHIPPED_MODELS = {"llava": "shapes-llava", "qwen3-vl-moe": "shapes-qwen3-vl-moe"}
SHIPPED_LAYERS = (4, 6)


# ---- one release from a recipe ------------------------------------------------------------------


@dataclass
class BuildConfig:
    """One release recipe.  ``model``: a toy model name (``llava``, ``qwen3-vl-moe``) or a hub id / path of a
    real VLM; ``data``: a COCO-captions-style dataset (path or hub id), or ``None`` for the embedded world."""

    release: str
    model: str
    layer: int
    data: str | None = None
    split: str = "train"
    label_split: str = "validation"
    n_train: int = 2000
    n_label: int = 400
    pooling: str = "mean"
    dtype: str = "float32"
    device_map: str | None = None
    capture_batch_size: int = 32
    d_sae: int = 128
    activation: str = "relu"
    k: int = 32
    alignment: str = "cosine"
    l1_coefficient: float = 0.03
    steps: int = 600
    batch_size: int = 128
    lr: float = DEFAULT_RECIPE.lr
    seed: int = 0
    train_device: str = "auto"  # "auto": cuda when available
    repo_id: str | None = None  # where the release is published (listed in releases.yaml)

    @classmethod
    def from_file(cls, path: str | Path) -> "BuildConfig":
        path = Path(path)
        if not path.is_file() and (RECIPE_DIR / f"{path.name}.yaml").is_file():
            path = RECIPE_DIR / f"{path.name}.yaml"  # a shipped recipe, by release name
        if not path.is_file():
            raise FileNotFoundError(f"no recipe file {path}; shipped recipes: {sorted(p.name for p in RECIPE_DIR.glob('*.yaml'))}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            where = getattr(exc, "problem_mark", None)
            at = f" at line {where.line + 1}" if where is not None else ""
            raise ValueError(f"{path} is not valid recipe YAML{at} ({getattr(exc, 'problem', None) or type(exc).__name__}); "
                             "write plain `key: value` lines (no tags such as !!python)") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe is a mapping of `key: value` lines, got a {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown recipe key(s) {unknown}; known keys: {sorted(known)}")
        missing = [k for k in ("release", "model", "layer") if k not in data]
        if missing:
            raise ValueError(f"{path}: the recipe lacks {missing}")
        _check_types(path, data)
        return cls(**data)


def _check_types(path: Path, data: dict[str, Any]) -> None:
    """One line per recipe value of the wrong kind (``steps: many``), before anything runs."""
    kinds = {"int": (int,), "float": (int, float), "str": (str,)}
    for f in fields(BuildConfig):
        if f.name not in data:
            continue
        v, ann = data[f.name], str(f.type)
        base = ann.split("|")[0].strip()
        if v is None and "None" in ann:
            continue
        ok = kinds.get(base)
        if ok is not None and (not isinstance(v, ok) or isinstance(v, bool)):
            raise ValueError(f"{path}: {f.name} must be {'a number' if base == 'float' else 'an integer' if base == 'int' else 'text'}"
                             f", got {v!r}; fix that line of the recipe")
        if base in ("int", "float") and isinstance(v, (int, float)) and f.name not in ("layer", "seed", "l1_coefficient") and v <= 0:
            raise ValueError(f"{path}: {f.name} must be positive, got {v!r}; fix that line of the recipe")


def _source(cfg: BuildConfig, part: str, split: str, n: int) -> Any:
    """The data of one part (``train`` or ``label``): ``n`` world pairs of ``split``, or the first ``n`` rows of
    ``split`` of the caption dataset (read lazily)."""
    from jsae.data.sources import CaptionSource, WorldSource

    if cfg.data is None:
        return WorldSource({part: (split, n)}, cfg.seed)
    return CaptionSource(path=cfg.data, data_split=split, sizes={part: n}, label_part=part)


def _load_model(cfg: BuildConfig) -> tuple[Any, Any, Any]:
    from jsae.vlm import load_vlm

    return load_vlm(cfg.model, dtype=cfg.dtype, device_map=cfg.device_map)


def build_release(cfgs: BuildConfig | list[BuildConfig], out_root: str | Path, work_dir: str | Path | None = None,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Build one or more releases of the *same model and data* (one capture for all their layers).

    Each release goes to ``out_root/<release>/<sae_id>/`` (written in a temporary sibling, then renamed).
    Returns one ``releases.yaml`` entry per release (with ``l0`` and ``variance_explained`` measured on
    the held-out labelling pairs; for a JSAE these are the text branch's, SAELens's default branch)."""
    import torch

    from jsae.capture import EVAL_METADATA, capture_pairs, sae_metadata
    from jsae.labels import label_features
    from jsae.training import load_pairs

    cfgs = [cfgs] if isinstance(cfgs, BuildConfig) else list(cfgs)
    base = cfgs[0]
    for c in cfgs[1:]:
        if (c.model, c.data, c.split, c.n_train, c.n_label, c.pooling, c.seed) != (
                base.model, base.data, base.split, base.n_train, base.n_label, base.pooling, base.seed):
            raise ValueError("build_release builds several releases only from one model, data set and pooling")
    torch.manual_seed(base.seed)
    out_root = Path(out_root)
    own_work = work_dir is None
    work = Path(work_dir) if work_dir else out_root / f".build-{uuid.uuid4().hex[:8]}"
    model, processor, adapter = _load_model(base)
    layers = sorted({adapter.check_layer(c.layer) for c in cfgs})
    entries = []
    try:
        caps, sources = {}, {}
        for part, split, n in (("train", base.split, base.n_train), ("label", base.label_split, base.n_label)):
            source = sources[part] = _source(base, part, split, n)
            caps[part] = capture_pairs(model, source.pairs(part), layers=layers, out_dir=work / part, processor=processor,
                                       adapter=adapter, pooling=base.pooling, batch_size=base.capture_batch_size,
                                       fingerprint=source.fingerprint(part), progress=progress,  # type: ignore[arg-type]
                                       dataset_path=getattr(source, "path", None))
        y, names = sources["label"].presence("label")
        described = sources["label"].describe("label")
        for cfg in cfgs:
            tr = load_pairs(caps["train"], cfg.layer, batch_size=1, shuffle=False)
            ho = load_pairs(caps["label"], cfg.layer, batch_size=1, shuffle=False)
            sae_id = adapter.hook_name(cfg.layer)
            evals = {k: v for k, v in sae_metadata(caps["train"], cfg.layer).items() if k in EVAL_METADATA}
            meta = {**evals, **adapter.sae_metadata(cfg.layer, processor),
                    "model_name": cfg.model, "pooling": cfg.pooling, "release": cfg.release,
                    "model_weights_sha256": toy_model_sha256(cfg.model)}
            ckpt = None if own_work else work / f"ckpt-{cfg.release}"  # a kept work dir makes training resumable
            sae = _train(cfg, tr.vision.float(), tr.text.float(), meta, ckpt, progress).to("cpu")
            v, t = ho.vision.float(), ho.text.float()
            with torch.no_grad():
                zv, zt = sae.encode(v, "vision"), sae.encode(t, "text")
                metrics = {
                    "l0": float((zt > 0).float().sum(-1).mean()), "l0_vision": float((zv > 0).float().sum(-1).mean()),
                    "variance_explained": _ve(sae.decode(zt, "text"), t),
                    "variance_explained_vision": _ve(sae.decode(zv, "vision"), v),
                    "paired_cosine": float(torch.nn.functional.cosine_similarity(zv, zt, dim=-1).mean()),
                    "n_heldout_pairs": int(v.shape[0]),
                }
            labels = label_features(zv, zt, y.float(), names, data=described)
            metrics.update({f"features_{k}": n for k, n in labels.counts().items()})
            final = out_root / cfg.release / sae_id
            tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                sae.save_inference_model(tmp)
                labels.save(tmp / "labels.json")
                (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1))
                replace_dir(tmp, final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            entries.append({**_entry(cfg, sae_id, metrics, d_sae=sae.cfg.d_sae), "model_weights_sha256": meta["model_weights_sha256"]})
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    return entries


def _train(cfg: BuildConfig, vision: Any, text: Any, meta: dict[str, Any], checkpoint_dir: Path | None = None,
           progress: bool = False) -> Any:
    """Train one JSAE by jsae's default recipe (:data:`jsae.protocol.methods.DEFAULT_RECIPE`: at mean norm
    sqrt(d_in), scale folded back afterwards, so the saved SAE takes raw activations), with the build recipe's
    architecture, losses, steps and learning rate."""
    import torch

    from jsae.training.data import PairedTensorData

    device = cfg.train_device if cfg.train_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tcfg = DEFAULT_RECIPE.trainer_config(cfg.steps, cfg.lr, seed=cfg.seed, progress=progress and cfg.steps >= 2000,
                                         log_every=max(cfg.steps // 4, 1), device=device,
                                         checkpoint_every=max(cfg.steps // 20, 100) if checkpoint_dir else 0,
                                         checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None)
    scfg = DEFAULT_RECIPE.sae_config(vision.shape[1], cfg.d_sae, alignment=cfg.alignment, activation=cfg.activation,
                                     k=cfg.k, l1_coefficient=cfg.l1_coefficient)
    for key, value in {**meta, "layer": cfg.layer, "alignment": cfg.alignment}.items():
        scfg.metadata[key] = value
    data = PairedTensorData(vision, text, batch_size=min(cfg.batch_size, vision.shape[0]), seed=cfg.seed)
    return DEFAULT_RECIPE.fit(scfg, tcfg, data)


def toy_model_sha256(name: str) -> str | None:
    """sha256 of a shipped toy model's weights (None for other models): ties a shipped release to the weights
    it was trained on."""
    import hashlib

    from jsae.world import models as world

    if name not in world.MODEL_NAMES:
        return None
    h = hashlib.sha256()
    with open(world.model_dir(name) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ve(recon: Any, x: Any) -> float:
    return float(explained_variance(recon, x))


def _entry(cfg: BuildConfig, sae_id: str, metrics: dict[str, Any], d_sae: int) -> dict[str, Any]:
    r = lambda x: round(float(x), 4)  # noqa: E731
    return {"name": cfg.release, "model": cfg.model, "layer": cfg.layer, "hook": sae_id, "pooling": cfg.pooling,
            "alignment": cfg.alignment, "d_sae": d_sae,
            "sae": {"id": sae_id, "path": sae_id, "l0": r(metrics["l0"]), "variance_explained": r(metrics["variance_explained"]),
                    "l0_vision": r(metrics["l0_vision"]), "variance_explained_vision": r(metrics["variance_explained_vision"])}}


# ---- the releases.yaml of the package ------------------------------------------------------------


def write_releases_yaml(data: dict[str, Any], path: str | Path | None = None) -> Path:
    path = Path(path) if path else releases_yaml_path()
    header = ("# jsae releases (loaded at `import jsae`; SAELens's PretrainedSAELookup format plus layer/hook/pooling).\n"
              "# Shipped toy releases (conversion_func: jsae_local) are rewritten by `jsae release build-shipped`;\n"
              "# real-model releases (jsae_hub) are produced by `recipe` and published to `repo_id`.\n")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(header + yaml.safe_dump(data, sort_keys=False, width=120))
    os.replace(tmp, path)
    return path


def shipped_entry(e: dict[str, Any], recipe: str) -> dict[str, Any]:
    return {"repo_id": f"{PRETRAINED}/{e['name']}", "conversion_func": "jsae_local", "model": e["model"], "layer": e["layer"],
            "hook": e["hook"], "pooling": e["pooling"], "alignment": e["alignment"], "d_sae": e["d_sae"],
            "model_weights_sha256": e.get("model_weights_sha256"), "recipe": recipe, "saes": [e["sae"]]}


def build_shipped(models: tuple[str, ...] = tuple(SHIPPED_MODELS), layers: tuple[int, ...] = SHIPPED_LAYERS,
                  out_root: str | Path | None = None, yaml_path: str | Path | None = None, steps: int = 600,
                  d_sae: int = 128, n_train: int = 2000, n_label: int = 400, progress: bool = True) -> dict[str, Any]:
    """Train the shipped toy releases ``jsae-<shapes-model>-l<layer>`` and rewrite their releases.yaml entries."""
    if d_sae > 256:
        raise ValueError(f"shipped SAEs stay small: d_sae={d_sae} > 256")
    out_root = Path(out_root) if out_root else PACKAGE_ROOT / PRETRAINED
    out_root.mkdir(parents=True, exist_ok=True)
    data = read_releases_yaml(yaml_path)
    for model in models:
        if model not in SHIPPED_MODELS:
            raise ValueError(f"unknown toy model {model!r}; choose from {list(SHIPPED_MODELS)}")
        cfgs = [BuildConfig(release=f"jsae-{SHIPPED_MODELS[model]}-l{L}", model=model, layer=L, steps=steps, d_sae=d_sae,
                            n_train=n_train, n_label=n_label) for L in layers]
        for e in build_release(cfgs, out_root, progress=progress):
            data[e["name"]] = shipped_entry(e, "jsae release build-shipped")
    write_releases_yaml(data, yaml_path)
    return data


# ---- listing ---------------------------------------------------------------------------------------


def list_releases() -> list[dict[str, Any]]:
    """One row per registered jsae release: name, model, layer, hook, where it lives, L0, variance explained,
    and the recipe that produces it."""
    from jsae.releases.registry import UNPUBLISHED

    data = read_releases_yaml()
    rows = []
    for name, lk in sorted(RELEASES.items()):
        e = data.get(name, {})
        sid = next(iter(lk.saes_map))
        measured = next((s for s in e.get("saes", []) if s.get("id") == sid), {})  # SAELens's lookup fills in 0.0 / 1.0
        status = ("shipped" if lk.conversion_func == "jsae_local" else "unpublished" if name in UNPUBLISHED else "hub")
        rows.append({"release": name, "status": status, "model": lk.model, "layer": e.get("layer"),
                     "hook": e.get("hook", sid), "sae_ids": list(lk.saes_map), "where": lk.repo_id,
                     "kind": lk.conversion_func, "l0": measured.get("l0"),
                     "variance_explained": measured.get("variance_explained"), "recipe": RECIPES.get(name)})
    return rows


def releases_table(rows: list[dict[str, Any]]) -> str:
    """:func:`list_releases` as a plain-text table (metrics blank where none were measured, e.g. unpublished)."""
    def num(v: Any, fmt: str) -> str:
        return "" if v is None else format(v, fmt)

    head = ("release", "status", "model", "layer", "L0", "var. expl.")
    body = [(r["release"], r["status"], r["model"], "" if r["layer"] is None else str(r["layer"]), num(r["l0"], ".1f"),
             num(r["variance_explained"], ".3f")) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths)).rstrip() for row in (head, *body)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    todo = [r for r in rows if r["status"] == "unpublished"]
    if todo:
        lines.append("")
        lines += [f"{r['release']} is not published yet; produce it with: {r['recipe']}" for r in todo]
    return "\n".join(lines)


__all__ = ["BuildConfig", "SHIPPED_LAYERS", "SHIPPED_MODELS", "build_release", "build_shipped", "list_releases", "releases_table",
           "read_releases_yaml", "shipped_entry", "toy_model_sha256", "write_releases_yaml"]
