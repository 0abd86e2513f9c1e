"""jsae: Joint Sparse Autoencoders, VISTA and SAE steering for vision-language models.

``import jsae`` registers the ``"jsae"`` architecture in both SAELens registries and the jsae releases
with SAELens's ``SAE.from_pretrained`` (both idempotent); it has no other side effect.

Import jsae before nnsight: nnsight 0.8 mounts a ``.save`` method on every Python object at import, and
beartype (jsae's runtime shape checks) cannot be imported after that mount.  jsae itself never relies on
the mount (it calls ``nnsight.save``), so nnsight's ``APP.PYMOUNT: false`` setting works too.
"""

from __future__ import annotations

try:  # before anything can import nnsight (see the module docstring)
    import beartype as _beartype  # noqa: F401
except TypeError as _exc:  # pragma: no cover - depends on the user's import order
    raise ImportError(
        "import jsae before nnsight: nnsight's `.save` mount on every object breaks beartype's import "
        f"({_exc}); or set `APP: {{PYMOUNT: false}}` in nnsight's config (NNSIGHT_CONFIG) and use nnsight.save(x)"
    ) from None

from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY, register_sae_class, register_sae_training_class

from jsae import adapters, releases
from jsae.capture import capture_pairs
from jsae.interventions import (Ablate, Clamp, Intervention, Patches, ProjectOut, Splice, Steer, caption, generate,
                                intervene)
from jsae.labels import FeatureLabels, label_features
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


def run_protocol(out: str, cfg: object = None, **kwargs: object) -> dict:
    """The JSAE paper's protocol end to end (``jsae demo``): see :func:`jsae.protocol.run.run_protocol`."""
    from jsae.protocol.run import run_protocol as _run

    return _run(out, cfg, **kwargs)  # type: ignore[arg-type]


_LAZY = ("world", "protocol", "report", "data", "vista", "cli")


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
    "adapters", "releases", "run_protocol",
]
