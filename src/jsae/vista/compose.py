"""Compose a LLaVA-style VLM from any transformers vision encoder and any causal language model, with a new
projector — the models VISTA trains (DINOv2 / CLIP / SigLIP encoder + Gemma-2 / Llama LM + a projector
trained from scratch).

:func:`compose` returns a real ``transformers.LlavaForConditionalGeneration`` (its ``LlavaConfig`` holds the
given models' configs; their weights are *shared*, not copied, so the language model stays exactly the
model its text SAE was trained on) wrapped as a :class:`jsae.vlm.VLM`, with a ``LlavaProcessor`` built from
the encoder's image processor and the LM's tokenizer.  jsae's LLaVA adapter, capture and interventions
work on it unchanged.

* Encoders with one leading CLS token (CLIP, DINOv2) use ``vision_feature_select_strategy="default"`` (the
  CLS is dropped, one image token per patch); encoders without (SigLIP) use ``"full"``.  Encoders with
  more leading tokens (DINOv2 with registers) are refused with a one-line error.
* The projector is LLaVA's ``Linear → GELU → Linear`` freshly initialised from ``projector_seed``.
* Gemma-2's final logit soft-capping (``tanh(logits / c) · c``, which ``LlavaForConditionalGeneration``
  does not apply) is restored by a forward hook on ``lm_head``, so the composed model's text logits equal
  the LM's own; the hook is not saved by ``save_pretrained``.
* When the tokenizer has no image token, ``image_token`` is added to a copy of it and the composed model's
  embedding matrix gets one new row (the LM's own weights are not changed; the row is never read, image
  features replace it).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from jsae.vlm import VLM


def _leading_tokens(vision_model: nn.Module, image_size: int, patch_size: int) -> int:
    """How many non-patch tokens (CLS, registers) the encoder puts before its patch tokens."""
    p = next(vision_model.parameters())
    with torch.no_grad():
        out = vision_model(torch.zeros(1, 3, image_size, image_size, dtype=p.dtype, device=p.device), output_hidden_states=True)
    return int(out.hidden_states[-1].shape[1]) - (image_size // patch_size) ** 2


def _copy_nonpersistent(dst: nn.Module, src: nn.Module) -> None:
    """Buffers that state_dict does not hold (rotary ``inv_freq``, ``position_ids``) from ``src`` by name."""
    src_bufs = dict(src.named_buffers())
    persistent = set(dst.state_dict(keep_vars=True))  # a buffer is in state_dict exactly when it is persistent
    for name, buf in list(dst.named_buffers()):
        if buf.is_meta and name in src_bufs:
            owner, _, leaf = name.rpartition(".")
            mod = dst.get_submodule(owner) if owner else dst
            mod.register_buffer(leaf, src_bufs[name], persistent=name in persistent)


def _softcap_hook(cap: float):
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        return torch.tanh(out / cap) * cap

    return hook


def compose(vision_model: Any, language_model: Any, *, image_processor: Any, tokenizer: Any, image_token: str = "<image>",
            vision_feature_layer: int = -1, projector_seed: int = 0, projector_hidden_act: str = "gelu",
            chat_template: str | None = None, name: str | None = None) -> VLM:
    """A ``LlavaForConditionalGeneration`` = ``vision_model`` (e.g. ``Dinov2Model``, ``CLIPVisionModel``,
    ``SiglipVisionModel``) + a new projector + ``language_model`` (a ``*ForCausalLM``: ``Gemma2ForCausalLM``,
    ``LlamaForCausalLM``, …), as ``VLM(model, processor, adapter)``.

    The vision model and the LM are frozen (``requires_grad=False``) and shared, not copied; only the projector
    is new (seeded).  ``image_processor`` and ``tokenizer`` make the ``LlavaProcessor`` (plain layout
    ``"<image> caption"`` unless ``chat_template`` is given).  ``vision_feature_layer`` picks the encoder's
    hidden state fed to the projector (-1: the last).  ``name`` (default ``"<encoder>+<lm>"`` from their hub ids
    or classes) is the model's ``name_or_path``, what SAEs trained on it record as their model."""
    from nnsight import NNsight
    from transformers import LlavaConfig, LlavaProcessor

    from jsae.adapters import for_model

    _check_parts(vision_model, language_model)
    vcfg, tcfg = copy.deepcopy(vision_model.config), copy.deepcopy(language_model.config)
    image_size, patch, lead = _patch_layout(vision_model)
    strategy = "default" if lead == 1 else "full"
    tok = _tokenizer_with(tokenizer, image_token, chat_template)
    image_id = int(tok.convert_tokens_to_ids(image_token))
    config = LlavaConfig(vision_config=vcfg, text_config=tcfg, image_token_index=image_id,
                         image_seq_length=(image_size // patch) ** 2, vision_feature_layer=vision_feature_layer,
                         vision_feature_select_strategy=strategy, projector_hidden_act=projector_hidden_act,
                         tie_word_embeddings=bool(getattr(tcfg, "tie_word_embeddings", False)))
    model = _assemble(config, vision_model, language_model, projector_seed)
    vocab = max(int(tcfg.vocab_size), image_id + 1)
    if vocab > int(tcfg.vocab_size):  # a new row for the image token in the composed model only
        _grow_vocab(model, vocab, next(language_model.parameters()))
    inner = model.model
    for p in list(inner.vision_tower.parameters()) + list(inner.language_model.parameters()) + list(model.lm_head.parameters()):
        p.requires_grad_(False)
    cap = getattr(tcfg, "final_logit_softcapping", None)
    if cap:
        model.lm_head.register_forward_hook(_softcap_hook(float(cap)))
    _generation_config(model, language_model, tok)
    _name(model, vision_model, language_model, name)
    model.eval()
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy=strategy, num_additional_image_tokens=lead,
                               chat_template=chat_template, image_token=image_token)
    processor.image_token, processor.image_token_id = image_token, image_id  # the given token, whatever the tokenizer calls its own
    env = NNsight(model)
    return VLM(env, processor, for_model(env))


