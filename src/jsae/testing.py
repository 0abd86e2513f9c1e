"""Tiny random-config instances of the four VLM classes jsae supports, with offline processors, for tests
and benchmarks.

Everything is built from configs (no hub, no network, random weights):

* :func:`build_hf` ``(kind, layers, hidden, seed)``: a ``LlavaForConditionalGeneration``,
  ``LlavaNextForConditionalGeneration``, ``Qwen3VLForConditionalGeneration`` or
  ``Qwen3VLMoeForConditionalGeneration`` (``kind`` in :data:`KINDS`, one :data:`TINY` entry each), eval mode, float32;
* :func:`build_processor` ``(kind, chat_template)``: a real ``LlavaProcessor`` / ``LlavaNextProcessor`` with a
  word-level tokenizer (:func:`make_tokenizer`); for Qwen3-VL, whose real processor needs torchvision for its
  video processor, the world's ``ToyQwen3VLProcessor`` (the real ``Qwen3VLProcessor`` for images, with the
  real ``Qwen2VLImageProcessorPil``);
* :func:`tiny_vlm` ``(kind)``: a cached :class:`TinyVLM` holding the transformers model (``hf``), its nnsight
  wrapper (``model``), the processor and the adapter, with ``images(n)`` / ``pairs(n)`` / ``inputs(n)`` helpers
  that give images of *different sizes* (:data:`IMAGE_SIZES`), so batches have rows of different lengths.

The pytest fixtures over these live in ``tests/conftest.py``; the benchmarks import this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID = 100, 101, 102, 103
WORDS = ["a", "an", "the", "red", "blue", "green", "small", "large", "cat", "dog", "circle", "square",
         "on", "left", "right", "and", "of", "describe", "image", "USER:", "ASSISTANT:", "<|im_start|>",
         "<|im_end|>", "user", "assistant"] + [f"w{i}" for i in range(60)]
LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }} {% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }} {% endif %}"
    "{% endfor %}<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant{% endif %}"
)


def make_tokenizer(kind: str) -> Any:
    """Word-level tokenizer over :data:`WORDS` with the image (and, for Qwen, video and vision marker) tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    markers = _tiny(kind).vision_markers
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + WORDS)}
    image = "<|image_pad|>" if markers else "<image>"
    vocab.update({image: IMAGE_ID, "<|video_pad|>": VIDEO_ID, "<|vision_start|>": VSTART_ID, "<|vision_end|>": VEND_ID})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"image_token": image}
    if markers:
        extra.update(video_token="<|video_pad|>", vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=extra, padding_side="left")


def _text(C: Any, layers: int, hidden: int, **kw: Any) -> Any:
    return C(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=1,
             eos_token_id=2, pad_token_id=0, **kw)


def _clip(hidden: int = 32, image_size: int = 16, patch: int = 4) -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                            image_size=image_size, patch_size=patch, projection_dim=hidden)


PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def _llava(layers: int, hidden: int) -> Any:
    import transformers as T

    cfg = T.LlavaConfig(vision_config=_clip(), text_config=_text(T.LlamaConfig, layers, hidden), image_token_index=IMAGE_ID,
                        image_seq_length=16, vision_feature_layer=-1, vision_feature_select_strategy="default")
    return T.LlavaForConditionalGeneration(cfg)


def _llava_next(layers: int, hidden: int) -> Any:
    import transformers as T

    cfg = T.LlavaNextConfig(vision_config=_clip(), text_config=_text(T.MistralConfig, layers, hidden), image_token_index=IMAGE_ID,
                            image_grid_pinpoints=PINPOINTS, vision_feature_layer=-1, vision_feature_select_strategy="default")
    return T.LlavaNextForConditionalGeneration(cfg)


def _qwen3_vl_parts(layers: int, hidden: int) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    head_dim = 8
    text = dict(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                num_attention_heads=hidden // head_dim, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512,
                pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=hidden, num_position_embeddings=16, deepstack_visual_indexes=[0])
    ids = dict(image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VSTART_ID, vision_end_token_id=VEND_ID)
    return text, vision, ids


def _qwen3_vl(layers: int, hidden: int) -> Any:
    import transformers as T

    text, vision, ids = _qwen3_vl_parts(layers, hidden)
    return T.Qwen3VLForConditionalGeneration(T.Qwen3VLConfig(text_config=text, vision_config=vision, **ids))


def _qwen3_vl_moe(layers: int, hidden: int) -> Any:
    import transformers as T

    text, vision, ids = _qwen3_vl_parts(layers, hidden)
    text = {**text, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": hidden // 2}
    return T.Qwen3VLMoeForConditionalGeneration(T.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **ids))


def _llava_processor(tok: Any, chat_template: bool) -> Any:
    import transformers as T

    ip = T.CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return T.LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                            num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE if chat_template else None)


