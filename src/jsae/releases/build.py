"""``jsae release``: build, list, push and pull jsae releases.

* ``jsae release build --config FILE`` runs one release recipe (a YAML file: model, data, layer, SAE and
  training settings): capture of pooled (image, caption) pairs, JSAE training, feature labels, and a
  SAELens directory ``OUT/<sae_id>/{cfg.json, sae_weights.safetensors, labels.json, metrics.json}``.
  The real-model recipes ship in ``jsae/pretrained/recipes/``.
* ``jsae release build-shipped`` re-trains the toy releases shipped in the package
  (``jsae/pretrained/<release>/<sae_id>/``) and rewrites their entries in ``jsae/releases.yaml``.
* ``jsae release list`` prints every jsae release (shipped, cached or only listed).
* ``jsae release push DIR --repo ORG/NAME`` / ``jsae release pull ORG/NAME`` (see :mod:`jsae.hub`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from jsae.files import replace_dir
from jsae.releases.registry import PACKAGE_ROOT, RECIPES, RELEASES, read_releases_yaml, releases_yaml_path

release_app = typer.Typer(help="jsae releases: build, list, push to and pull from the Hugging Face Hub.",
                          no_args_is_help=True, pretty_exceptions_enable=False)

PRETRAINED = "pretrained"
RECIPE_DIR = PACKAGE_ROOT / PRETRAINED / "recipes"
SHIPPED_MODELS = {"llava": "shapes-llava", "qwen3-vl-moe": "shapes-qwen3-vl-moe"}
SHIPPED_LAYERS = (4, 6)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


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
    lr: float = 3e-3
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
        data = yaml.safe_load(path.read_text()) or {}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown recipe key(s) {unknown}; known keys: {sorted(known)}")
        missing = [k for k in ("release", "model", "layer") if k not in data]
        if missing:
            raise ValueError(f"{path}: the recipe lacks {missing}")
        return cls(**data)


def _pairs(cfg: BuildConfig, split: str, n: int) -> tuple[Any, Any, list[str], str]:
    """(pairs, concept presence [N, C], concept names, fingerprint) of one split."""
    from jsae.labels import concepts_from_captions
    from jsae.world.concepts import concept_presence, world_concepts

    if cfg.data is None:
        from jsae.world import world_dataset

        ds = world_dataset(split, n, cfg.seed)
        names = world_concepts()
        return ([(ex["image"], ex["caption"]) for ex in ds], concept_presence([ex["objects"] for ex in ds], names),
                names, f"world:{split}:{n}:{cfg.seed}")
    from jsae.world import load_caption_dataset

    ds = load_caption_dataset(cfg.data, split=split, limit=n)
    captions = list(ds["caption"])
    y, names = concepts_from_captions(captions)
    return _LazyPairs(ds), y, names, f"{cfg.data}:{split}:{len(captions)}"


class _LazyPairs:
    """(image, caption) pairs read from a dataset on demand (capture_pairs needs len() and indexing)."""

    def __init__(self, ds: Any):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[Any, str]:
        ex = self.ds[int(i)]
        return ex["image"], ex["caption"]


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

    from jsae.capture import capture_pairs
    from jsae.training import load_pairs
    from jsae.labels import label_features

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
        caps, concept = {}, {}
        for part, split, n in (("train", base.split, base.n_train), ("label", base.label_split, base.n_label)):
            pairs, y, names, fp = _pairs(base, split, n)
            concept[part] = (y, names)
            caps[part] = capture_pairs(model, pairs, layers=layers, out_dir=work / part, processor=processor, adapter=adapter,
                                       pooling=base.pooling, batch_size=base.capture_batch_size, fingerprint=fp,
                                       progress=progress)  # type: ignore[arg-type]
        for cfg in cfgs:
            tr = load_pairs(caps["train"], cfg.layer, batch_size=1, shuffle=False)
            ho = load_pairs(caps["label"], cfg.layer, batch_size=1, shuffle=False)
            sae_id = adapter.hook_name(cfg.layer)
            meta = {"model_name": cfg.model, "hook_name": sae_id, "pooling": cfg.pooling, "release": cfg.release,
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
            y, names = concept["label"]
            labels = label_features(zv, zt, y.float(), names)
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
    """Train one JSAE as ``jsae.protocol.train_methods`` does (at mean norm sqrt(d_in), scale folded back
    afterwards, so the saved SAE takes raw activations), with the recipe's architecture and losses."""
    import torch

    from jsae.saes.joint_sae import TrainingJointSAEConfig
    from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData

    scale = math.sqrt(vision.shape[1]) / float(torch.cat([vision, text]).norm(dim=-1).mean())
    data = PairedTensorData(vision * scale, text * scale, batch_size=min(cfg.batch_size, vision.shape[0]), seed=cfg.seed)
    device = cfg.train_device if cfg.train_device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    tcfg = JointTrainerConfig(total_steps=cfg.steps, lr=cfg.lr, lr_warm_up_steps=cfg.steps // 20,
                              lr_decay_steps=cfg.steps // 5, seed=cfg.seed, progress=progress and cfg.steps >= 2000,
                              log_every=max(cfg.steps // 4, 1), grad_clip_norm=None, device=device,
                              checkpoint_every=max(cfg.steps // 20, 100) if checkpoint_dir else 0,
                              checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None)
    scfg = TrainingJointSAEConfig(d_in=vision.shape[1], d_sae=cfg.d_sae, alignment=cfg.alignment, activation=cfg.activation,
                                  k=cfg.k, mse_normalization="variance", l1_coefficient=cfg.l1_coefficient)
    for key, value in {**meta, "layer": cfg.layer, "alignment": cfg.alignment}.items():
        scfg.metadata[key] = value
    sae = JointSAETrainer.from_config(scfg, tcfg, data).fit().eval()
    sae.fold_activation_norm_scaling_factor(scale)
    return sae


def toy_model_sha256(name: str) -> str | None:
    """sha256 of a shipped toy model's weights (None for other models): ties a shipped release to the weights
    it was trained on."""
    import hashlib

    from jsae import world

    if name not in world.MODEL_NAMES:
        return None
    h = hashlib.sha256()
    with open(world.model_dir(name) / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _ve(recon: Any, x: Any) -> float:
    return float(1 - (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


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


# ---- commands -----------------------------------------------------------------------------------


@release_app.command("build")
def build_cmd(
    config: Path = typer.Option(..., help="recipe YAML, or the name of a shipped recipe (jsae-llava-l16, ...)"),
    out: Path = typer.Option(Path("releases"), help="output root: OUT/<release>/<sae_id>/"),
    work_dir: Optional[Path] = typer.Option(None, help="keep the captures and training checkpoints here (a re-run resumes)"),
) -> None:
    """Produce a release from its recipe: capture, train the JSAE, label its features."""
    try:
        cfg = BuildConfig.from_file(config)
        entries = build_release(cfg, out, work_dir=work_dir)
    except (FileNotFoundError, ValueError, OSError) as exc:
        _fail(str(exc))
        return
    e = entries[0]
    typer.echo(f"built {out / e['name'] / e['hook']} (L0 {e['sae']['l0']:.1f}, variance explained "
               f"{e['sae']['variance_explained']:.3f}); publish it with: jsae release push {out / e['name']} --repo "
               f"{cfg.repo_id or 'ORG/NAME'}")


@release_app.command("build-shipped")
def build_shipped_cmd(
    models: str = typer.Option(",".join(SHIPPED_MODELS), help="comma-separated toy models"),
    layers: str = typer.Option(",".join(map(str, SHIPPED_LAYERS)), help="comma-separated decoder layers"),
    steps: int = typer.Option(600),
    d_sae: int = typer.Option(128),
    out: Optional[Path] = typer.Option(None, help="default: the installed package's pretrained/ (and its releases.yaml)"),
) -> None:
    """Re-train the toy releases shipped with jsae and rewrite their releases.yaml entries."""
    t0 = time.time()
    try:
        data = build_shipped(tuple(m for m in models.split(",") if m), tuple(int(x) for x in layers.split(",") if x),
                             out_root=out, yaml_path=(out / "releases.yaml") if out else None, steps=steps, d_sae=d_sae)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
        return
    for name, e in data.items():
        if e.get("conversion_func") == "jsae_local":
            s = e["saes"][0]
            typer.echo(f"{name}: L0 {s['l0']:.1f}, variance explained {s['variance_explained']:.3f}")
    typer.echo(f"done in {time.time() - t0:.0f} s")


@release_app.command("list")
def list_cmd() -> None:
    """List jsae releases: name, model, layer, where it lives, L0, variance explained, and how to produce it."""
    typer.echo(json.dumps(list_releases(), indent=1))


def list_releases() -> list[dict[str, Any]]:
    data = read_releases_yaml()
    rows = []
    for name, lk in sorted(RELEASES.items()):
        e = data.get(name, {})
        sid = next(iter(lk.saes_map))
        rows.append({"release": name, "model": lk.model, "layer": e.get("layer"), "hook": e.get("hook", sid),
                     "sae_ids": list(lk.saes_map), "where": lk.repo_id, "kind": lk.conversion_func,
                     "l0": lk.expected_l0.get(sid), "variance_explained": lk.expected_var_explained.get(sid),
                     "recipe": RECIPES.get(name)})
    return rows


@release_app.command("push")
def push_cmd(
    directory: Path = typer.Argument(..., help="a jsae SAE directory (cfg.json) or a folder of them (<sae_id>/cfg.json)"),
    repo: str = typer.Option(..., help="ORG/NAME"),
    hub: Optional[str] = typer.Option(None, help="hub endpoint URL, or a local directory / file:// URL standing in for it"),
    token: Optional[str] = typer.Option(None, envvar="HF_TOKEN"),
    private: bool = typer.Option(False),
) -> None:
    """Upload a JSAE (SAELens layout + model card) to the Hugging Face Hub."""
    from jsae.releases.hub import push

    try:
        url = push(directory, repo, endpoint=hub, token=token, private=private)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        _fail(str(exc))
        return
    typer.echo(f"pushed {directory} -> {url}")


@release_app.command("pull")
def pull_cmd(
    repo: str = typer.Argument(..., help="ORG/NAME, or the name of a listed hub release (jsae-llava-l16)"),
    out: Optional[Path] = typer.Option(None, help="local directory (default: the Hugging Face cache, where "
                                                  "SAE.from_pretrained finds it offline)"),
    hub: Optional[str] = typer.Option(None, help="hub endpoint URL, or a local directory / file:// URL standing in for it"),
    revision: Optional[str] = typer.Option(None),
    token: Optional[str] = typer.Option(None, envvar="HF_TOKEN"),
) -> None:
    """Download a pushed JSAE repo and check every SAE in it."""
    from jsae.releases.hub import pull

    if repo in RELEASES and RELEASES[repo].conversion_func == "jsae_hub":
        repo = RELEASES[repo].repo_id
    try:
        path = pull(repo, out, endpoint=hub, revision=revision, token=token)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        _fail(str(exc))
        return
    typer.echo(str(path))


# ---- looking at a JSAE (registered at the top level of `jsae` by cli.py) --------------------------


def features_cmd(
    sae: str = typer.Argument(..., help="a labelled JSAE folder (e.g. RUN/saes/jsae/layer_4) or a shipped release name"),
    out: Optional[Path] = typer.Option(None, help="HTML file (default: SAE/features.html; for a release name ./RELEASE-features.html)"),
    model: Optional[str] = typer.Option(None, help="toy model (default: the SAE's metadata.model_name)"),
    n_features: int = typer.Option(24),
    n_pairs: int = typer.Option(200, help="held-out world pairs to rank images and captions"),
) -> None:
    """Write the self-contained feature browser (features.html) of one labelled JSAE."""
    from jsae.report.neuronpedia import feature_page

    try:
        path = feature_page(sae, out, model=model, n_features=n_features, n_pairs=n_pairs)
    except (FileNotFoundError, ValueError, NotImplementedError) as exc:
        _fail(str(exc))
        return
    typer.echo(str(path))


def export_cmd(
    sae: str = typer.Argument(..., help="a labelled JSAE folder or a shipped release name"),
    out: Path = typer.Option(Path("neuronpedia"), help="export root: OUT/{model}/{source}/"),
    source_set: str = typer.Option("jsae", help="Neuronpedia source set id (the source is LAYER-SOURCE_SET)"),
    hf_repo_id: Optional[str] = typer.Option(None, help="where the weights are published (source.hfRepoId)"),
    n_features: Optional[int] = typer.Option(None, help="default: every labelled feature"),
    n_examples: int = typer.Option(8, help="top images and top captions per feature"),
    n_pairs: int = typer.Option(200),
) -> None:
    """Export labelled features in SAEDashboard's Neuronpedia layout, with jsae's image extension."""
    from jsae.report.neuronpedia import export_neuronpedia

    try:
        path = export_neuronpedia(sae, out, source_set=source_set, hf_repo_id=hf_repo_id, n_features=n_features,
                                  n_examples=n_examples, n_pairs=n_pairs)
    except (FileNotFoundError, ValueError, NotImplementedError) as exc:
        _fail(str(exc))
        return
    typer.echo(str(path))


def core_metrics_cmd(
    sae: str = typer.Argument(..., help="a JSAE folder or a release name"),
    model: Optional[str] = typer.Option(None, help="toy model (default: the SAE's metadata.model_name)"),
    modality: str = typer.Option("text", help="branch to evaluate"),
    n_captions: int = typer.Option(256),
    out: Optional[Path] = typer.Option(None, help="write the metrics JSON here too"),
) -> None:
    """SAELens's core metrics of one JSAE branch (as a SAEBench custom SAE) on the toy VLM's language model."""
    from jsae.report.neuronpedia import resolve_sae_dir
    from jsae.saes.joint_sae import JointSAE
    from jsae.releases.saebench import JSAEBranchSAE, core_metrics

    try:
        jointsae = JointSAE.load_from_disk(resolve_sae_dir(sae))
        bench = JSAEBranchSAE(jointsae, modality)
        result = core_metrics(bench, model or jointsae.cfg.metadata.get("model_name") or "llava", n_captions=n_captions)
    except (FileNotFoundError, ValueError, NotImplementedError) as exc:
        _fail(str(exc))
        return
    text = json.dumps(result, indent=1)
    if out:
        out.write_text(text)
    typer.echo(text)


__all__ = ["BuildConfig", "core_metrics_cmd", "export_cmd", "features_cmd", "build_release", "build_shipped", "list_releases", "release_app"]
