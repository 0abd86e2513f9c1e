"""LLaVA-1.5 (``LlavaForConditionalGeneration``) and LLaVA-NeXT (``LlavaNextForConditionalGeneration``).

Image tokens are the positions where ``input_ids == config.image_token_id`` (``<image>``); the processor
expands each ``<image>`` in the prompt to one token per image feature.

* LLaVA-1.5: an image gives ``(H/patch) × (W/patch)`` patch tokens in row-major order (plus a leading CLS
  token, row/col -1, with ``vision_feature_select_strategy="full"``); region 0.
* LLaVA-NeXT: an image gives its base tile (``(image_size/patch)²`` tokens, region 0, row-major) followed
  by the high-resolution tiles stitched into one grid, cropped to the image's aspect ratio ("unpadded")
  and read row by row with one row-newline token at the end of each row (region 1; the newline token has
  col -1).  Coordinates of region 1 are in the cropped grid, so (0, 0) is the top-left of the picture.

Vision tower: ``model.model.vision_tower`` (a ``CLIPVisionModel``; in transformers 5 there is no
``.vision_model`` level).  Projector: ``model.model.multi_modal_projector``.  Patch features
(:meth:`LlavaAdapter.patch_features`, LLaVA-1.5 only): the CLIP hidden states the projector reads
(``vision_feature_layer``: the encoder's hidden state, as the model reads it) without the CLS token (SigLIP has none).
Plain layout (processor without chat template): ``"<image> caption"``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from jsae.guards import typechecked
from jsae.adapters.base import ImageTokens, VLMAdapter, register_adapter, unwrap


class LlavaAdapter(VLMAdapter):
    model_classes = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration")
    plain_layout = "<image> caption"
    sequential_layers = True  # LlamaModel / MistralModel: layer after layer, then norm and lm_head

    @property
    def is_next(self) -> bool:
        return hasattr(self.config, "image_grid_pinpoints")

    def generation_position_ids(self, attention_mask: Tensor) -> Tensor:
        """1-D text positions counted over the attended tokens (left padding at 0), as ``generate`` gives them."""
        pos = attention_mask.long().cumsum(-1) - 1
        return pos.masked_fill(attention_mask == 0, 0)

    @property
    def vision_tower(self) -> Any:
        return self.model.model.vision_tower

    @property
    def projector(self) -> Any:
        return self.model.model.multi_modal_projector

    @property
    def d_vision(self) -> int:
        layer = self.config.vision_feature_layer
        return int(self.config.vision_config.hidden_size) * (len(layer) if isinstance(layer, (list, tuple)) else 1)

    @typechecked
    def patch_features(self, inputs: Mapping[str, Any]) -> Float[Tensor, "n_images n_patches d_vision"]:
        """CLIP's features of every patch (CLS dropped) at ``vision_feature_layer`` (a list of layers is
        concatenated, as the model does), before the projector: ``[n_images, (H/patch)·(W/patch), d_vision]``."""
        if self.is_next:
            raise NotImplementedError("LLaVA-NeXT images are several tiles of patches, not one grid; "
                                      "run adapter.vision_tower on the tiles instead")
        pv = inputs.get("pixel_values")
        if pv is None or pv.dim() != 4:
            raise ValueError("LLaVA patch_features needs 'pixel_values' of shape [n_images, 3, H, W]; let the image processor make them")
        tower = unwrap(self.vision_tower)
        layer = self.config.vision_feature_layer
        # hidden_states, as the model reads them (DINOv2 / SigLIP's last_hidden_state is after a final norm)
        hidden = tower(pv, output_hidden_states=True).hidden_states
        out = torch.cat([hidden[i] for i in layer], dim=-1) if isinstance(layer, (list, tuple)) else hidden[layer]
        return out[:, int(self._encoder_has_cls):]

    @property
    def _tile_side(self) -> int:
        v = self.config.vision_config
        return int(v.image_size) // int(v.patch_size)

    @property
    def _encoder_has_cls(self) -> bool:
        """CLIP and DINOv2 put a CLS token before the patches; SigLIP does not."""
        return "siglip" not in str(getattr(self.config.vision_config, "model_type", ""))

    @property
    def _has_cls(self) -> bool:
        return self.config.vision_feature_select_strategy == "full" and self._encoder_has_cls

    # ---- image tokens ---------------------------------------------------------------------------
    def _grid(self, rows: int, cols: int, region: int = 0, newline: bool = False) -> Tensor:
        r = torch.arange(rows).repeat_interleave(cols + newline)
        c = torch.arange(cols + newline).repeat(rows)
        if newline:
            c = torch.where(c == cols, torch.full_like(c, -1), c)
        return torch.stack([torch.full_like(r, region), r, c], dim=1)

    def _next_hires_shape(self, height: int, width: int) -> tuple[int, int]:
        """(rows, cols) of the unpadded high-resolution grid of an image of ``height × width``."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

        side = self._tile_side
        tiles_h, tiles_w = get_anyres_image_grid_shape([height, width], self.config.image_grid_pinpoints,
                                                       self.config.vision_config.image_size)
        full = torch.empty(1, tiles_h * side, tiles_w * side, device="meta")
        rows, cols = unpad_image(full, [height, width]).shape[1:]
        return int(rows), int(cols)

    def _image_grid(self, height: int, width: int) -> Tensor:
        side = self._tile_side
        if not self.is_next:
            g = self._grid(height, width)  # here height/width are in patches
            if self._has_cls:
                g = torch.cat([torch.tensor([[0, -1, -1]]), g])
            return g
        rows, cols = self._next_hires_shape(height, width)
        return torch.cat([self._grid(side, side), self._grid(rows, cols, region=1, newline=True)])

    def image_tokens(self, inputs: Mapping[str, Any]) -> list[ImageTokens]:
        pv = inputs.get("pixel_values")
        if pv is None:
            return []
        if not self.is_next:
            if pv.dim() != 4:
                raise ValueError(f"LLaVA pixel_values must be [n_images, 3, H, W], got shape {list(pv.shape)}")
            p = int(self.config.vision_config.patch_size)
            g = self._image_grid(pv.shape[-2] // p, pv.shape[-1] // p)
            return [ImageTokens(g) for _ in range(pv.shape[0])]
        sizes = inputs.get("image_sizes")
        if sizes is None:
            raise ValueError("LLaVA-NeXT inputs need 'image_sizes' ([n_images, 2], height and width); let the processor make them")
        return [ImageTokens(self._image_grid(int(h), int(w))) for h, w in torch.as_tensor(sizes).tolist()]

    def num_image_tokens(self, height: int, width: int, processor: Any = None) -> int:
        if not self.is_next:
            return self._tile_side ** 2 + int(self._has_cls)
        return self._image_grid(height, width).shape[0]

    # ---- the family without a model (jsae.cost) -------------------------------------------------
    @staticmethod
    def _config_is_next(config: Any) -> bool:
        return hasattr(config, "image_grid_pinpoints")

    @classmethod
    def build_image_processor(cls, config: Any, settings: Mapping[str, Any]) -> Any:
        """``CLIPImageProcessorPil`` (LLaVA-1.5) or ``LlavaNextImageProcessorPil`` (with the config's pinpoints)."""
        settings = dict(settings)
        if cls._config_is_next(config):
            from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil as ip
            settings.setdefault("image_grid_pinpoints", config.image_grid_pinpoints)
        else:
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ip
        return ip(**settings)

    @classmethod
    def build_processor(cls, config: Any, tokenizer: Any, image_processor: Any, settings: Mapping[str, Any],
                        chat_template: str | None) -> Any:
        """``LlavaProcessor`` / ``LlavaNextProcessor``; patch size, feature strategy and extra image tokens from the
        published settings, else the config."""
        import transformers as T

        proc = T.LlavaNextProcessor if cls._config_is_next(config) else T.LlavaProcessor
        return proc(image_processor=image_processor, tokenizer=tokenizer,
                    patch_size=settings.get("patch_size", config.vision_config.patch_size),
                    vision_feature_select_strategy=settings.get("vision_feature_select_strategy",
                                                                config.vision_feature_select_strategy),
                    num_additional_image_tokens=settings.get("num_additional_image_tokens", 1), chat_template=chat_template)

    @classmethod
    def vision_cost(cls, config: Any, sizes: Sequence[tuple[int, int]], image_processor: Any, act: int) -> tuple[int, float]:
        """A fixed grid of ``(image_size / patch)² + 1`` tokens per tile; LLaVA-NeXT runs the base tile plus the
        largest pinpoint's tiles.  LLaVA keeps every hidden state of the tower (``n_v + 5`` widths per token)."""
        v = config.vision_config
        n_v, d_v, f_v = int(v.num_hidden_layers), int(v.hidden_size), int(v.intermediate_size)
        T = (int(v.image_size) // int(v.patch_size)) ** 2 + 1
        pins = getattr(config, "image_grid_pinpoints", None)  # LLaVA-NeXT: the base tile + the largest pinpoint's tiles
        tiles = 1 + max(h * w for h, w in pins) // (int(v.image_size) ** 2) if pins else 1
        per_token = 2 * (4 * d_v * d_v + 2 * d_v * f_v)
        flops = tiles * n_v * (per_token * T + 4 * T * T * d_v)
        return act * tiles * T * (d_v * (n_v + 5) + 2 * f_v), flops

    @classmethod
    def truncate_vision(cls, config: Any, n_layers: int) -> None:
        """``num_hidden_layers`` of the tower, with a non-negative ``vision_feature_layer`` kept inside it."""
        config.vision_config.num_hidden_layers = n_layers
        layer = config.vision_feature_layer
        if isinstance(layer, int) and layer >= 0:
            config.vision_feature_layer = min(layer, n_layers)


register_adapter(LlavaAdapter)