def _llava_next_processor(tok: Any, chat_template: bool) -> Any:
    import transformers as T

    ip = T.LlavaNextImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16},
                                      image_grid_pinpoints=PINPOINTS)
    return T.LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=4, vision_feature_select_strategy="default",
                                num_additional_image_tokens=1, chat_template=LLAVA_TEMPLATE if chat_template else None)


def _qwen_processor(tok: Any, chat_template: bool) -> Any:
    # the world's Qwen3VLProcessor without its video processor (which needs torchvision), sizes kept free
    from jsae.world.processors import build_qwen_processor

    return build_qwen_processor(tok, patch_size=4, merge_size=2, min_pixels=64, max_pixels=4096,
                                chat_template=QWEN_TEMPLATE if chat_template else None)


@dataclass(frozen=True)
class TinyKind:
    """How to build one kind: its model ``(layers, hidden)``, its processor ``(tokenizer, chat_template)``, and
    whether its tokenizer has Qwen's vision markers (``<|image_pad|>``, video, vision start / end)."""

    model: Callable[[int, int], Any]
    processor: Callable[[Any, bool], Any]
    vision_markers: bool = False


#: one entry per kind: the one table that tells the families apart here
TINY: dict[str, TinyKind] = {
    "llava": TinyKind(_llava, _llava_processor),
    "llava_next": TinyKind(_llava_next, _llava_next_processor),
    "qwen3_vl": TinyKind(_qwen3_vl, _qwen_processor, vision_markers=True),
    "qwen3_vl_moe": TinyKind(_qwen3_vl_moe, _qwen_processor, vision_markers=True),
}
KINDS = tuple(TINY)


def _tiny(kind: str) -> TinyKind:
    if kind not in TINY:
        raise ValueError(f"unknown kind {kind!r}; choose one of {list(KINDS)}")
    return TINY[kind]


def build_hf(kind: str, layers: int = 3, hidden: int = 32, seed: int = 0) -> Any:
    """A tiny random ``kind`` model (eval mode, float32)."""
    build = _tiny(kind).model
    torch.manual_seed(seed)
    return build(layers, hidden).eval()


def build_processor(kind: str, chat_template: bool = True) -> Any:
    """The processor of ``kind`` over :func:`make_tokenizer`'s tokenizer, with a chat template unless
    ``chat_template=False`` (then prompts use the adapter's plain layout)."""
    return _tiny(kind).processor(make_tokenizer(kind), chat_template)


def make_image(height: int, width: int, seed: int) -> Image.Image:
    """A random RGB image of ``height × width`` pixels (deterministic for ``seed``)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


IMAGE_SIZES = [(16, 16), (16, 32), (32, 16), (24, 24), (32, 32), (20, 28)]
CAPTIONS = ["a red cat", "the large blue square on the left", "a small green dog", "an image of a circle",
            "the red square and a blue circle", "a dog on the right"]


@dataclass
class TinyVLM:
    """One tiny model of ``kind`` with its nnsight wrapper, processor and adapter."""

    kind: str
    hf: Any
    model: Any  # nnsight.NNsight(hf)
    processor: Any
    adapter: Any

    def images(self, n: int, start: int = 0) -> list[Image.Image]:
        return [make_image(*IMAGE_SIZES[(start + i) % len(IMAGE_SIZES)], seed=start + i) for i in range(n)]

    def pairs(self, n: int, start: int = 0) -> list[tuple[Image.Image, str]]:
        return list(zip(self.images(n, start), [CAPTIONS[(start + i) % len(CAPTIONS)] for i in range(n)]))

    def inputs(self, n: int = 2, start: int = 0) -> Any:
        images, texts = zip(*self.pairs(n, start))
        return self.adapter.build_inputs(self.processor, list(images), list(texts))


@lru_cache(maxsize=None)
def tiny_vlm(kind: str) -> TinyVLM:
    """The :class:`TinyVLM` of ``kind`` (built once per process: 3 layers, hidden 32, seed 0)."""
    from nnsight import NNsight

    import jsae.adapters as A

    hf = build_hf(kind)
    model = NNsight(hf)
    return TinyVLM(kind, hf, model, build_processor(kind), A.for_model(model))


def paired_activations(n: int = 64, d: int = 16, seed: int = 0, *, rank: int = 4,
                       scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic paired activations for SAE tests: ``(vision [n, d], text [n, d])`` sharing ``rank`` non-negative
    latent factors per pair (``rand(n, rank)``), read out by two random ``[rank, d]`` maps; times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.rand(n, rank, generator=g)
    return scale * (latent @ torch.randn(rank, d, generator=g)), scale * (latent @ torch.randn(rank, d, generator=g))


def pairs_with(n: int = 64, d: int = 16, rank: int = 4) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``pairs(n, d, seed=0, scale=1.0)``: :func:`paired_activations` with a test module's own defaults."""

    def pairs(n: int = n, d: int = d, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        return paired_activations(n, d, seed, rank=rank, scale=scale)

    return pairs
