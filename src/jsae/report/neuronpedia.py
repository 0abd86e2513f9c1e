"""Looking at a trained JSAE: the feature browser page of one SAE, and a Neuronpedia-style export.

Both run the SAE's VLM on held-out (image, caption) pairs, read per-token states at the SAE's layer,
and collect per feature its top images with the per-patch activation map (vision encoder on image
tokens) and its top captions with per-word activations (text encoder on caption tokens).

**Neuronpedia export** (:func:`export_neuronpedia`) follows SAEDashboard's Neuronpedia export layout::

    OUT/{model}/{source}/release.jsonl      # one SourceRelease record
                         model.jsonl        # one Model record
                         sourceset.jsonl    # one SourceSet record
                         source.jsonl       # one Source record (hfRepoId / hfFolderId of the weights)
                         features/batch-0.jsonl.gz     # one Feature record per feature
                         activations/batch-0.jsonl.gz  # Activation records (token-level, as SAEDashboard)
                         images/batch-0.jsonl.gz       # jsae extension: {"imageIndex", "png"} (base64 PNG)

with ``source = f"{layer}-{source_set}"``.  Text activations are ordinary records (``tokens`` = caption
words, ``values`` per word, ``dataSource: "text"``).  The image extension: an image activation record has
``dataSource: "image"``, ``imageIndex`` (the key of its PNG in ``images/``), ``imageFile``,
``patchGrid`` (rows × cols of per-patch activations) and, so that token-only viewers still show
something, ``tokens`` = ``"<patch r,c>"`` and ``values`` = the flattened grid.  Feature records carry
the text decoder row as ``vector`` (the steering direction jsae uses) and the jsae extensions
``jsaeLabel``, ``jsaeKind``, ``jsaePurity`` and ``vectorVision``.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch

from jsae.adapters import sae_layer
from jsae.files import replace_dir
from jsae.labels import FeatureLabels

EXPORT_FILES = ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl")


# ---- an SAE directory, or a shipped release by name ----------------------------------------------


def resolve_sae_dir(sae: str | Path) -> Path:
    """A SAE folder, or the folder of a shipped (``jsae_local``) release given by name."""
    from jsae.releases.registry import RELEASES, _local_dir, resolve_sae_id

    p = Path(sae)
    if p.is_dir():
        return p
    name = str(sae)
    if name in RELEASES and RELEASES[name].conversion_func == "jsae_local":
        lk = RELEASES[name]
        return _local_dir(lk.repo_id, lk.saes_map[resolve_sae_id(name, None)])
    if name in RELEASES:
        raise ValueError(f"release {name!r} is not shipped with jsae; pull it first (`jsae release pull {RELEASES[name].repo_id}`)"
                         " and pass the SAE folder")
    resolve_sae_id(name, None)  # unknown names: one-line error with close names
    raise FileNotFoundError(f"{sae} is not a directory")


def load_labelled_sae(sae: str | Path) -> tuple[Any, FeatureLabels, Path]:
    """(JointSAE, its labels, folder); a one-line error when the folder has no labels.json."""
    from jsae.saes.joint_sae import JointSAE

    path = resolve_sae_dir(sae)
    model = JointSAE.load_from_disk(path)
    if not (path / "labels.json").is_file():
        raise FileNotFoundError(f"{path} has no labels.json, so there are no features to show; label it first: "
                                f"`jsae label --sae {path} --capture CAPTURE --layer {model.cfg.metadata.get('layer')}`")
    return model, FeatureLabels.load(path / "labels.json"), path


def _model_for(sae: Any, model: str | None) -> tuple[Any, Any, Any, str]:
    from jsae import world

    name = model or sae.cfg.metadata.get("model_name")
    if name is None:
        raise ValueError("the SAE's cfg.json names no model (metadata.model_name); pass model=")
    if name not in world.MODEL_NAMES:
        raise NotImplementedError(f"feature pages and exports are built on the embedded world's images; {name!r} is a real "
                                  "VLM: pass the toy model, or build the page from your own pairs with jsae.report.feature_browser")
    from jsae.vlm import load_vlm

    m, processor, adapter = load_vlm(name)
    return m, processor, adapter, name


def _run_cells(path: Path, layer: int) -> list[Any]:
    """Steering cells of the demo run that holds ``path`` (``RUN/saes/jsae/layer_L``), if any."""
    from jsae.protocol.sweep import Cell

    metrics = path.parent.parent.parent / "metrics.json"
    if not metrics.is_file():
        return []
    try:
        rows = json.loads(metrics.read_text()).get("cells", [])
    except ValueError:
        return []
    names = set(Cell.__dataclass_fields__)
    return [Cell(**{k: v for k, v in r.items() if k in names}) for r in rows if r.get("layer") == layer]


# ---- the feature browser of one SAE -------------------------------------------------------------


def feature_page(sae: str | Path, out: str | Path | None = None, *, model: str | None = None, n_pairs: int = 200,
                 n_features: int = 24, n_images: int = 4, seed: int = 0) -> Path:
    """Write ``features.html`` (default: into the SAE folder; for a release name ``./<release>-features.html``)
    for a labelled JSAE folder or shipped release:
    per labelled feature its label, purity, kind, top images with the patch heat map, top captions and,
    when the SAE comes from a ``jsae demo`` run, its steering result."""
    from jsae.protocol.run import _browser_features
    from jsae.protocol.methods import Method
    from jsae.report.plots import feature_browser
    from jsae.world import world_dataset

    sae_model, labels, path = load_labelled_sae(sae)
    if not any(lab.label for lab in labels.labels):
        raise ValueError(f"{path}/labels.json labels no feature (all unlabelled); train longer or lower min_corr in `jsae label`")
    m, processor, adapter, name = _model_for(sae_model, model)
    layer = sae_layer(sae_model)
    ds = world_dataset("validation", n_pairs, seed)
    feats = _browser_features(m, processor, adapter, Method("jsae", sae_model, True), labels, ds, layer,
                              _run_cells(path, layer), n_features=n_features, n_images=n_images)
    if out is None:  # next to the SAE; for a shipped release (inside the package), in the current directory
        out = path / "features.html" if Path(sae).is_dir() else Path(f"{sae}-features.html")
    return feature_browser(feats, out, title=f"{name} layer {layer}: JSAE features ({path.name})")


# ---- Neuronpedia-style export -------------------------------------------------------------------


@torch.no_grad()
def _examples(sae: Any, m: Any, processor: Any, adapter: Any, layer: int, n_pairs: int, seed: int) -> dict[str, Any]:
    from jsae.adapters.base import GRID_COL, GRID_REGION, GRID_ROW
    from jsae.protocol.run import _per_token_states
    from jsae.world import world_dataset

    ds = world_dataset("validation", n_pairs, seed)
    items = [ds[i] for i in range(len(ds))]
    images, captions = [ex["image"] for ex in items], [ex["caption"] for ex in items]
    states, image_mask, grid, caption_mask = _per_token_states(m, processor, adapter, images, captions, layer)
    zv_tok, zt_tok = sae.encode(states, "vision"), sae.encode(states, "text")
    iw, cw = image_mask.float(), caption_mask.float()
    zv = (zv_tok * iw[..., None]).sum(1) / iw.sum(1, keepdim=True).clamp(min=1)
    zt = (zt_tok * cw[..., None]).sum(1) / cw.sum(1, keepdim=True).clamp(min=1)
    return {"images": images, "captions": captions, "zv_tok": zv_tok, "zt_tok": zt_tok, "zv": zv, "zt": zt,
            "image_mask": image_mask, "caption_mask": caption_mask, "grid": grid,
            "cols": (GRID_ROW, GRID_COL, GRID_REGION)}


def _patch_grid(ex: dict[str, Any], b: int, j: int) -> np.ndarray:
    row, col, region = ex["cols"]
    g = ex["grid"][b]
    sel = ex["image_mask"][b] & (g[:, row] >= 0) & (g[:, region] == 0)
    cells = g[sel]
    heat = np.zeros((int(cells[:, row].max()) + 1, int(cells[:, col].max()) + 1))
    for r, c, a in zip(cells[:, row].tolist(), cells[:, col].tolist(), ex["zv_tok"][b][sel][:, j].tolist()):
        heat[r, c] = max(heat[r, c], a)
    return heat


def _gz_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), compresslevel=5))


def export_neuronpedia(sae: str | Path, out: str | Path, *, model: str | None = None, model_id: str | None = None,
                       source_set: str = "jsae", release_id: str | None = None, creator: str = "jsae",
                       hf_repo_id: str | None = None, n_pairs: int = 200, n_features: int | None = None,
                       n_examples: int = 4, seed: int = 0) -> Path:
    """Export the labelled features of a JSAE folder (or shipped release) in SAEDashboard's Neuronpedia
    layout with jsae's image extension; returns ``OUT/{model}/{source}``.  ``n_features`` (default: all
    labelled ones) caps the features, ``n_examples`` the top images and top captions of each."""
    sae_model, labels, path = load_labelled_sae(sae)
    m, processor, adapter, name = _model_for(sae_model, model)
    layer = sae_layer(sae_model)
    model_id = model_id or f"jsae-toy-{name}"
    source_id = f"{layer}-{source_set}"
    release_id = release_id or sae_model.cfg.metadata.get("release") or path.parent.name
    ex = _examples(sae_model, m, processor, adapter, layer, n_pairs, seed)
    chosen = sorted((lab for lab in labels.labels if lab.label), key=lambda lab: -(lab.vision_corr + lab.text_corr))
    chosen = chosen[:n_features] if n_features else chosen
    if not chosen:
        raise ValueError(f"{path}/labels.json labels no feature (all unlabelled); nothing to export")
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    final = Path(out) / model_id / source_id
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    W_text = sae_model.W_dec_of("text").detach()
    W_vis = sae_model.W_dec_of("vision").detach()
    tok = getattr(processor, "tokenizer", processor)
    try:
        tmp.mkdir(parents=True)
        meta = [
            ("release.jsonl", {"name": release_id, "description": f"jsae Joint SAE {release_id}", "descriptionShort": release_id,
                               "urls": [f"https://huggingface.co/{hf_repo_id}"] if hf_repo_id else [],
                               "creatorName": creator, "creatorNameShort": creator, "createdAt": created}),
            ("model.jsonl", {"id": model_id, "instruct": False, "displayName": name, "displayNameShort": name,
                             "layers": adapter.n_layers, "createdAt": created, "updatedAt": created}),
            ("sourceset.jsonl", {"modelId": model_id, "name": source_set, "releaseName": release_id, "creatorName": creator,
                                 "description": "Joint SAE (vision + text) - sequence-pooled residual stream",
                                 "visibility": "PUBLIC", "createdAt": created}),
            ("source.jsonl", {"id": source_id, "modelId": model_id, "setName": source_set, "visibility": "PUBLIC",
                              "dataset": "jsae-world:validation", "num_prompts": n_pairs,
                              "hfRepoId": hf_repo_id, "hfFolderId": sae_model.cfg.metadata.get("hook_name") or path.name,
                              "jsaeModalities": ["text", "image"]}),
        ]
        for fname, rec in meta:
            (tmp / fname).write_text(json.dumps(rec) + "\n")
        features, activations, images_out = [], [], {}
        n = ex["zv"].shape[0]
        for lab in chosen:
            j = lab.feature
            acts = []
            for b in ex["zt"][:, j].argsort(descending=True)[:n_examples].tolist():
                pos = ex["caption_mask"][b].nonzero().flatten()
                # the caption words: the tokenizer's pieces at the caption positions of this pair
                ids = _caption_ids(processor, adapter, ex["captions"][b], len(pos))
                values = ex["zt_tok"][b][pos][:, j].tolist()
                words = tok.convert_ids_to_tokens(ids) if ids is not None else ex["captions"][b].split()[:len(values)]
                acts.append({"tokens": list(words), "values": values, "dataSource": "text", "dataIndex": str(b),
                             "modality": "text"})
            for b in ex["zv"][:, j].argsort(descending=True)[:n_examples].tolist():
                g = _patch_grid(ex, b, j)
                key = f"validation-{b}"
                if key not in images_out:
                    buf = io.BytesIO()
                    ex["images"][b].convert("RGB").save(buf, format="PNG")
                    images_out[key] = base64.b64encode(buf.getvalue()).decode()
                acts.append({"tokens": [f"<patch {r},{c}>" for r in range(g.shape[0]) for c in range(g.shape[1])],
                             "values": g.flatten().tolist(), "dataSource": "image", "dataIndex": str(b),
                             "imageIndex": key, "imageFile": "images/batch-0.jsonl.gz", "patchGrid": g.tolist(),
                             "modality": "image"})
            for a in acts:
                vals = a["values"] or [0.0]
                a.update({"id": f"{source_id}-{j}-{len(activations)}", "modelId": model_id, "layer": source_id, "index": str(j),
                          "maxValue": max(vals), "maxValueTokenIndex": int(np.argmax(vals)), "minValue": min(vals),
                          "creatorId": creator, "createdAt": created})
                activations.append(a)
            max_act = max([max(a["values"] or [0.0]) for a in acts] or [0.0])
            features.append({
                "modelId": model_id, "layer": source_id, "index": str(j), "creatorId": creator, "createdAt": created,
                "hasVector": True, "vector": W_text[j].tolist(), "vectorLabel": lab.label,
                "hookName": sae_model.cfg.metadata.get("hook_name"), "vectorDefaultSteerStrength": max_act,
                "maxActApprox": max_act,
                "frac_nonzero": float(((ex["zv"][:, j] > 0) | (ex["zt"][:, j] > 0)).float().sum() / max(n, 1)),
                "pos_str": [], "pos_values": [], "neg_str": [], "neg_values": [],
                "jsaeLabel": lab.label, "jsaeKind": lab.kind, "jsaePurity": lab.purity,
                "jsaeCorr": {"vision": lab.vision_corr, "text": lab.text_corr}, "vectorVision": W_vis[j].tolist(),
            })
        _gz_jsonl(tmp / "features" / "batch-0.jsonl.gz", features)
        _gz_jsonl(tmp / "activations" / "batch-0.jsonl.gz", activations)
        _gz_jsonl(tmp / "images" / "batch-0.jsonl.gz", [{"imageIndex": k, "png": v} for k, v in images_out.items()])
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _caption_ids(processor: Any, adapter: Any, caption: str, n: int) -> list[int] | None:
    """Token ids of the caption words (what sits at the ``n`` caption positions), or None if they differ."""
    tok = getattr(processor, "tokenizer", processor)
    try:
        ids = tok(caption, add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001
        return None
    return list(ids) if len(ids) == n else None


def read_export(source_dir: str | Path) -> dict[str, list[dict[str, Any]]]:
    """The records of an export folder ``OUT/{model}/{source}`` (for checks and tools)."""
    d = Path(source_dir)
    out: dict[str, list[dict[str, Any]]] = {}
    for f in EXPORT_FILES:
        out[f.removesuffix(".jsonl")] = [json.loads(line) for line in (d / f).read_text().splitlines() if line]
    for sub in ("features", "activations", "images"):
        out[sub] = [json.loads(line) for p in sorted((d / sub).glob("*.jsonl.gz"))
                    for line in gzip.decompress(p.read_bytes()).decode().splitlines() if line]
    return out


__all__ = ["export_neuronpedia", "feature_page", "load_labelled_sae", "read_export", "resolve_sae_dir"]
