"""A Neuronpedia-style export of a trained JSAE's labelled features.

Like the feature browser (:mod:`jsae.report.browser`, whose :func:`~jsae.report.browser.token_codes` it
reads), it runs the SAE's VLM on held-out (image, caption) pairs and collects per feature its top images
with the per-patch activation map (vision encoder on image tokens) and its top captions with per-word
activations (text encoder on caption tokens).

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

from jsae.adapters import sae_layer
from jsae.files import replace_dir

EXPORT_FILES = ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl")


# ---- Neuronpedia-style export -------------------------------------------------------------------


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
    from jsae.report.browser import heat_map, strongest_labelled, token_codes, top_examples, world_model_for
    from jsae.report.rundir import load_labelled_sae
    from jsae.world import world_dataset

    sae_model, labels, path = load_labelled_sae(sae)
    vlm, name = world_model_for(sae_model, model)
    processor, adapter = vlm.processor, vlm.adapter
    layer = sae_layer(sae_model)
    from jsae.interventions import check_sae_site

    check_sae_site(sae_model, layer, adapter, f"export ({path})",
                   f"pass the --model it was trained on ({sae_model.cfg.metadata.get('model_name')}), or leave --model out")
    model_id = model_id or f"jsae-toy-{name}"
    source_id = f"{layer}-{source_set}"
    release_id = release_id or sae_model.cfg.metadata.get("release") or path.parent.name
    ds = world_dataset("validation", n_pairs, seed)
    codes = token_codes(vlm, sae_model, [(r["image"], r["caption"]) for r in ds], layer)
    chosen = strongest_labelled(labels, n_features)
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
                              "hfRepoId": hf_repo_id, "hfFolderId": sae_model.cfg.metadata.get("hf_hook_name") or path.name,
                              "jsaeModalities": ["text", "image"]}),
        ]
        for fname, rec in meta:
            (tmp / fname).write_text(json.dumps(rec) + "\n")
        features, activations, images_out = [], [], {}
        zv, zt = codes.zv, codes.zt
        n = zv.shape[0]
        for lab in chosen:
            j = lab.feature
            acts = []
            top_img, top_cap = top_examples(codes, j, n_examples)
            for b in top_cap:
                pos = codes.caption_mask[b].nonzero().flatten()
                # the caption words: the tokenizer's pieces at the caption positions of this pair
                ids = _caption_ids(processor, adapter, codes.captions[b], len(pos))
                values = codes.zt_tok[b][pos][:, j].tolist()
                words = tok.convert_ids_to_tokens(ids) if ids is not None else codes.captions[b].split()[:len(values)]
                acts.append({"tokens": list(words), "values": values, "dataSource": "text", "dataIndex": str(b),
                             "modality": "text"})
            for b in top_img:
                g = heat_map(codes, b, j)
                key = f"validation-{b}"
                if key not in images_out:
                    buf = io.BytesIO()
                    codes.images[b].convert("RGB").save(buf, format="PNG")
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
                "frac_nonzero": float(((zv[:, j] > 0) | (zt[:, j] > 0)).float().sum() / max(n, 1)),
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


__all__ = ["EXPORT_FILES", "export_neuronpedia", "read_export"]
