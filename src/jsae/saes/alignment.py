"""Alignment losses between the codes of paired image / caption pools.

Each loss is one plain function ``(z_vision, z_text, *, temperature) -> scalar``; the registry maps the
name used in ``TrainingJointSAEConfig.alignment`` to the function.  Adding a loss is one function plus
one line in :data:`ALIGNMENT_LOSSES` (see CONTRIBUTING.md).

All losses are means over the pairs of the batch, so that gradient averaging across data-parallel
ranks gives the same result as one process with the global batch (``infonce`` is the exception: it is
contrastive over the local batch, as CLIP's "local loss").
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

AlignmentLoss = Callable[..., Tensor]


def cosine(z_vision: Float[Tensor, "b d_sae"], z_text: Float[Tensor, "b d_sae"], **_: float) -> Tensor:
    """The JSAE paper's loss: mean over pairs of ``1 - cos(z_v, z_t)``."""
    return (1.0 - F.cosine_similarity(z_vision, z_text, dim=-1, eps=1e-8)).mean()


def infonce(
    z_vision: Float[Tensor, "b d_sae"], z_text: Float[Tensor, "b d_sae"], *, temperature: float = 0.07, **_: float
) -> Tensor:
    """Symmetric InfoNCE over the batch: each image's code must pick out its own caption's and back."""
    v = F.normalize(z_vision, dim=-1, eps=1e-8)
    t = F.normalize(z_text, dim=-1, eps=1e-8)
    logits = v @ t.T / temperature
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def l2(z_vision: Float[Tensor, "b d_sae"], z_text: Float[Tensor, "b d_sae"], **_: float) -> Tensor:
    """Mean over pairs of the squared distance between the two codes."""
    return (z_vision - z_text).pow(2).sum(dim=-1).mean()


def none(z_vision: Float[Tensor, "b d_sae"], z_text: Float[Tensor, "b d_sae"], **_: float) -> Tensor:
    """No alignment: the ablation that trains the two branches independently."""
    return z_vision.new_zeros(())


ALIGNMENT_LOSSES: dict[str, AlignmentLoss] = {
    "cosine": cosine,
    "infonce": infonce,
    "l2": l2,
    "none": none,
}


def get_alignment_loss(name: str) -> AlignmentLoss:
    """Return the alignment loss called ``name``, or raise a one-line error that lists the known ones."""
    if name not in ALIGNMENT_LOSSES:
        raise ValueError(
            f"unknown alignment loss {name!r}; choose one of {sorted(ALIGNMENT_LOSSES)} "
            "or register yours in jsae.saes.alignment.ALIGNMENT_LOSSES"
        )
    return ALIGNMENT_LOSSES[name]
