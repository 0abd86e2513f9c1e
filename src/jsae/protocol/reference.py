"""The JSAE reference code (``anonymous-lab25/anonymous-jsae``) as far as the protocol reproduces it: its settings
(the ``"reference"`` preset's choices, :data:`REFERENCE_CHOICES`; its strengths, prompts and epochs), its prompts
where the model's tokenizer knows their words (:func:`reference_prompts`), and every remaining difference of a
``preset="reference"`` run from it (:func:`reference_differences`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from jsae.report.markdown import Difference

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
#: The models, data, training-set size and layers of the reference's experiments.
REFERENCE_MODELS = "LLaVA-v1.6-Mistral-7B / Llama3-LLaVA-8B / Qwen3-VL-30B"
REFERENCE_DATA = "jxie/coco_captions"
REFERENCE_N_TRAIN = 50_000
REFERENCE_LAYERS = (7, 13, 25, 30)
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


def reference_differences(cfg: ProtocolConfig, prompt_notes: dict[str, Any], n_layers: int,
                          layers: list[int]) -> list[Difference]:
    """Every remaining difference of a ``preset="reference"`` run from the JSAE reference code, as records (the
    setting, the reference's value, ours, why; from the run's own configuration where it decides).  The report
    words them (:func:`jsae.report.markdown.difference_line`)."""
    from jsae.world import MODEL_NAMES

    out: list[Difference] = []
    if cfg.model in MODEL_NAMES:
        out.append(Difference("model", REFERENCE_MODELS, cfg.model, "a small model trained on the embedded world"))
    if cfg.data is None:
        out.append(Difference("data", REFERENCE_DATA, "world", "rendered scenes, grammar captions"))
    else:
        out.append(Difference("data", REFERENCE_DATA, {"dataset": cfg.data, "split": cfg.data_split,
                                                       "dedup_images": cfg.dedup_images,
                                                       "parts": [cfg.n_train, cfg.n_label, cfg.n_eval]},
                              "its evaluation images come from the JSAE's training set: a reference fault not reproduced"))
    out.append(Difference("n_train", REFERENCE_N_TRAIN, cfg.n_train))
    out.append(Difference("concepts", "7 hand-listed scene categories",
                          {"words": "world" if cfg.data is None else "caption", "given": bool(cfg.concepts)},
                          "to run such a table use `jsae run experiments --table`"))
    out.append(Difference("latents", "by hand", {"top_k": cfg.top_k, "in_sample": cfg.reference_faults}))
    out.append(Difference("strength", {"alphas": list(REFERENCE_ALPHAS), "per_image_walk": True},
                          {"alphas": list(cfg.alphas or []), "best_alpha_per_image": cfg.reference_faults},
                          "a dose-response curve per concept, layer and direction; r50 and effects read off it"))
    out.append(Difference("metrics", ["SBERT similarity gain", "GPT-2 perplexity"],
                          ["keyword hit", "preservation", "strict fluency", "hallucinations"],
                          "SBERT and GPT-2 need a target sentence per concept: `jsae run experiments`"))
    out.append(Difference("reference_faults", True, cfg.reference_faults))
    for part in ("capture", "caption"):
        note = prompt_notes.get(part, {})
        if note.get("used"):
            continue
        if "given" in note:
            out.append(Difference(f"{part}_prompt", note.get("reference"), note["given"], "given explicitly"))
        else:
            out.append(Difference(f"{part}_prompt", note.get("reference"),
                                  {"prompt": "the model's own", "unknown_words": note.get("unknown_words")},
                                  "the model's tokenizer lacks words of the reference's"))
    out.append(Difference("layers", {"layers": list(REFERENCE_LAYERS), "of": 32}, {"layers": list(layers), "of": n_layers}))
    out.append(Difference("training", {"last_partial_batch": "kept", "adam": "unfused", "weights": "last epoch"},
                          {"last_partial_batch": "dropped", "adam": "fused", "weights": "best epoch"},
                          "fused Adam is the same update up to float rounding"))
    if "saelens-topk" in cfg.methods:
        out.append(Difference("saelens-topk", None, {"steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr},
                              "a matched width, not a matched budget"))
    if "separate" in cfg.methods:
        out.append(Difference("separate", None, "jsae-none + matching",
                              "the no-alignment JSAE with its text latents paired to the vision latents afterwards"))
    for key in ("text_positions", "steer_at", "max_new_tokens", "epochs", "d_sae"):
        if getattr(cfg, key) != REFERENCE_CHOICES[key]:
            out.append(Difference(key, "4 · d_in" if key == "d_sae" else REFERENCE_CHOICES[key], getattr(cfg, key),
                                  "overridden"))
    if cfg.expansion_factor not in (None, 4):
        out.append(Difference("expansion_factor", 4, cfg.expansion_factor, "overridden"))
    return out


__all__ = ["REFERENCE_ALPHAS", "REFERENCE_CAPTION_PROMPT", "REFERENCE_CAPTION_TEMPLATE", "REFERENCE_CAPTURE_TEMPLATE",
           "REFERENCE_CHOICES", "REFERENCE_DATA", "REFERENCE_EPOCHS",
           "REFERENCE_LAYERS", "REFERENCE_MODELS", "REFERENCE_N_TRAIN", "reference_differences", "reference_prompts"]
