"""The protocol's stages, one function each, called in order by :func:`jsae.protocol.run.run_protocol`:
capture (:func:`capture_stage`), training (:func:`train_stage`), labelling and SAE metrics (:func:`label_stage`,
:func:`sae_metrics`), the concepts to sweep (:func:`choose_concepts`), the dose–response sweep
(:func:`sweep_stage`) and the statistics (:func:`statistics_stage`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from jsae.data.sources import DataSource
from jsae.files import apply_umask, write_json
from jsae.labels import FeatureLabels, label_features
from jsae.protocol.config import ProtocolConfig, caption_prompt, check_concepts, config_record
from jsae.protocol.methods import Method, train_methods
from jsae.protocol.reference import reference_differences
from jsae.protocol.sweep import Curve, SweepConfig, run_sweep, token_norm
from jsae.report.rundir import RunDir
from jsae.saes.metrics import fvu
from jsae.vlm import VLM

# ---- 1. capture ---------------------------------------------------------------------------------------


def capture_stage(run: RunDir, cfg: ProtocolConfig, vlm: VLM, source: DataSource, parts: tuple[str, ...] = ("train", "label"),
                  progress: bool = True) -> dict[str, Path]:
    """Pooled pairs of every part at every decoder layer (resumable; the manifest holds the fingerprint); each
    shard's batches shared with a forked second process where the machine has a core for it (the same shards)."""
    from jsae.capture import capture_pairs
    from jsae.parallel import forked_map, workers

    model, processor, adapter = vlm
    n = workers()
    return {part: capture_pairs(model, source.pairs(part), layers=list(range(adapter.n_layers)), out_dir=run.capture_dir(part),
                                processor=processor, adapter=adapter, batch_size=64, progress=progress,
                                fingerprint=source.fingerprint(part), prompt_template=cfg.prompt_template,
                                text_positions=cfg.text_positions, dataset_path=getattr(source, "path", None),
                                batch_map=lambda fn, spans, done: forked_map(fn, spans, n, done))
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
    """Every method at every swept layer, on the same pairs and budget (the layers shared between
    :func:`~jsae.parallel.workers` processes; each layer's SAEs are what training it alone gives)."""
    from jsae.capture import EVAL_METADATA, sae_metadata
    from jsae.parallel import forked_map, workers

    data = {layer: layer_data(captures, layer) for layer in layers}

    def train(i: int, _: int) -> dict[str, Method]:
        layer, d = layers[i], data[layers[i]]
        evals = {k: v for k, v in sae_metadata(captures["train"], layer).items() if k in EVAL_METADATA}
        meta = {**evals, "model_name": cfg.model, **vlm.adapter.sae_metadata(layer, vlm.processor), "pooling": "mean"}
        return train_methods(d.v, d.t, layer=layer, d_sae=cfg.d_sae, steps=cfg.steps, batch_size=cfg.batch_size,
                             lr=cfg.lr, seed=cfg.seed, methods=cfg.methods, metadata=meta, recipe=cfg.recipe,
                             expansion_factor=cfg.expansion_factor, revival=cfg.revival,
                             reference={"epochs": cfg.epochs} if cfg.recipe == "reference" else None)

    with tqdm(total=len(layers), desc="training SAEs", disable=not progress) as bar:
        trained = forked_map(train, [(k, k + 1) for k in range(len(layers))], workers(), lambda span: bar.update(1))
    return dict(zip(layers, trained)), data


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


def choose_concepts(cfg: ProtocolConfig, judge: Any, items: list[dict]) -> tuple[list[str], dict[str, str]]:
    """``cfg.concepts``, or on the world every concept of ``cfg.concept_set`` (object types by default), or on
    real data the ``max_concepts`` most frequent concept words; a concept that some sweep images have and
    others lack (5–95%) is kept, the others are returned with the reason.  Returns (concepts, dropped)."""
    from jsae.world.scenes import COLORS, TYPES

    if cfg.concepts:
        check_concepts(cfg.concepts, judge.concepts, "the labelling data's")
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


# ---- 5. sweep -----------------------------------------------------------------------------------------


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
        "config": config_record(cfg), "saes": sae_rows, "token_norms": {str(k): v for k, v in (norms or {}).items()},
        "curves": [c.record() for c in curves], "scores": [c.scores() for c in curves], "skipped": skipped or {},
        "summary": summarise_curves(curves), "timings": timings,
    }
    metrics["model_quality"] = _toy_quality(cfg.model)
    if cfg.preset == "reference":
        differences = reference_differences(cfg, prompt_notes or {}, n_layers, layers)
        metrics["reference"] = {"prompts": prompt_notes or {}, "differences": [asdict(d) for d in differences]}
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


__all__ = ["LayerData", "capture_stage", "captioner_for", "card_metrics", "choose_concepts", "label_stage",
           "layer_data", "load_methods", "sae_metrics", "statistics_stage", "sweep_stage", "train_stage"]
