"""The toy VLMs (real transformers classes): one :class:`ToyModelSpec` per model in :data:`TOY_MODELS`
(config, model class, processor), saving and offline loading of shipped weights.

Adding a toy model is one entry of :data:`TOY_MODELS`; its prompt layout comes from the jsae adapter of
its model class.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from transformers import LlavaProcessor

from jsae.world.processors import CAPTION_PROMPT, SPECIALS, ToyQwen3VLProcessor, build_llava_processor, build_qwen_processor

MODELS_DIR = Path(__file__).resolve().parent / "models"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "processor_config.json")
IMAGE_SIZE = 48


def _llava_config(vocab_size: int, d: int, layers: int, vision_depth: int, ids: dict[str, int]) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vis = CLIPVisionConfig(hidden_size=d, intermediate_size=4 * d, num_hidden_layers=vision_depth, num_attention_heads=4,
                           image_size=IMAGE_SIZE, patch_size=8, projection_dim=d)
    txt = LlamaConfig(vocab_size=vocab_size, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=160,
                      bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
    return LlavaConfig(vision_config=vis, text_config=txt, image_token_index=ids["<image>"],
                       image_seq_length=(IMAGE_SIZE // 8) ** 2, projector_hidden_act="gelu",
                       vision_feature_select_strategy="default", vision_feature_layer=-1)


def _qwen3_vl_moe_config(vocab_size: int, d: int, layers: int, vision_depth: int, ids: dict[str, int]) -> Any:
    from transformers import Qwen3VLMoeConfig

    head_dim = d // 4
    q = head_dim // 2
    section = [q - 2 * (q // 3), q // 3, q // 3]
    text = dict(vocab_size=vocab_size, hidden_size=d, intermediate_size=3 * d, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=160,
                pad_token_id=ids["<pad>"], bos_token_id=ids["<s>"], eos_token_id=ids["</s>"],
                num_experts=4, num_experts_per_tok=2, moe_intermediate_size=3 * d // 2, decoder_sparse_step=1,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": section,
                                 "mrope_interleaved": True})
    grid = IMAGE_SIZE // 4
    vision = dict(depth=vision_depth, hidden_size=d, intermediate_size=4 * d, num_heads=4, patch_size=4,
                  temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=d, num_position_embeddings=grid * grid,
                  deepstack_visual_indexes=[vision_depth - 2] if vision_depth > 1 else [0])
    return Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                            video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"])


@dataclass(frozen=True)
class ToyModelSpec:
    """Everything model-specific about one toy VLM.

    ``config(vocab_size, d, layers, vision_depth, ids)`` gives its transformers config (``ids``: the
    tokenizer's special-token ids by string); ``model_class`` is the transformers class name (its jsae
    adapter gives the prompt layout); ``processor_builder(tokenizer, image_size)`` builds a fresh processor
    and ``processor_class`` loads a saved one; ``train_steps`` are the default step counts of
    ``jsae.world.training`` (``TrainConfig`` fields)."""

    config: Callable[[int, int, int, int, dict[str, int]], Any]
    model_class: str
    processor_builder: Callable[[Any, int], Any]
    processor_class: type
    train_steps: Mapping[str, int]
    #: its text-only LM and pre-VLM tower ship as parts of their own (what VISTA composes)
    ships_parts: bool = False


#: default step counts are sized for 30 minutes on 2 CPU cores (torch 2 threads + 1 data worker); measured
#: step rates: llava lm 3.7/s, vision 6.7/s, vlm 1.9/s, cqa 1.6/s; qwen3-vl-moe lm 2.3/s, vision 2.0/s,
#: vlm/cqa ~1.1/s (see the README)
TOY_MODELS: dict[str, ToyModelSpec] = {
    "llava": ToyModelSpec(
        config=_llava_config, model_class="LlavaForConditionalGeneration",
        processor_builder=build_llava_processor, processor_class=LlavaProcessor,
        train_steps=dict(text_steps=3000, vision_steps=1200, align_steps=800, finetune_steps=1200), ships_parts=True),
    "qwen3-vl-moe": ToyModelSpec(
        config=_qwen3_vl_moe_config, model_class="Qwen3VLMoeForConditionalGeneration",
        processor_builder=lambda tok, size: build_qwen_processor(tok, size, chat_template="world"), processor_class=ToyQwen3VLProcessor,
        train_steps=dict(text_steps=3000, vision_steps=600, align_steps=600, finetune_steps=800)),
}
MODEL_NAMES = tuple(TOY_MODELS)


def check_name(name) -> str:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown toy model {name!r}; choose one of {list(MODEL_NAMES)}")
    return name


def toy_spec(name: str) -> ToyModelSpec:
    """The :class:`ToyModelSpec` of toy model ``name`` (one-line error for an unknown name)."""
    return TOY_MODELS[check_name(name)]


def toy_name(name_or_path: str | Path | None) -> str | None:
    """The toy model's name when ``name_or_path`` is one, or the directory of its shipped weights (as a capture of
    ``load_vlm("llava")`` records it); else None."""
    if name_or_path is None:
        return None
    if str(name_or_path) in MODEL_NAMES:
        return str(name_or_path)
    try:
        resolved = Path(name_or_path).resolve()
    except (OSError, ValueError):
        return None
    return next((name for name in MODEL_NAMES if resolved == (MODELS_DIR / name).resolve()), None)


def model_dir(name: str) -> Path:
    """Directory of the shipped weights of toy model ``name`` (inside the installed package)."""
    return MODELS_DIR / check_name(name)


def build_config(name: str, vocab_size: int, size: str = "default"):
    """Config of toy model ``name``. ``size="tiny"`` gives a 2-layer config for smoke tests."""
    spec = toy_spec(name)
    ids = {t: SPECIALS.index(t) for t in SPECIALS}
    d, layers, vision_depth = (32, 2, 1) if size == "tiny" else (128, 8, 3)
    vocab_size = int((vocab_size + 7) // 8 * 8)
    return spec.config(vocab_size, d, layers, vision_depth, ids)


def model_class(name: str):
    """The transformers class of toy model ``name``."""
    import transformers

    return getattr(transformers, toy_spec(name).model_class)


def image_prefix(name: str) -> str:
    """The image placeholder a toy model's prompts start with (its processor expands it): the plain prompt
    of its adapter with no caption."""
    from jsae.adapters import adapter_class

    return adapter_class(toy_spec(name).model_class).plain_prompt("")


def caption_prompt(name: str, processor) -> str:
    """The full prompt a toy model captions from: its chat template with one image and
    :data:`~jsae.world.processors.CAPTION_PROMPT`, generation prompt added (text follows the image)."""
    check_name(name)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTION_PROMPT}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer_template(name: str, processor) -> str:
    """Raw prompt template (``{caption}`` in the answer turn) laying a caption out as the toy model expects
    it: :func:`caption_prompt` followed by the caption."""
    return caption_prompt(name, processor) + " {caption}"


def build_processor(name: str, tokenizer=None):
    return toy_spec(name).processor_builder(tokenizer, IMAGE_SIZE)


def processor_class(name: str):
    return toy_spec(name).processor_class


def build_model(name: str, tokenizer, size: str = "default", seed: int = 0):
    """A randomly initialised toy model of class ``model_class(name)`` (deterministic for ``seed``)."""
    torch.manual_seed(seed)
    cfg = build_config(name, len(tokenizer), size)
    model = model_class(name)(cfg)
    g = model.generation_config
    g.bos_token_id, g.eos_token_id, g.pad_token_id = 1, 2, 0
    g.max_new_tokens, g.do_sample = 48, False
    return model


def save_toy_vlm(model, processor, out_dir: str | os.PathLike, extra: dict | None = None,
                 dtype: torch.dtype = torch.float16) -> Path:
    """Write weights (safetensors, ``dtype``), config, tokenizer and processor atomically (tmp + rename)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp", dir=out.parent))
    try:
        sd = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
              for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        processor.save_pretrained(tmp)
        if extra is not None:
            (tmp / "training.json").write_text(json.dumps(extra, indent=2))
        old = out.with_name(out.name + ".old")
        if out.exists():
            if old.exists():
                shutil.rmtree(old)
            out.rename(old)
        tmp.rename(out)
        if old.exists():
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _rebuild_hint(name: str) -> str:
    return f"rebuild it with `jsae world train-models --model {name}`"