def _check_parts(vision_model: Any, language_model: Any) -> None:
    """One-line errors for a dual encoder, a model without a patch size, or an LM that is not a ``*ForCausalLM``."""
    from transformers import PreTrainedModel

    if callable(getattr(vision_model, "get_text_features", None)):  # a dual encoder (CLIPModel, SiglipModel...)
        raise TypeError(f"pass the vision half of {type(vision_model).__name__} (a CLIPVisionModel / SiglipVisionModel), not the dual encoder")
    if not isinstance(vision_model, PreTrainedModel) or not hasattr(vision_model.config, "patch_size"):
        raise TypeError(f"vision_model must be a transformers vision encoder with a patch size (Dinov2Model, CLIPVisionModel, "
                        f"SiglipVisionModel), got {type(vision_model).__name__}")
    if not isinstance(language_model, PreTrainedModel) or not hasattr(language_model, "lm_head") or not hasattr(language_model, "model"):
        raise TypeError(f"language_model must be a transformers *ForCausalLM (with .model and .lm_head), got {type(language_model).__name__}")


def _patch_layout(vision_model: Any) -> tuple[int, int, int]:
    """(image size, patch size, tokens before the patches) of the encoder: one (CLS) or none, else a one-line error."""
    image_size, patch = int(vision_model.config.image_size), int(vision_model.config.patch_size)
    if image_size % patch:
        raise ValueError(f"the encoder's image_size {image_size} is not a multiple of its patch_size {patch}")
    lead = _leading_tokens(vision_model, image_size, patch)
    if lead not in (0, 1):
        raise ValueError(f"{type(vision_model).__name__} puts {lead} tokens before its patches (registers?); compose supports "
                         "encoders with one CLS token (CLIP, DINOv2) or none (SigLIP)")
    return image_size, patch, lead


def _tokenizer_with(tokenizer: Any, image_token: str, chat_template: str | None) -> Any:
    """``tokenizer``, or a copy of it with ``image_token`` added and (without ``chat_template``) no chat template."""
    tok = tokenizer
    if image_token not in tok.get_vocab():
        tok = copy.deepcopy(tokenizer)
        tok.add_special_tokens({"additional_special_tokens": [image_token]})
    if chat_template is None and getattr(tok, "chat_template", None):  # the plain layout: no template anywhere
        tok = copy.deepcopy(tok) if tok is tokenizer else tok
        tok.chat_template = None
    return tok


def _assemble(config: Any, vision_model: Any, language_model: Any, projector_seed: int) -> Any:
    """The ``LlavaForConditionalGeneration`` of ``config`` built on the meta device with the encoder's and the LM's
    weights assigned (shared) and a projector initialised from ``projector_seed``."""
    from transformers import LlavaForConditionalGeneration

    dtype = next(language_model.parameters()).dtype
    device = next(language_model.parameters()).device
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    inner = model.model
    inner.vision_tower.load_state_dict(vision_model.state_dict(), assign=True)
    _copy_nonpersistent(inner.vision_tower, vision_model)
    inner.language_model.load_state_dict(language_model.model.state_dict(), assign=True)
    _copy_nonpersistent(inner.language_model, language_model.model)
    model.lm_head.load_state_dict(language_model.lm_head.state_dict(), assign=True)
    proj = inner.multi_modal_projector
    proj.to_empty(device=device)
    proj.to(dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(projector_seed)
        for m in proj.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"compose left {len(left)} tensors unset ({left[:3]}); the encoder / LM classes do not match their configs")
    return model


def _grow_vocab(model: Any, vocab: int, like: torch.Tensor) -> None:
    """New zero rows up to ``vocab`` in the composed model's input embedding and ``lm_head`` (the LM's own are kept;
    the new head in the dtype and on the device of ``like``, a parameter of the LM)."""
    inner = model.model
    emb = inner.language_model.get_input_embeddings()
    new = nn.Embedding(vocab, emb.weight.shape[1], dtype=emb.weight.dtype, device=emb.weight.device)
    with torch.no_grad():
        new.weight[: emb.weight.shape[0]] = emb.weight
        new.weight[emb.weight.shape[0]:] = 0
    inner.language_model.set_input_embeddings(new)
    old = model.lm_head
    head = nn.Linear(old.in_features, vocab, bias=False, dtype=like.dtype, device=like.device)
    with torch.no_grad():
        head.weight[: old.out_features] = old.weight
        head.weight[old.out_features:] = 0
    model.lm_head = head
    model.config.text_config.vocab_size = vocab


