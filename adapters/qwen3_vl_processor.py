"""``ToyQwen3VLProcessor``: Qwen3-VL's processor for images only (the family's processor where torchvision, which its
video processor needs, is not installed); :meth:`jsae.adapters.Qwen3VLAdapter.build_processor` builds it."""

from __future__ import annotations

from transformers import Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin


class ToyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` for images only: same call, outputs (``input_ids``, ``attention_mask``,
    ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``) and token layout, but no video processor
    (the video processor of transformers needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_pad_token", None) or "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.vision_start_token = "<|vision_start|>"
        self.vision_end_token = "<|vision_end|>"
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        if videos is not None:
            raise ValueError("ToyQwen3VLProcessor handles images only; pass images= and text=")
        # the image token of this tokenizer is "<image>" (LLaVA's); Qwen text uses <|image_pad|>
        if text is not None:
            single = isinstance(text, str)
            texts = [text] if single else list(text)
            wrapped = "<|vision_start|><|image_pad|><|vision_end|>"
            texts = [t.replace("<|image_pad|>", wrapped) if "<|image_pad|>" in t and "<|vision_start|>" not in t
                     else t if "<|image_pad|>" in t or images is None else f"{wrapped} {t}" for t in texts]
            text = texts[0] if single else texts
        return super().__call__(images=images, text=text, **kwargs)