def check_weights(name: str, directory: str | os.PathLike | None = None) -> Path:
    """Check that the shipped files of ``name`` exist and that the safetensors file is readable."""
    d = Path(directory) if directory is not None else model_dir(name)
    for f in REQUIRED_FILES:
        if not (d / f).is_file():
            raise FileNotFoundError(f"toy model {name!r}: missing file {d / f}; {_rebuild_hint(name)}")
    from safetensors import safe_open

    path = d / "model.safetensors"
    try:
        with safe_open(str(path), framework="pt") as fh:
            keys = list(fh.keys())
            for k in keys:
                fh.get_tensor(k)
    except Exception as e:
        raise RuntimeError(f"toy model {name!r}: corrupt weights file {path} ({type(e).__name__}: {e}); "
                           f"{_rebuild_hint(name)}") from None
    if not keys:
        raise RuntimeError(f"toy model {name!r}: weights file {path} holds no tensors; {_rebuild_hint(name)}")
    return d


def load_toy_hf(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                directory: str | os.PathLike | None = None, device_map: Any = None, **kwargs: Any):
    """The shipped toy model ``name`` as a bare transformers model (eval mode) and its processor, offline.

    ``name`` is ``"llava"`` (``LlavaForConditionalGeneration``) or ``"qwen3-vl-moe"``
    (``Qwen3VLMoeForConditionalGeneration``).  Weights are read with safetensors through the standard
    ``from_pretrained`` on the shipped directory (no network, no remote code, no pickle).  Users load
    toy models with ``jsae.load_vlm(name)`` (nnsight-wrapped, with its adapter); this is its world half.
    ``device_map`` (and ``kwargs``: ``max_memory``, ``offload_folder``) go to ``from_pretrained`` instead of
    moving the model to ``device`` (a model split over devices, or partly offloaded to disk).
    """
    check_name(name)
    d = check_weights(name, directory)
    model = model_class(name).from_pretrained(str(d), local_files_only=True, use_safetensors=True, dtype=dtype,
                                              **({"device_map": device_map, **kwargs} if device_map is not None else {}))
    model = (model if device_map is not None else model.to(device)).eval()
    processor = processor_class(name).from_pretrained(str(d), local_files_only=True)
    return model, processor
