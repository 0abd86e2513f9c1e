"""Word-level tokenizer and the two processors (no torchvision needed).

- ``build_tokenizer()``: a ``PreTrainedTokenizerFast`` over the grammar's words with the image special
  tokens of both families (``<image>`` for LLaVA; ``<|image_pad|>``, ``<|video_pad|>``,
  ``<|vision_start|>``, ``<|vision_end|>`` for Qwen3-VL). It prepends ``<s>``.
- ``build_llava_processor()``: the real ``transformers.LlavaProcessor`` with ``CLIPImageProcessorPil``.
- ``build_qwen_processor()``: ``ToyQwen3VLProcessor`` (the real ``Qwen3VLProcessor`` minus its video processor,
  which needs torchvision; it lives with its family in ``jsae.adapters.qwen3_vl_processor``) with
  ``Qwen2VLImageProcessorPil``. Both save/load with ``save_pretrained`` /
  ``from_pretrained`` on a local directory.
"""

from __future__ import annotations

from transformers import LlavaProcessor, PreTrainedTokenizerFast

from jsae.adapters.qwen3_vl_processor import ToyQwen3VLProcessor
from jsae.world import grammar

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
            "<|vision_end|>"]
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]  # CLIP statistics (both processors use them)
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


#: what the toy VLMs are asked when they caption (the world's captioning prompt; text after the image)
CAPTION_PROMPT = "describe the image"


def world_chat_template(image_token: str) -> str:
    """The toy VLMs' chat template: ``user : <image> {text} assistant : {answer}`` (a LLaVA-1.5-style
    single-turn layout in the world's words), with ``image_token`` for each image of a user turn."""
    return ("{%- for message in messages -%}{{- message['role'] + ' :' -}}"
            "{%- if message['content'] is string -%}{{- ' ' + message['content'] -}}{%- else -%}"
            "{%- for c in message['content'] -%}{%- if c['type'] == 'image' -%}{{- ' " + image_token + "' -}}"
            "{%- elif c['type'] == 'text' -%}{{- ' ' + c['text'] -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
            "{{- ' ' -}}{%- endfor -%}{%- if add_generation_prompt -%}{{- 'assistant :' -}}{%- endif -%}")


def build_tokenizer(extra_words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: specials first (``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2, ``<unk>`` = 3)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = grammar.vocabulary() + sorted(set(extra_words or []) - set(grammar.vocabulary()))
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "image_pad_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
        padding_side="left", model_max_length=512)
    return tok


def build_llava_processor(tokenizer=None, image_size: int = 48, patch_size: int = 8,
                          chat_template: str | None = "world") -> LlavaProcessor:
    """The toy LLaVA's processor (``chat_template="world"``: :func:`world_chat_template`; ``None``: none)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    ip = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                               image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer or build_tokenizer(), patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=world_chat_template("<image>") if chat_template == "world" else chat_template)


def build_qwen_processor(tokenizer=None, image_size: int = 48, patch_size: int = 4, merge_size: int = 2, *,
                         min_pixels: int | None = None, max_pixels: int | None = None,
                         chat_template: str | None = None) -> ToyQwen3VLProcessor:
    """``ToyQwen3VLProcessor`` with ``Qwen2VLImageProcessorPil``; images are resized to ``image_size²`` pixels
    unless ``min_pixels`` / ``max_pixels`` say otherwise (``jsae.testing`` keeps images of different sizes)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    ip = Qwen2VLImageProcessorPil(patch_size=patch_size, temporal_patch_size=2, merge_size=merge_size,
                                  min_pixels=image_size * image_size if min_pixels is None else min_pixels,
                                  max_pixels=image_size * image_size if max_pixels is None else max_pixels,
                                  image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    if chat_template == "world":
        chat_template = world_chat_template("<|image_pad|>")
    return ToyQwen3VLProcessor(image_processor=ip, tokenizer=tokenizer or build_tokenizer(), chat_template=chat_template)
