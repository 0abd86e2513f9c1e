"""The embedded world: procedural scenes with exact ground truth, a caption/QA grammar, datasets with
the same schema as real caption data, a word-level tokenizer, processors, and two toy VLMs of the real
transformers classes (``LlavaForConditionalGeneration``, ``Qwen3VLMoeForConditionalGeneration``)
trained on it and shipped in the package (load them with ``jsae.load_vlm(name)``)."""

from jsae.world.scenes import (CATEGORIES, COLORS, POSITIONS, SIZES, TYPES, TYPE_TO_CATEGORY, Scene, SceneObject,
                               WorldConfig, generate_scene)
from jsae.world.grammar import all_captions, caption, parse_caption, questions
from jsae.world.data import features, iter_world, load_caption_dataset, world_dataset, world_splits
from jsae.world.processors import ToyQwen3VLProcessor, build_llava_processor, build_qwen_processor, build_tokenizer
from jsae.world.models import MODEL_NAMES, build_config, build_model, load_toy_hf, model_dir, save_toy_vlm
from jsae.world.concepts import concept_presence, fluent, mentions, world_concepts

__all__ = [
    "CATEGORIES", "COLORS", "POSITIONS", "SIZES", "TYPES", "TYPE_TO_CATEGORY", "Scene", "SceneObject", "WorldConfig",
    "generate_scene", "all_captions", "caption", "parse_caption", "questions", "features", "iter_world",
    "load_caption_dataset", "world_dataset", "world_splits", "ToyQwen3VLProcessor", "build_llava_processor",
    "build_qwen_processor", "build_tokenizer", "MODEL_NAMES", "build_config", "build_model", "load_toy_hf",
    "model_dir", "save_toy_vlm", "concept_presence", "fluent", "mentions", "world_concepts",
]
