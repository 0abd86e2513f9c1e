"""jsae: Joint Sparse Autoencoders, VISTA and SAE steering for vision-language models.

``import jsae`` registers the ``"jsae"`` architecture in both SAELens registries and the jsae releases
with SAELens's ``SAE.from_pretrained`` (both idempotent); it has no other side effect.

jsae and nnsight import in either order: jsae's run-time shape checks are jaxtyping with jsae's own small
type checker (:func:`jsae.guards.check_types`), not beartype, which cannot be imported once nnsight has
mounted its ``.save`` method on every object.  jsae itself never relies on that mount (it calls
``nnsight.save``), so nnsight's ``APP.PYMOUNT: false`` setting works too.
"""

from __future__ import annotations

from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY, register_sae_class, register_sae_training_class

from jsae import adapters, releases
from jsae.capture import capture_pairs
from jsae.interventions import (Ablate, Clamp, Intervention, Patches, ProjectOut, Splice, Steer, caption, generate,
                                intervene)
from jsae.labels import FeatureLabels, label_features, load_labels
from jsae.saes import MODALITIES, JointSAE, JointSAEConfig, TrainingJointSAE, TrainingJointSAEConfig, get_alignment_loss
from jsae.training import JointSAETrainer, JointTrainerConfig, PairedActivations, PairedTensorData, load_pairs, train_jsae
from jsae.vlm import VLM, load_vlm

__version__ = "0.1.0"


def _register() -> None:
    if "jsae" not in SAE_CLASS_REGISTRY:
        register_sae_class("jsae", JointSAE, JointSAEConfig)
    if "jsae" not in SAE_TRAINING_CLASS_REGISTRY:
        register_sae_training_class("jsae", TrainingJointSAE, TrainingJointSAEConfig)
    releases.install()


_register()


def load_bridge(source: object, **kwargs: object) -> object:
    """TransformerLens users: an ``SAETransformerBridge`` on a VLM's weights, its processor and adapter attached
    (the VLM jsae reads through nnsight is left unchanged): see :func:`jsae.bridge.load_bridge`."""
    from jsae.bridge import load_bridge as _load

    return _load(source, **kwargs)  # type: ignore[arg-type]


def run_protocol(out: str, cfg: object = None, **kwargs: object) -> dict:
    """The JSAE paper's protocol end to end (``jsae demo``): see :func:`jsae.protocol.run.run_protocol`."""
    from jsae.protocol.run import run_protocol as _run

    return _run(out, cfg, **kwargs)  # type: ignore[arg-type]


_LAZY = ("world", "protocol", "report", "data", "vista", "cli", "bridge")


def __getattr__(name: str) -> object:
    """``jsae.world`` (and the other heavy subpackages) after a bare ``import jsae``, imported on first use."""
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"jsae.{name}")
    raise AttributeError(f"module 'jsae' has no attribute {name!r}")


__all__ = [
    "MODALITIES", "JointSAE", "JointSAEConfig", "TrainingJointSAE", "TrainingJointSAEConfig", "get_alignment_loss",
    "JointSAETrainer", "JointTrainerConfig", "PairedActivations", "PairedTensorData", "load_pairs", "train_jsae",
    "VLM", "load_vlm", "capture_pairs", "FeatureLabels", "label_features",
    "Ablate", "Clamp", "Intervention", "Patches", "ProjectOut", "Splice", "Steer", "caption", "generate", "intervene",
    "adapters", "releases", "run_protocol", "load_bridge", "load_labels",
]
