"""Baselines for the alignment claim: two separately trained SAEs, aligned after training.

arXiv 2606.29888 argues that a concept has different directions in the two modalities, so a fair
baseline for a JSAE is two *independent* per-modality SAEs whose latents are paired afterwards.  We
pair them as overcomplete's ``hungarian_matching`` pairs dictionaries, but on the codes, not the
directions (the directions of one concept differ by construction): the cost of pairing vision latent
``i`` with text latent ``j`` is minus the Pearson correlation of their codes over training pairs, and
``scipy.optimize.linear_sum_assignment`` finds the one-to-one pairing of maximal total correlation.

``train_separate_saes`` trains the two SAEs as the two branches of a ``TrainingJointSAE`` with
``alignment="none"`` and separate encoders and decoders: the objective is then the sum of two
single-modality SAE objectives with disjoint parameters, i.e. two independent SAEs (Adam is
per-parameter; the one coupling is the trainer's *global* gradient-norm clip, which
``JointTrainerConfig(grad_clip_norm=None)`` removes).  With the same config and seed this model is
bit-for-bit the ``jsae-none`` model, so a benchmark may reuse that model instead of training again.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from jsae.synthetic import correlation_matrix, encode_decode

__all__ = ["hungarian_match", "match_separate_saes", "separate_config", "train_separate_saes"]


def hungarian_match(z_vision: Tensor, z_text: Tensor) -> tuple[Tensor, Tensor]:
    """One-to-one pairing of vision latents with text latents maximising total code correlation.

    ``z_vision``, ``z_text``: codes of the same pairs, ``[N, d_sae]`` each.  Returns ``(perm, corr)``:
    ``perm[i]`` is the text latent paired with vision latent ``i`` and ``corr[i]`` the correlation of
    the pair (latents that never fire correlate 0 with everything and are paired arbitrarily).
    """
    if z_vision.shape != z_text.shape:
        raise ValueError(f"codes of both modalities need the same shape, got {tuple(z_vision.shape)} and {tuple(z_text.shape)}")
    c = correlation_matrix(z_vision, z_text).cpu().numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    perm = np.empty(c.shape[0], dtype=np.int64)
    perm[rows] = cols
    perm_t = torch.from_numpy(perm)
    return perm_t, torch.from_numpy(c[np.arange(c.shape[0]), perm])


@torch.no_grad()
def match_separate_saes(sae: Any, vision: Tensor, text: Tensor) -> tuple[Tensor, Tensor]:
    """Encode training pairs with each branch of ``sae`` and :func:`hungarian_match` the codes."""
    was_training = getattr(sae, "training", False)
    sae.eval()
    try:
        z_v, _ = encode_decode(sae, vision, "vision")
        z_t, _ = encode_decode(sae, text, "text")
    finally:
        sae.train(was_training)
    return hungarian_match(z_v, z_t)


def separate_config(sae_cfg: Any) -> Any:
    """``sae_cfg`` turned into two independent SAEs: separate encoders/decoders, no alignment loss."""
    return replace(sae_cfg, alignment="none", shared_encoder=False, shared_decoder=False)


def train_separate_saes(sae_cfg: Any, trainer_cfg: Any, data: Iterable[tuple[Tensor, Tensor]],
                        match_vision: Tensor, match_text: Tensor) -> tuple[Any, Tensor]:
    """Train two independent SAEs (see the module docstring) and pair their latents on
    ``(match_vision, match_text)``.  Returns ``(sae, perm)``; evaluate with
    ``jsae.synthetic.evaluate_sae(sae, pairs, text_permutation=perm)``."""
    from jsae.training import JointSAETrainer

    sae = JointSAETrainer.from_config(separate_config(sae_cfg), trainer_cfg, data).fit()
    perm, _ = match_separate_saes(sae, match_vision, match_text)
    return sae, perm
