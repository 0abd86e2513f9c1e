"""VLM adapters (installed as ``jsae.adapters``): everything model-specific lives here.

``for_model(model)`` picks the adapter from the model's class (``adapter_class(model_class)`` gives the
class without a model instance); third-party adapters register through ``register_adapter`` or the
``jsae.adapters`` entry-point group (see :mod:`jsae.adapters.base`).
"""

from jsae.adapters.base import (
    ENTRY_POINT_GROUP,
    ImageTokens,
    VLMAdapter,
    adapter_class,
    bridge_hook_name,
    for_model,
    hook_names,
    is_tl_hook_name,
    last_position_mask,
    last_positions,
    layer_of_hook,
    mark_remote,
    padding_side,
    prepends_bos,
    register_adapter,
    sae_layer,
    saelens_hook_name,
    supported_models,
    unwrap,
)
from jsae.adapters.llava import LlavaAdapter
from jsae.adapters.qwen3_vl import Qwen3VLAdapter

__all__ = [
    "ENTRY_POINT_GROUP",
    "ImageTokens",
    "LlavaAdapter",
    "Qwen3VLAdapter",
    "VLMAdapter",
    "adapter_class",
    "bridge_hook_name",
    "for_model",
    "hook_names",
    "is_tl_hook_name",
    "last_position_mask",
    "last_positions",
    "layer_of_hook",
    "mark_remote",
    "padding_side",
    "prepends_bos",
    "register_adapter",
    "sae_layer",
    "saelens_hook_name",
    "supported_models",
    "unwrap",
]
