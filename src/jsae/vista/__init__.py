"""VISTA: vision interpretability through a language model's own text SAE (see :mod:`jsae.vista.core`)."""

from jsae.vista.core import (VistaConfig, check_projector, check_text_sae, collect_text_states,
                             load_projector, load_text_sae, recon_error_on_images, reinit_projector, sae_recon_error,
                             save_projector, save_sae, train_projector, train_text_sae, vista_losses)

__all__ = [
    "VistaConfig", "check_projector", "check_text_sae", "collect_text_states", "load_projector",
    "load_text_sae", "recon_error_on_images", "reinit_projector", "sae_recon_error", "save_projector", "save_sae",
    "train_projector", "train_text_sae", "vista_losses",
]

from jsae.vista.experiment import RELEASE, EvalConfig, WorldVistaConfig, eval_world, train_world

__all__ += ["RELEASE", "EvalConfig", "WorldVistaConfig", "eval_world", "train_world"]
