"""Training recipes every caller shares: :func:`train_jsae_unit_norm` (the protocol's and the release
builder's JSAE recipe), :func:`train_saelens_topk` (a plain SAELens TopK SAE by SAELens's own trainer) and
the separate-SAE baseline below.

Separate SAEs, the baseline for the alignment claim: two separately trained SAEs, aligned after training.

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

import math
from dataclasses import replace
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from jsae.correlation import correlation_matrix
from jsae.saes.joint_sae import TrainingJointSAE, TrainingJointSAEConfig
from jsae.training.data import PairedTensorData
from jsae.training.trainer import JointSAETrainer, JointTrainerConfig

__all__ = ["hungarian_match", "match_separate_saes", "separate_config", "train_jsae_unit_norm", "train_saelens_topk",
           "train_separate_saes", "unit_norm_scale"]


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
        z_v, _ = sae.encode_decode(vision, "vision")
        z_t, _ = sae.encode_decode(text, "text")
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
    ``jsae.protocol.synthetic.evaluate_sae(sae, pairs, text_permutation=perm)``."""
    sae = JointSAETrainer.from_config(separate_config(sae_cfg), trainer_cfg, data).fit()
    perm, _ = match_separate_saes(sae, match_vision, match_text)
    return sae, perm


def unit_norm_scale(vision: Tensor, text: Tensor) -> float:
    """The factor that brings the mean norm of the pooled vectors to sqrt(d_in) (SAELens's convention, so an
    L1 coefficient means the same at every layer)."""
    return math.sqrt(vision.shape[1]) / float(torch.cat([vision, text]).norm(dim=-1).mean())


def train_jsae_unit_norm(sae_cfg: TrainingJointSAEConfig, trainer_cfg: JointTrainerConfig, vision: Tensor, text: Tensor,
                         batch_size: int) -> TrainingJointSAE:
    """Train a JSAE on ``(vision, text)`` scaled to mean norm sqrt(d_in), then fold the scale into the weights,
    so the returned SAE (in eval mode) takes raw activations.  Deterministic for ``trainer_cfg.seed``."""
    scale = unit_norm_scale(vision, text)
    data = PairedTensorData(vision * scale, text * scale, batch_size=min(batch_size, vision.shape[0]), seed=trainer_cfg.seed)
    sae = JointSAETrainer.from_config(sae_cfg, trainer_cfg, data).fit().eval()
    sae.fold_activation_norm_scaling_factor(scale)
    return sae


def train_saelens_topk(x: Tensor, d_sae: int, k: int, steps: int, batch_size: int, lr: float, seed: int = 0) -> Any:
    """A plain SAELens TopK SAE on in-memory activations ``x [N, d_in]``, trained by SAELens's own
    ``SAETrainer`` at mean norm sqrt(d_in) with the scale folded back (the result takes raw activations)."""
    from sae_lens import LoggingConfig, SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    if not 0 < batch_size <= x.shape[0]:
        raise ValueError(f"batch_size must be between 1 and the number of activations ({x.shape[0]}), got {batch_size}")
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k))
    scale = float(x.norm(dim=-1).mean()) / math.sqrt(x.shape[1])

    def provider() -> Iterator[Tensor]:
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0] - batch_size + 1, batch_size):
                yield x[perm[i:i + batch_size]] / scale

    cfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=lr,
                           lr_end=lr / 10, device="cpu", logger=LoggingConfig(log_to_wandb=False))
    trained = SAETrainer(cfg=cfg, sae=sae, data_provider=provider(), evaluator=None).fit()
    trained.fold_activation_norm_scaling_factor(float(1 / scale))
    return trained
