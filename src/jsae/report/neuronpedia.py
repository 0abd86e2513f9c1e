"""A Neuronpedia export of a JSAE: every live feature, in Neuronpedia's own upload records, with jsae's extra
information in a separate extension folder.

The records follow, field for field, the export format Neuronpedia's importer reads: the dataclasses of
``utils/neuronpedia-utils/neuronpedia_utils/db_models/`` in Neuronpedia's repository (``SourceRelease``,
``Model``, ``SourceSet``, ``Source``, ``Feature``, ``Activation``) as written by its
``convert-saedashboard-to-neuronpedia-export.py``; ``tests/data/neuronpedia_export.schema.json`` is a JSON
Schema written from them (required fields = the dataclass fields without a default; no other field allowed)::

    OUT/{modelId}/{sourceId}/release.jsonl                 # one SourceRelease
                             model.jsonl                   # one Model (tlensId, dimension, layers, neuronsPerLayer)
                             sourceset.jsonl               # one SourceSet
                             source.jsonl                  # one Source (hfRepoId/hfFolderId, saelensRelease/SaeId)
                             features/batch-0.jsonl.gz     # one Feature per live feature
                             activations/batch-0.jsonl.gz  # Activation records: top captions, per-token values
                             jsae/features/batch-0.jsonl.gz     # extension: label, kind, purity, vision decoder row
                             jsae/activations/batch-0.jsonl.gz  # extension: image activation records (patch grids)
                             jsae/images/batch-0.jsonl.gz       # extension: {"imageIndex", "png"} (base64 PNG)

with ``sourceId = f"{layer}-{source_set}"``.  A feature is *live* when it fires on a caption token or an image of the
held-out pairs.  ``hookName`` is TransformerLens's ``blocks.L.hook_resid_post`` (one of the hook points Neuronpedia's
converter accepts; TransformerBridge's ``blocks.L.hook_out`` is the same state), ``vector`` the text decoder row
(jsae's steering direction), ``pos_str`` / ``neg_str`` the logit lens of that row through the language model's
unembedding (top / bottom ``n_logits`` tokens), ``frac_nonzero`` the fraction of caption tokens on which the feature
fires.  Every jsae-only field sits under ``jsae/``, keyed by ``(modelId, layer, index)``: an importer that reads only
Neuronpedia's files never sees it.
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

from jsae.adapters import sae_layer, saelens_hook_name
from jsae.files import replace_dir

EXPORT_FILES = ("release.jsonl", "model.jsonl", "sourceset.jsonl", "source.jsonl")
BATCHES = ("features", "activations")
EXTENSION = "jsae"
EXTENSION_BATCHES = ("features", "activations", "images")


def _gz_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), compresslevel=5))


def _release_of(sae_model: Any, path: Path) -> tuple[str | None, str | None, str | None]:
    """(SAELens release, sae_id, hub repo) of a shipped or hub release, else Nones."""
    from jsae.releases.registry import RELEASES

    release = getattr(sae_model, "source_release", None)
    name = release[0] if release else sae_model.cfg.metadata.get("release")
    if name not in RELEASES:
        return None, None, None
    lookup = RELEASES[name]
    sae_id = release[1] if release else next((i for i, f in lookup.saes_map.items() if f == path.name), None)
    repo = lookup.repo_id if lookup.conversion_func != "jsae_local" else None
    return name, sae_id, repo


def logit_lens(direction: torch.Tensor, unembed: torch.Tensor, tokenizer: Any, n: int) -> tuple[list[str], list[float], list[str], list[float]]:
    """(top tokens, their logits, bottom tokens, their logits) of ``direction @ unembed.T`` (SAEDashboard's logit
    tables: the decoder row through the unembedding, no final norm)."""
    logits = unembed.float() @ direction.float()
    n = min(n, logits.shape[0])
    top, bottom = logits.topk(n), (-logits).topk(n)
    words = lambda idx: [str(t) for t in tokenizer.convert_ids_to_tokens(idx.tolist())]  # noqa: E731
    return words(top.indices), top.values.tolist(), words(bottom.indices), (-bottom.values).tolist()


def export_neuronpedia(sae: str | Path, out: str | Path, *, model: str | None = None, model_id: str | None = None,
                       source_set: str = "jsae", release_id: str | None = None, creator: str = "jsae",
                       hf_repo_id: str | None = None, n_pairs: int = 200, n_features: int | None = None,
                       n_examples: int = 4, n_logits: int = 10, seed: int = 0) -> Path:
    """Export every live feature of a JSAE folder (or shipped release) as Neuronpedia upload records plus jsae's
    extension (see the module docstring); returns ``OUT/{modelId}/{sourceId}``.  ``n_features`` caps the features
    (the most active first; default: every live one), ``n_examples`` the top captions (and top images, in the
    extension) of each, ``n_logits`` the logit-lens tokens.  Labels (``labels.json``) are optional: they go to the
    extension when the SAE has them."""
    from jsae.interventions import check_sae_site
    from jsae.labels import FeatureLabels
    from jsae.report.browser import heat_map, token_codes, top_examples, world_model_for
    from jsae.report.rundir import resolve_sae_dir
    from jsae.saes.joint_sae import JointSAE
    from jsae.world import world_dataset

    for name, value, low in (("n_pairs", n_pairs, 1), ("n_examples", n_examples, 1), ("n_logits", n_logits, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    path = resolve_sae_dir(sae)
    sae_model = JointSAE.load_from_disk(path)
    labels = FeatureLabels.load(path / "labels.json") if (path / "labels.json").is_file() else None
    if labels is not None:
        labels.check_sae(sae_model, f"the SAE in {path}")
    vlm, name = world_model_for(sae_model, model)
    processor, adapter = vlm.processor, vlm.adapter
    layer = sae_layer(sae_model)
    check_sae_site(sae_model, layer, adapter, f"export ({path})",
                   f"pass the --model it was trained on ({sae_model.cfg.metadata.get('model_name')}), or leave --model out")
    saelens_release, saelens_sae_id, hub_repo = _release_of(sae_model, path)
    model_id = model_id or f"jsae-toy-{name}"
    source_id = f"{layer}-{source_set}"
    release_id = release_id or saelens_release or path.parent.name
    hf_repo_id = hf_repo_id or hub_repo
    ds = world_dataset("validation", n_pairs, seed)
    codes = token_codes(vlm, sae_model, [(r["image"], r["caption"]) for r in ds], layer)
    cap = codes.caption_mask
    text_tok = codes.zt_tok[cap]  # [n caption tokens, d_sae]
    fires_text = (text_tok > 0).any(0)
    fires_image = (codes.zv > 0).any(0)
    live = (fires_text | fires_image).nonzero().flatten()
    if live.numel() == 0:
        raise ValueError(f"no feature of {path} fires on {n_pairs} held-out pairs; nothing to export")
    strength = torch.maximum(text_tok.max(0).values, codes.zv.max(0).values)
    chosen = sorted(live.tolist(), key=lambda j: -float(strength[j]))[:n_features] if n_features else live.tolist()
    by_feature = {lab.feature: lab for lab in labels.labels} if labels is not None else {}
    created = time.strftime("%Y-%m-%dT%H:%M:%S")
    hf = adapter.hf_model
    text_cfg = hf.config.get_text_config()
    unembed = hf.get_output_embeddings().weight.detach()
    tok = getattr(processor, "tokenizer", processor)
    W_text = sae_model.W_dec_of("text").detach()
    W_vis = sae_model.W_dec_of("vision").detach()
    hook = saelens_hook_name(layer)
    n_caption_tokens = int(cap.sum(1).max())
    final = Path(out) / model_id / source_id
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    url = [f"https://huggingface.co/{hf_repo_id}"] if hf_repo_id else []
    try:
        tmp.mkdir(parents=True)
        meta = [
            ("release.jsonl", {
                "name": release_id, "description": f"jsae Joint SAE {release_id} (vision + text branches)",
                "creatorName": creator, "creatorId": creator, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
                "descriptionShort": release_id, "urls": url, "creatorEmail": None, "creatorNameShort": creator,
                "defaultSourceSetName": source_set, "defaultSourceId": source_id, "defaultUmapSourceIds": [],
                "createdAt": created}),
            ("model.jsonl", {
                "id": model_id, "instruct": False, "creatorId": creator, "displayNameShort": name, "displayName": name,
                "tlensId": sae_model.cfg.metadata.get("model_name") or name, "dimension": int(sae_model.cfg.d_in),
                "visibility": "PUBLIC", "defaultSourceSetName": source_set, "defaultSourceId": source_id,
                "inferenceEnabled": False, "layers": int(adapter.n_layers),
                "neuronsPerLayer": int(getattr(text_cfg, "intermediate_size", 0) or 0), "createdAt": created, "owner": creator,
                "updatedAt": created, "website": None}),
            ("sourceset.jsonl", {
                "modelId": model_id, "name": source_set, "creatorId": creator, "hasDashboards": True, "visibility": "PUBLIC",
                "description": f"Joint SAE (text branch) - residual stream - {sae_model.cfg.d_sae}", "type": "sae",
                "creatorName": creator, "urls": url, "creatorEmail": None, "releaseName": release_id,
                "defaultOfModelId": None, "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False,
                "showCorrelated": False, "showHeadAttribution": False, "showUmap": False, "createdAt": created}),
            ("source.jsonl", {
                "id": source_id, "modelId": model_id, "setName": source_set, "creatorId": creator, "hasDashboards": True,
                "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None, "saelensRelease": saelens_release,
                "saelensSaeId": saelens_sae_id, "hfRepoId": hf_repo_id,
                "hfFolderId": saelens_sae_id or sae_model.cfg.metadata.get("hf_hook_name") or path.name,
                "visibility": "PUBLIC", "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
                "hasUmapClusters": False, "num_prompts": n_pairs, "num_tokens_in_prompt": n_caption_tokens,
                "dataset": "jsae.world captions (validation split, generated locally)", "notes": None,
                "createdAt": created}),
        ]
        for fname, rec in meta:
            (tmp / fname).write_text(json.dumps(rec) + "\n")
        features, activations, ext_features, ext_activations, images_out = [], [], [], [], {}
        for j in chosen:
            top_img, top_cap = top_examples(codes, j, n_examples)
            max_act = 0.0
            for b in top_cap:
                pos = cap[b].nonzero().flatten()
                values = codes.zt_tok[b][pos][:, j].tolist()
                if not values or max(values) <= 0:
                    continue
                ids = _caption_ids(processor, codes.captions[b], len(pos))
                words = tok.convert_ids_to_tokens(ids) if ids is not None else codes.captions[b].split()[:len(values)]
                max_act = max(max_act, max(values))
                activations.append({
                    "id": f"{source_id}-{j}-{len(activations)}", "tokens": [str(w) for w in words], "index": str(j),
                    "layer": source_id, "modelId": model_id, "maxValue": max(values),
                    "maxValueTokenIndex": int(np.argmax(values)), "minValue": min(values), "values": values,
                    "creatorId": creator, "dataSource": "jsae.world:validation", "dataIndex": str(b), "dfaValues": [],
                    "dfaTargetIndex": None, "dfaMaxValue": None, "createdAt": created, "lossValues": [],
                    "logitContributions": None, "binMin": None, "binMax": None, "binContains": None,
                    "qualifyingTokenIndex": None})
            for b in top_img:
                if float(codes.zv[b, j]) <= 0:
                    continue
                g = heat_map(codes, b, j)
                key = f"validation-{b}"
                if key not in images_out:
                    buf = io.BytesIO()
                    codes.images[b].convert("RGB").save(buf, format="PNG")
                    images_out[key] = base64.b64encode(buf.getvalue()).decode()
                ext_activations.append({"modelId": model_id, "layer": source_id, "index": str(j), "modality": "image",
                                        "dataIndex": str(b), "imageIndex": key, "patchGrid": g.tolist(),
                                        "maxValue": float(g.max()), "pooledValue": float(codes.zv[b, j])})
            pos_str, pos_values, neg_str, neg_values = logit_lens(W_text[j], unembed, tok, n_logits)
            features.append({
                "modelId": model_id, "layer": source_id, "index": str(j), "creatorId": creator, "createdAt": created,
                "maxActApprox": max_act, "hasVector": True, "vector": W_text[j].tolist(), "vectorLabel": None,
                "vectorDefaultSteerStrength": max_act, "hookName": hook, "topkCosSimIndices": [], "topkCosSimValues": [],
                "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
                "correlated_neurons_indices": [], "correlated_neurons_pearson": [], "correlated_neurons_l1": [],
                "correlated_features_indices": [], "correlated_features_pearson": [], "correlated_features_l1": [],
                "neg_str": neg_str, "neg_values": neg_values, "pos_str": pos_str, "pos_values": pos_values,
                "frac_nonzero": float((text_tok[:, j] > 0).float().mean()),
                "freq_hist_data_bar_heights": [], "freq_hist_data_bar_values": [],
                "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [], "decoder_weights_dist": []})
            lab = by_feature.get(j)
            ext_features.append({
                "modelId": model_id, "layer": source_id, "index": str(j),
                "label": lab.label if lab is not None else None, "kind": lab.kind if lab is not None else None,
                "purity": lab.purity if lab is not None else None,
                "corr": {"vision": lab.vision_corr, "text": lab.text_corr} if lab is not None else None,
                "firesOn": [m for m, on in (("text", bool(fires_text[j])), ("image", bool(fires_image[j]))) if on],
                "fracImages": float((codes.zv[:, j] > 0).float().mean()), "maxImageValue": float(codes.zv[:, j].max()),
                "vectorVision": W_vis[j].tolist(), "hfHookName": sae_model.cfg.metadata.get("hf_hook_name")})
        _gz_jsonl(tmp / "features" / "batch-0.jsonl.gz", features)
        _gz_jsonl(tmp / "activations" / "batch-0.jsonl.gz", activations)
        _gz_jsonl(tmp / EXTENSION / "features" / "batch-0.jsonl.gz", ext_features)
        _gz_jsonl(tmp / EXTENSION / "activations" / "batch-0.jsonl.gz", ext_activations)
        _gz_jsonl(tmp / EXTENSION / "images" / "batch-0.jsonl.gz", [{"imageIndex": k, "png": v} for k, v in images_out.items()])
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _caption_ids(processor: Any, caption: str, n: int) -> list[int] | None:
    """Token ids of the caption words (what sits at the ``n`` caption positions), or None if they differ."""
    tok = getattr(processor, "tokenizer", processor)
    try:
        ids = tok(caption, add_special_tokens=False)["input_ids"]
    except Exception:  # noqa: BLE001
        return None
    return list(ids) if len(ids) == n else None


def _read_batches(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in sorted(folder.glob("*.jsonl.gz"))
            for line in gzip.decompress(p.read_bytes()).decode().splitlines() if line]


def read_export(source_dir: str | Path) -> dict[str, Any]:
    """The records of an export folder ``OUT/{model}/{source}``: Neuronpedia's (``release``, ``model``, ``sourceset``,
    ``source``, ``features``, ``activations``) and, under ``"jsae"``, the extension's (``features``, ``activations``,
    ``images``)."""
    d = Path(source_dir)
    out: dict[str, Any] = {}
    for f in EXPORT_FILES:
        out[f.removesuffix(".jsonl")] = [json.loads(line) for line in (d / f).read_text().splitlines() if line]
    for sub in BATCHES:
        out[sub] = _read_batches(d / sub)
    out[EXTENSION] = {sub: _read_batches(d / EXTENSION / sub) for sub in EXTENSION_BATCHES}
    return out


__all__ = ["EXPORT_FILES", "EXTENSION", "export_neuronpedia", "logit_lens", "read_export"]
