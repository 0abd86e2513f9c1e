"""Qwen3-VL (``Qwen3VLForConditionalGeneration``) and Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration``).

Token ids come from the config: ``image_token_id`` (``<|image_pad|>``), ``video_token_id``,
``vision_start_token_id`` / ``vision_end_token_id``.  The processor writes
``<|vision_start|>`` + ``<|image_pad|>`` × (t·h·w / merge²) + ``<|vision_end|>`` per image, where
``image_grid_thw`` (``[n_images, 3]``) counts patches.  An image's tokens are its *merged* patches
(merge × merge patches each) in row-major order over ``(h / merge, w / merge)``; region 0.

The forward needs ``mm_token_type_ids`` (0 text, 1 image, 2 video; M-RoPE positions come from it):
:meth:`Qwen3VLAdapter.model_kwargs` adds it from ``input_ids`` when a processor did not.

DeepStack: the text model adds ``deepstack_visual_embeds[k]`` at the image positions *after* decoder
layer ``k`` returns (``k < len(vision_config.deepstack_visual_indexes)``), so ``layers[k].output`` is the
state before that injection (and so is ``output_hidden_states[k + 1]``).

Vision tower: ``model.model.visual``.  Projector: ``model.model.visual.merger`` (the patch merger into
the LM width; the DeepStack mergers are ``visual.deepstack_merger_list``).  Patch features
(:meth:`Qwen3VLAdapter.patch_features`): the tower's merged tokens (``visual(...).pooler_output``, one per
image token, width ``vision_config.out_hidden_size``): the merger is part of ``visual``, and only its output
sits on the image-token grid.
Plain layout (processor without chat template): ``"<|vision_start|><|image_pad|><|vision_end|> caption"``.
"""

from __future__ import annotations

import statistics
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from jsae.guards import typechecked
from jsae.adapters.base import ImageTokens, VLMAdapter, register_adapter, unwrap

# Qwen3-VL image processor defaults (preprocessor_config.json of the Qwen3-VL checkpoints)
DEFAULT_MIN_PIXELS = 65536
DEFAULT_MAX_PIXELS = 16777216


