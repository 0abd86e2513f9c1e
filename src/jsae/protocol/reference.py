"""The JSAE reference code (``anonymous-lab25/anonymous-jsae``) as far as the protocol reproduces it: its settings
(the ``"reference"`` preset's choices, :data:`REFERENCE_CHOICES`; its strengths, prompts and epochs), its prompts
where the model's tokenizer knows their words (:func:`reference_prompts`), and every remaining difference of a
``preset="reference"`` run from it (:func:`reference_differences`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jsae.protocol.config import ProtocolConfig

#: The reference's absolute steering strengths: 0.2, 0.4, ..., 3.0.
REFERENCE_ALPHAS = tuple(round(0.2 * i, 1) for i in range(1, 16))
#: The reference's capture prompt (text view pooled over every attended non-image token of it).
REFERENCE_CAPTURE_TEMPLATE = "USER: <image>\n{caption}\nASSISTANT:"
#: The reference's captioning prompt: ``[INST] <image>\nDescribe the image. [/INST]``.
REFERENCE_CAPTION_TEMPLATE = "[INST] <image>\n{caption} [/INST]"
REFERENCE_CAPTION_PROMPT = "Describe the image."
REFERENCE_EPOCHS = 20
#: The ``"reference"`` preset's choices for the settings left unset (:data:`jsae.protocol.config.PRESET_CHOICES`):
#: ``d_sae=None`` means ``4 · d_in``, and ``steps`` is the TopK baseline's budget only (the JSAE methods train
#: ``epochs`` epochs by the reference recipe).
REFERENCE_CHOICES: dict[str, Any] = {"d_sae": None, "steps": 600, "max_new_tokens": 50, "text_positions": "non_image",
                                     "steer_at": "image+generated", "alphas": REFERENCE_ALPHAS,
                                     "epochs": REFERENCE_EPOCHS}

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
    ref = REFERENCE_CHOICES
    for key in ("text_positions", "steer_at", "max_new_tokens", "epochs", "d_sae"):
        if getattr(cfg, key) != ref[key]:
            out.append(f"Overridden: {key} = {getattr(cfg, key)!r} (the reference: "
                       f"{'4 · d_in' if key == 'd_sae' else repr(ref[key])}).")
    if cfg.expansion_factor not in (None, 4):
        out.append(f"Overridden: d_sae = {cfg.expansion_factor} · d_in (the reference: 4 · d_in).")
    return out


__all__ = ["REFERENCE_ALPHAS", "REFERENCE_CAPTION_PROMPT", "REFERENCE_CAPTION_TEMPLATE", "REFERENCE_CAPTURE_TEMPLATE",
           "REFERENCE_CHOICES", "REFERENCE_EPOCHS", "reference_differences", "reference_prompts"]
