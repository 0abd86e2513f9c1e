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
from dataclasses import dataclass
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
    from jsae.report.browser import token_codes
    from jsae.world import world_dataset

    for name, value, low in (("n_pairs", n_pairs, 1), ("n_examples", n_examples, 1), ("n_logits", n_logits, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
    ex = _open_export(sae, model)
    ids = _export_ids(ex, model_id, source_set, release_id, creator, hf_repo_id)
    ds = world_dataset("validation", n_pairs, seed)
    codes = token_codes(ex.vlm, ex.sae, [(r["image"], r["caption"]) for r in ds], ex.layer)
    chosen = _chosen_features(codes, n_features, f"no feature of {ex.path} fires on {n_pairs} held-out pairs")
    final = Path(out) / ids.model_id / ids.source_id
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        for fname, rec in _meta_records(ex, ids, n_pairs, int(codes.caption_mask.sum(1).max())):
            (tmp / fname).write_text(json.dumps(rec) + "\n")
        batches = _feature_batches(ex, ids, codes, chosen, n_examples, n_logits)
        for folder, rows in batches.items():
            _gz_jsonl(tmp / folder / "batch-0.jsonl.gz", rows)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


@dataclass
class _Export:
    """The SAE being exported and what it is read with: its folder, labels, VLM (and the VLM's short name), layer."""

    path: Path
    sae: Any
    labels: Any
    vlm: Any
    name: str
    layer: int


@dataclass
class _ExportIds:
    """Neuronpedia's names for the export: model, source (``{layer}-{source_set}``), release, hub repo, creator."""

    model_id: str
    source_id: str
    source_set: str
    release_id: str
    hf_repo_id: str | None
    saelens_release: str | None
    saelens_sae_id: str | None
    creator: str
    created: str


def _open_export(sae: str | Path, model: str | None) -> _Export:
    """The JSAE folder (or release) with its labels, the VLM it was trained on, checked against each other."""
    from jsae.interventions import check_sae_site
    from jsae.labels import FeatureLabels
    from jsae.report.browser import world_model_for
    from jsae.report.rundir import resolve_sae_dir
    from jsae.saes.joint_sae import JointSAE

    path = resolve_sae_dir(sae)
    sae_model = JointSAE.load_from_disk(path)
    labels = FeatureLabels.load(path / "labels.json") if (path / "labels.json").is_file() else None
    if labels is not None:
        labels.check_sae(sae_model, f"the SAE in {path}")
    vlm, name = world_model_for(sae_model, model)
    layer = sae_layer(sae_model)
    check_sae_site(sae_model, layer, vlm.adapter, f"export ({path})",
                   f"pass the --model it was trained on ({sae_model.cfg.metadata.get('model_name')}), or leave --model out")
    return _Export(path, sae_model, labels, vlm, name, layer)


def _export_ids(ex: _Export, model_id: str | None, source_set: str, release_id: str | None, creator: str,
                hf_repo_id: str | None) -> _ExportIds:
    """The given names, else the release's (a shipped or hub release) or the folder's."""
    saelens_release, saelens_sae_id, hub_repo = _release_of(ex.sae, ex.path)
    return _ExportIds(model_id=model_id or f"jsae-toy-{ex.name}", source_id=f"{ex.layer}-{source_set}",
                      source_set=source_set, release_id=release_id or saelens_release or ex.path.parent.name,
                      hf_repo_id=hf_repo_id or hub_repo, saelens_release=saelens_release,
                      saelens_sae_id=saelens_sae_id, creator=creator, created=time.strftime("%Y-%m-%dT%H:%M:%S"))


def _chosen_features(codes: Any, n_features: int | None, none_fire: str) -> list[int]:
    """The live features (firing on a caption token or an image), the most active first when ``n_features`` caps
    them; ``none_fire`` is the error when none is live."""
    text_tok = codes.zt_tok[codes.caption_mask]  # [n caption tokens, d_sae]
    live = ((text_tok > 0).any(0) | (codes.zv > 0).any(0)).nonzero().flatten()
    if live.numel() == 0:
        raise ValueError(f"{none_fire}; nothing to export")
    strength = torch.maximum(text_tok.max(0).values, codes.zv.max(0).values)
    return sorted(live.tolist(), key=lambda j: -float(strength[j]))[:n_features] if n_features else live.tolist()


def _meta_records(ex: _Export, ids: _ExportIds, n_pairs: int, n_caption_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    """Neuronpedia's release, model, source-set and source records, as (file name, record)."""
    cfg, creator, created, source_set, source_id = ex.sae.cfg, ids.creator, ids.created, ids.source_set, ids.source_id
    url = [f"https://huggingface.co/{ids.hf_repo_id}"] if ids.hf_repo_id else []
    text_cfg = ex.vlm.adapter.hf_model.config.get_text_config()
    return [
        ("release.jsonl", {
            "name": ids.release_id, "description": f"jsae Joint SAE {ids.release_id} (vision + text branches)",
            "creatorName": creator, "creatorId": creator, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
            "descriptionShort": ids.release_id, "urls": url, "creatorEmail": None, "creatorNameShort": creator,
            "defaultSourceSetName": source_set, "defaultSourceId": source_id, "defaultUmapSourceIds": [],
            "createdAt": created}),
        ("model.jsonl", {
            "id": ids.model_id, "instruct": False, "creatorId": creator, "displayNameShort": ex.name,
            "displayName": ex.name, "tlensId": cfg.metadata.get("model_name") or ex.name, "dimension": int(cfg.d_in),
            "visibility": "PUBLIC", "defaultSourceSetName": source_set, "defaultSourceId": source_id,
            "inferenceEnabled": False, "layers": int(ex.vlm.adapter.n_layers),
            "neuronsPerLayer": int(getattr(text_cfg, "intermediate_size", 0) or 0), "createdAt": created,
            "owner": creator, "updatedAt": created, "website": None}),
        ("sourceset.jsonl", {
            "modelId": ids.model_id, "name": source_set, "creatorId": creator, "hasDashboards": True,
            "visibility": "PUBLIC", "description": f"Joint SAE (text branch) - residual stream - {cfg.d_sae}",
            "type": "sae", "creatorName": creator, "urls": url, "creatorEmail": None, "releaseName": ids.release_id,
            "defaultOfModelId": None, "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False,
            "showCorrelated": False, "showHeadAttribution": False, "showUmap": False, "createdAt": created}),
        ("source.jsonl", {
            "id": source_id, "modelId": ids.model_id, "setName": source_set, "creatorId": creator,
            "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [], "saelensConfig": None,
            "saelensRelease": ids.saelens_release, "saelensSaeId": ids.saelens_sae_id, "hfRepoId": ids.hf_repo_id,
            "hfFolderId": ids.saelens_sae_id or cfg.metadata.get("hf_hook_name") or ex.path.name,
            "visibility": "PUBLIC", "defaultOfModelId": None, "hasUmap": False, "hasUmapLogSparsity": False,
            "hasUmapClusters": False, "num_prompts": n_pairs, "num_tokens_in_prompt": n_caption_tokens,
            "dataset": "jsae.world captions (validation split, generated locally)", "notes": None,
            "createdAt": created}),
    ]


def _feature_batches(ex: _Export, ids: _ExportIds, codes: Any, chosen: list[int], n_examples: int,
                     n_logits: int) -> dict[str, list[dict[str, Any]]]:
    """Every batch file's rows by folder: Neuronpedia's features and caption activations, jsae's extension
    features, image activations and images."""
    from jsae.report.browser import top_examples

    tok = getattr(ex.vlm.processor, "tokenizer", ex.vlm.processor)
    unembed = ex.vlm.adapter.hf_model.get_output_embeddings().weight.detach()
    W_text, W_vis = ex.sae.W_dec_of("text").detach(), ex.sae.W_dec_of("vision").detach()
    by_feature = {lab.feature: lab for lab in ex.labels.labels} if ex.labels is not None else {}
    text_tok = codes.zt_tok[codes.caption_mask]
    features, activations, ext_features, ext_activations, images_out = [], [], [], [], {}
    for j in chosen:
        top_img, top_cap = top_examples(codes, j, n_examples)
        max_act = _caption_activations(ex, ids, codes, j, top_cap, tok, activations)
        _image_activations(ids, codes, j, top_img, ext_activations, images_out)
        features.append(_feature_record(ids, j, W_text[j], max_act, logit_lens(W_text[j], unembed, tok, n_logits),
                                        float((text_tok[:, j] > 0).float().mean()), saelens_hook_name(ex.layer)))
        lab = by_feature.get(j)
        fires = (("text", bool((text_tok[:, j] > 0).any())), ("image", bool((codes.zv[:, j] > 0).any())))
        ext_features.append({
            "modelId": ids.model_id, "layer": ids.source_id, "index": str(j),
            "label": lab.label if lab is not None else None, "kind": lab.kind if lab is not None else None,
            "purity": lab.purity if lab is not None else None,
            "corr": {"vision": lab.vision_corr, "text": lab.text_corr} if lab is not None else None,
            "firesOn": [m for m, on in fires if on],
            "fracImages": float((codes.zv[:, j] > 0).float().mean()), "maxImageValue": float(codes.zv[:, j].max()),
            "vectorVision": W_vis[j].tolist(), "hfHookName": ex.sae.cfg.metadata.get("hf_hook_name")})
    return {"features": features, "activations": activations, f"{EXTENSION}/features": ext_features,
            f"{EXTENSION}/activations": ext_activations,
            f"{EXTENSION}/images": [{"imageIndex": k, "png": v} for k, v in images_out.items()]}


def _caption_activations(ex: _Export, ids: _ExportIds, codes: Any, j: int, top_cap: list[int], tok: Any,
                         out: list[dict[str, Any]]) -> float:
    """Append feature ``j``'s Activation records on its top captions (per-token values) to ``out``; returns its
    largest value on them."""
    max_act = 0.0
    for b in top_cap:
        pos = codes.caption_mask[b].nonzero().flatten()
        values = codes.zt_tok[b][pos][:, j].tolist()
        if not values or max(values) <= 0:
            continue
        token_ids = _caption_ids(ex.vlm.processor, codes.captions[b], len(pos))
        words = tok.convert_ids_to_tokens(token_ids) if token_ids is not None else codes.captions[b].split()[:len(values)]
        max_act = max(max_act, max(values))
        out.append({
            "id": f"{ids.source_id}-{j}-{len(out)}", "tokens": [str(w) for w in words], "index": str(j),
            "layer": ids.source_id, "modelId": ids.model_id, "maxValue": max(values),
            "maxValueTokenIndex": int(np.argmax(values)), "minValue": min(values), "values": values,
            "creatorId": ids.creator, "dataSource": "jsae.world:validation", "dataIndex": str(b), "dfaValues": [],
            "dfaTargetIndex": None, "dfaMaxValue": None, "createdAt": ids.created, "lossValues": [],
            "logitContributions": None, "binMin": None, "binMax": None, "binContains": None,
            "qualifyingTokenIndex": None})
    return max_act


def _image_activations(ids: _ExportIds, codes: Any, j: int, top_img: list[int], out: list[dict[str, Any]],
                       images: dict[str, str]) -> None:
    """Append feature ``j``'s image activation records (patch grids; jsae's extension) on its top images to ``out``,
    each image once in ``images`` (base64 PNG by key)."""
    from jsae.report.browser import heat_map

    for b in top_img:
        if float(codes.zv[b, j]) <= 0:
            continue
        g = heat_map(codes, b, j)
        key = f"validation-{b}"
        if key not in images:
            buf = io.BytesIO()
            codes.images[b].convert("RGB").save(buf, format="PNG")
            images[key] = base64.b64encode(buf.getvalue()).decode()
        out.append({"modelId": ids.model_id, "layer": ids.source_id, "index": str(j), "modality": "image",
                    "dataIndex": str(b), "imageIndex": key, "patchGrid": g.tolist(), "maxValue": float(g.max()),
                    "pooledValue": float(codes.zv[b, j])})


def _feature_record(ids: _ExportIds, j: int, vector: torch.Tensor, max_act: float,
                    lens: tuple[list[str], list[float], list[str], list[float]], frac_nonzero: float,
                    hook: str) -> dict[str, Any]:
    """Neuronpedia's Feature record of feature ``j``: its text decoder row, logit lens and firing rate."""
    pos_str, pos_values, neg_str, neg_values = lens
    return {
        "modelId": ids.model_id, "layer": ids.source_id, "index": str(j), "creatorId": ids.creator,
        "createdAt": ids.created, "maxActApprox": max_act, "hasVector": True, "vector": vector.tolist(),
        "vectorLabel": None, "vectorDefaultSteerStrength": max_act, "hookName": hook, "topkCosSimIndices": [],
        "topkCosSimValues": [], "neuron_alignment_indices": [], "neuron_alignment_values": [],
        "neuron_alignment_l1": [], "correlated_neurons_indices": [], "correlated_neurons_pearson": [],
        "correlated_neurons_l1": [], "correlated_features_indices": [], "correlated_features_pearson": [],
        "correlated_features_l1": [], "neg_str": neg_str, "neg_values": neg_values, "pos_str": pos_str,
        "pos_values": pos_values, "frac_nonzero": frac_nonzero, "freq_hist_data_bar_heights": [],
        "freq_hist_data_bar_values": [], "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "decoder_weights_dist": []}


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
