"""jsae: Joint Sparse Autoencoders, VISTA and SAE steering for vision-language models.

``import jsae`` registers the ``"jsae"`` architecture in both SAELens registries and hooks the jsae
releases into SAELens's pretrained-SAE directory (both idempotent).
"""

from __future__ import annotations

import sys as _sys

if "nnsight" in _sys.modules and "beartype" not in _sys.modules:
    # nnsight mounts a ``.save`` method on every Python object at import, which breaks beartype's own
    # import; import beartype with that mount lifted so that ``import nnsight; import jsae`` works.
    import nnsight as _nnsight
    from nnsight._c import mount as _mount, unmount as _unmount

    _unmount("save")
    try:
        import beartype  # noqa: F401
    finally:
        _mount(_nnsight.save, "save")

from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY, register_sae_class, register_sae_training_class

from jsae import releases
from jsae.alignment import ALIGNMENT_LOSSES, get_alignment_loss
from jsae.sae import MODALITIES, JointSAE, JointSAEConfig, TrainingJointSAE, TrainingJointSAEConfig
from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData, train_jsae
from jsae import adapters
from jsae.vlm import VLM, load_vlm
from jsae.capture import PairedActivations, capture_pairs, load_pairs
from jsae.interventions import Ablate, Clamp, Intervention, Patches, Steer, generate, intervene

__version__ = "0.1.0"


def _register() -> None:
    if "jsae" not in SAE_CLASS_REGISTRY:
        register_sae_class("jsae", JointSAE, JointSAEConfig)
    if "jsae" not in SAE_TRAINING_CLASS_REGISTRY:
        register_sae_training_class("jsae", TrainingJointSAE, TrainingJointSAEConfig)
    releases.install()


_register()

__all__ = [
    "ALIGNMENT_LOSSES", "MODALITIES", "JointSAE", "JointSAEConfig", "TrainingJointSAE", "TrainingJointSAEConfig",
    "JointSAETrainer", "JointTrainerConfig", "PairedTensorData", "train_jsae", "get_alignment_loss", "releases",
    "adapters", "VLM", "load_vlm", "PairedActivations", "capture_pairs", "load_pairs",
    "Ablate", "Clamp", "Intervention", "Patches", "Steer", "generate", "intervene",
]
