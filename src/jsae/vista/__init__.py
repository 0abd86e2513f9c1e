"""VISTA: vision interpretability through a language model's own text SAE (see :mod:`jsae.vista.core`).

:func:`compose` builds the model VISTA trains — any transformers vision encoder + any causal LM + a new
projector, as a real ``LlavaForConditionalGeneration`` — and :func:`compose_toy` the world's one (the toy
text-only LM + the toy vision tower)."""

from jsae.vista.core import (LOSS_FORMS, VistaConfig, check_projector, check_text_sae, collect_text_states,
                             load_projector, load_text_sae, recon_error_on_images, reinit_projector, sae_recon_error,
                             save_projector, save_sae, train_projector, train_text_sae, vista_losses)
from jsae.vista.compose import compose, compose_toy
from jsae.vista.metrics import (label_from_top_examples, label_summary, labels_from_explanations,
                                load_neuronpedia_explanations)

__all__ = [
    "LOSS_FORMS", "VistaConfig", "check_projector", "check_text_sae", "collect_text_states", "compose", "compose_toy",
    "label_from_top_examples", "label_summary", "labels_from_explanations", "load_neuronpedia_explanations", "load_projector",
    "load_text_sae", "recon_error_on_images", "reinit_projector", "sae_recon_error", "save_projector", "save_sae",
    "train_projector", "train_text_sae", "vista_losses",
]

from jsae.vista.experiment import RELEASE, EvalConfig, WorldVistaConfig, eval_world, train_world

__all__ += ["RELEASE", "EvalConfig", "WorldVistaConfig", "eval_world", "train_world"]