class Qwen3VLAdapter(VLMAdapter):
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    plain_layout = "<|vision_start|><|image_pad|><|vision_end|> caption"
    image_token = "<|image_pad|>"
    plain_image = "<|vision_start|><|image_pad|><|vision_end|>"

    @property
    def vision_tower(self) -> Any:
        return self.model.model.visual

    @property
    def projector(self) -> Any:
        return self.model.model.visual.merger

    @property
    def projector_modules(self) -> list:
        """The merger and the DeepStack mergers (they write image features into the LM's middle layers)."""
        visual = unwrap(self.vision_tower)
        return [visual.merger, *list(getattr(visual, "deepstack_merger_list", []))]

    @property
    def _merge(self) -> int:
        return int(self.config.vision_config.spatial_merge_size)

    @property
    def d_vision(self) -> int:
        return int(self.config.vision_config.out_hidden_size)

    @typechecked
    def patch_features(self, inputs: Mapping[str, Any]) -> Float[Tensor, "n_images n_patches d_vision"]:
        """The merged tokens of each image (``visual(pixel_values, grid_thw=image_grid_thw).pooler_output``),
        row-major over ``(h / merge, w / merge)``; all images must give the same number of tokens."""
        pv, thw = inputs.get("pixel_values"), inputs.get("image_grid_thw")
        if pv is None or thw is None:
            raise ValueError("Qwen3-VL patch_features needs 'pixel_values' and 'image_grid_thw'; let the image processor make them")
        counts = {int(n) for n in (torch.as_tensor(thw).prod(-1) // self._merge ** 2).tolist()}
        if len(counts) > 1:
            raise ValueError(f"images give different numbers of tokens ({sorted(counts)}); pass images of one size")
        out = unwrap(self.vision_tower)(pv, grid_thw=thw).pooler_output
        return out.view(thw.shape[0], -1, out.shape[-1])

    def _marker_ids(self) -> list[int]:
        c = self.config
        return [int(c.image_token_id), int(c.video_token_id), int(c.vision_start_token_id), int(c.vision_end_token_id)]

    def special_token_ids(self) -> set[int]:
        return super().special_token_ids() | set(self._marker_ids())

    def _vision_marker_mask(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(ids, torch.tensor(self._marker_ids(), device=ids.device))

    def image_tokens(self, inputs: Mapping[str, Any]) -> list[ImageTokens]:
        if inputs.get("pixel_values") is None:
            return []
        thw = inputs.get("image_grid_thw")
        if thw is None:
            raise ValueError("Qwen3-VL inputs need 'image_grid_thw' ([n_images, 3]) with 'pixel_values'; let the processor make them")
        m = self._merge
        out = []
        for t, h, w in torch.as_tensor(thw).tolist():
            rows, cols = h // m, w // m
            r = torch.arange(rows).repeat_interleave(cols).repeat(t)
            c = torch.arange(cols).repeat(rows * t)
            out.append(ImageTokens(torch.stack([torch.zeros_like(r), r, c], dim=1)))
        return out

    def num_image_tokens(self, height: int, width: int, processor: Any = None) -> int:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        ip = getattr(processor, "image_processor", processor)
        patch = int(getattr(ip, "patch_size", None) or self.config.vision_config.patch_size)
        merge = int(getattr(ip, "merge_size", None) or self._merge)
        size = getattr(ip, "size", None)
        lo, hi = size_field(size, "shortest_edge"), size_field(size, "longest_edge")
        h, w = smart_resize(height, width, factor=patch * merge, min_pixels=lo or DEFAULT_MIN_PIXELS,
                            max_pixels=hi or DEFAULT_MAX_PIXELS)
        return (h // patch) * (w // patch) // (merge * merge)

    def _type_ids(self, ids: torch.Tensor) -> torch.Tensor:
        c = self.config
        return (ids == c.image_token_id).int() + 2 * (ids == c.video_token_id).int()

    def complete_inputs(self, inputs: Any) -> Any:
        if inputs.get("mm_token_type_ids") is None:
            inputs["mm_token_type_ids"] = self._type_ids(self.input_ids(inputs))
        return inputs

    def model_kwargs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        kw = super().model_kwargs(inputs)
        if "mm_token_type_ids" not in kw and "input_ids" in kw:
            kw["mm_token_type_ids"] = self._type_ids(kw["input_ids"])
        return kw

    # ---- the family without a model (jsae.cost) -------------------------------------------------
    @classmethod
    def build_image_processor(cls, config: Any, settings: Mapping[str, Any]) -> Any:
        """``Qwen2VLImageProcessorPil``; patch, merge and temporal patch sizes from the config unless published."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        v, settings = config.vision_config, dict(settings)
        settings.setdefault("patch_size", v.patch_size)
        settings.setdefault("merge_size", v.spatial_merge_size)
        settings.setdefault("temporal_patch_size", v.temporal_patch_size)
        return Qwen2VLImageProcessorPil(**settings)

    @classmethod
    def build_processor(cls, config: Any, tokenizer: Any, image_processor: Any, settings: Mapping[str, Any],
                        chat_template: str | None) -> Any:
        """:class:`~jsae.adapters.qwen3_vl_processor.ToyQwen3VLProcessor`: ``Qwen3VLProcessor`` for images only (its
        video processor needs torchvision)."""
        from jsae.adapters.qwen3_vl_processor import ToyQwen3VLProcessor

        return ToyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)

    @classmethod
    def vision_cost(cls, config: Any, sizes: Sequence[tuple[int, int]], image_processor: Any, act: int) -> tuple[int, float]:
        """Dynamic resolution: an image's patches are its image tokens × merge², resized by the processor's pixel
        bounds (``smart_resize``), one sequence per image."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        v = config.vision_config
        n_v, d_v, f_v, m = int(v.depth), int(v.hidden_size), int(v.intermediate_size), int(v.spatial_merge_size)
        patch = int(getattr(image_processor, "patch_size", None) or v.patch_size)
        size = getattr(image_processor, "size", None)
        lo, hi = size_field(size, "shortest_edge") or DEFAULT_MIN_PIXELS, size_field(size, "longest_edge") or DEFAULT_MAX_PIXELS
        counts = []
        for h, w in sizes:
            hh, ww = smart_resize(h, w, factor=patch * m, min_pixels=lo, max_pixels=hi)
            counts.append((hh // patch) * (ww // patch))
        T = max(counts)
        mean_T = statistics.fmean(counts)
        per_token = 2 * (4 * d_v * d_v + 2 * d_v * f_v)
        flops = n_v * (per_token * mean_T + 4 * mean_T * mean_T * d_v)
        return act * T * (d_v * 6 + 2 * f_v), flops

    @classmethod
    def truncate_vision(cls, config: Any, n_layers: int) -> None:
        """``depth`` of the tower, with the DeepStack indexes kept inside it."""
        v = config.vision_config
        v.depth = n_layers
        v.deepstack_visual_indexes = [i for i in range(min(n_layers, len(v.deepstack_visual_indexes)))]


def size_field(size: Any, key: str) -> Any:
    """``size[key]`` of an image processor (a dict or a ``SizeDict``), None when absent."""
    if size is None:
        return None
    value = getattr(size, key, None)
    if value is None and isinstance(size, Mapping):
        value = size.get(key)
    return value


register_adapter(Qwen3VLAdapter)
