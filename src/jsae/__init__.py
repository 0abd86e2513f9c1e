"""jsae: Joint Sparse Autoencoders, VISTA and SAE steering for vision-language models.

``import jsae`` registers the ``"jsae"`` architecture in both SAELens registries and hooks the jsae
releases into SAELens's pretrained-SAE directory (both idempotent).
"""

from __future__ import annotations

from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY, register_sae_class, register_sae_training_class

from jsae import releases
from jsae.alignment import ALIGNMENT_LOSSES, get_alignment_loss
from jsae.sae import MODALITIES, JointSAE, JointSAEConfig, TrainingJointSAE, TrainingJointSAEConfig

__version__ = "0.1.0"


def _register() -> None:
    if "jsae" not in SAE_CLASS_REGISTRY:
        register_sae_class("jsae", JointSAE, JointSAEConfig)
    if "jsae" not in SAE_TRAINING_CLASS_REGISTRY:
        register_sae_training_class("jsae", TrainingJointSAE, TrainingJointSAEConfig)
    releases.install()


_register()

__all__ = [
    "ALIGNMENT_LOSSES",
    "MODALITIES",
    "JointSAE",
    "JointSAEConfig",
    "TrainingJointSAE",
    "TrainingJointSAEConfig",
    "get_alignment_loss",
    "releases",
]