def _generation_config(model: Any, language_model: Any, tok: Any) -> None:
    """The LM's generation config, greedy, with the tokenizer's special ids where it has none."""
    model.generation_config = copy.deepcopy(language_model.generation_config)
    g = model.generation_config
    g.do_sample = False
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(g, key, None) is None and getattr(tok, key, None) is not None:
            setattr(g, key, getattr(tok, key))


def _name(model: Any, vision_model: Any, language_model: Any, name: str | None) -> None:
    """The composed model's ``name_or_path`` (``name``, else ``<encoder>+<lm>``); its text config keeps the LM's."""
    if name is None:
        def short(m: Any) -> str:
            return str(getattr(m.config, "name_or_path", "") or type(m).__name__).rstrip("/").replace("\\", "/").rsplit("/", 1)[-1]

        name = f"{short(vision_model)}+{short(language_model)}"
    model.config.name_or_path = name
    text_cfg = getattr(model.config, "text_config", None)
    lm_name = str(getattr(language_model.config, "name_or_path", "") or "")
    if text_cfg is not None and lm_name and not getattr(text_cfg, "name_or_path", ""):
        text_cfg.name_or_path = lm_name  # the text SAEs of this LM apply to the composed model (jsae.vista.check_text_sae)


def toy_vlm_parts() -> tuple[Any, Any, Any, Any]:
    """The shipped toy LLaVA taken apart: (its ``CLIPVisionModel``, its LM as a ``LlamaForCausalLM``, image
    processor, tokenizer); the parts share the loaded VLM's weights."""
    from transformers import AutoModel, AutoModelForCausalLM

    from jsae.world.models import load_toy_hf

    vlm, processor = load_toy_hf("llava")
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(vlm.config.text_config)
        vision = AutoModel.from_config(vlm.config.vision_config)
    lm.model.load_state_dict(vlm.model.language_model.state_dict(), assign=True)
    _copy_nonpersistent(lm.model, vlm.model.language_model)
    lm.lm_head.load_state_dict(vlm.lm_head.state_dict(), assign=True)
    vision.load_state_dict(vlm.model.vision_tower.state_dict(), assign=True)
    _copy_nonpersistent(vision, vlm.model.vision_tower)
    lm.generation_config = copy.deepcopy(vlm.generation_config)
    return vision.eval(), lm.eval(), processor.image_processor, processor.tokenizer


def compose_toy(lm: str = "vlm", seed: int = 0, tower: str = "supervised") -> VLM:
    """The world's compositions, each with a new projector (seed ``seed``):

    * ``lm="vlm"``: the shipped toy LLaVA's vision tower and language model, taken apart and recomposed (the LM
      was trained with images, so it reads image tokens; the benchmark's model);
    * ``lm="text-only"``: the toy *text-only* LM (the toy LLaVA's LM after its text stage only, never trained
      with images) + the toy vision tower after its vision-pretraining stage (shipped parts; see
      :func:`jsae.world.training.train_parts`).

    ``tower`` (with ``lm="text-only"``): ``"supervised"`` — that pre-VLM tower, pretrained on the scene generator's
    labels; ``"dino"`` — the DINOv2-style ``Dinov2Model`` trained without labels (:mod:`jsae.world.dino`)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer
    # from its module: transformers 5.9-5.18 export a torchvision-only placeholder under the top-level name
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from jsae.world.training import part_dir

    if lm == "vlm":
        vision, text_lm, ip, tok = toy_vlm_parts()
        return compose(vision, text_lm, image_processor=ip, tokenizer=tok, projector_seed=seed, name="toy-composed")
    if lm != "text-only":
        raise ValueError(f"lm must be 'vlm' (the toy LLaVA's own LM and tower) or 'text-only' (the shipped text-only LM), got {lm!r}")
    if tower not in ("supervised", "dino"):
        raise ValueError(f"tower must be 'supervised' (the toy LLaVA's pre-VLM tower) or 'dino' (the DINOv2-style tower), "
                         f"got {tower!r}")
    if tower == "dino":
        from jsae.world.dino import dino_dir

        lm_dir, vis_dir = part_dir("lm"), dino_dir()
    else:
        lm_dir, vis_dir = part_dir("lm"), part_dir("vision")
    text_lm = AutoModelForCausalLM.from_pretrained(str(lm_dir), local_files_only=True, use_safetensors=True, dtype=torch.float32).eval()
    vision = AutoModel.from_pretrained(str(vis_dir), local_files_only=True, use_safetensors=True, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(lm_dir), local_files_only=True)
    ip = AutoImageProcessor.from_pretrained(str(vis_dir), local_files_only=True)
    return compose(vision, text_lm, image_processor=ip, tokenizer=tok, projector_seed=seed,
                   name="toy-text-lm" if tower == "supervised" else "toy-dino-text-lm")


__all__ = ["compose", "compose_toy", "toy_vlm_parts"]
