"""Training recipes every caller shares: :func:`unit_norm_scale` (the scale the default JSAE recipe,
:data:`jsae.protocol.methods.DEFAULT_RECIPE`, trains at), :func:`train_saelens_topk` (a plain SAELens TopK SAE
by SAELens's own trainer) and the separate-SAE baseline below.

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
from sae_lens.training.sae_trainer import SAETrainer
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from jsae.correlation import correlation_matrix
from jsae.saes.joint_sae import TrainingJointSAEConfig
from jsae.training.trainer import JointSAETrainer, JointTrainerConfig

__all__ = ["REFERENCE_BATCH_SIZE", "hungarian_match", "match_separate_saes", "reference_configs", "separate_config",
           "train_saelens_topk", "train_separate_saes", "unit_norm_scale"]

#: The reference's batch: 8 (image, caption) pairs.  A data choice, not a trainer option: pass it to the data,
#: e.g. ``PairedTensorData(vision, text, batch_size=REFERENCE_BATCH_SIZE)`` or ``load_pairs(..., batch_size=8)``.
REFERENCE_BATCH_SIZE = 8


def reference_configs(d_in: int, d_sae: int | None = None) -> tuple[TrainingJointSAEConfig, JointTrainerConfig]:
    """The JSAE reference code's training choices (``anonymous-lab25/anonymous-jsae``, ``src/train_jsae.py``)
    as ``(sae_cfg, trainer_cfg)`` for :class:`~jsae.training.JointSAETrainer`.

    SAE (:class:`TrainingJointSAEConfig`), reference value → option:

    * two ReLU SAEs ``Linear(d, 4d) → ReLU → Linear(4d, d)`` → ``activation="relu"``, ``d_sae = 4 · d_in``
      (unless ``d_sae`` is given), separate encoders and decoders;
    * loss ``1.0·½(MSE_v+MSE_t) + 0.03·½(mean|z_v|+mean|z_t|) + 1.0·(1 − mean cos(z_v, z_t))`` with element
      means → ``loss_reduction="mean"`` (the ½ is part of ``"mean"``), ``mse_coefficient=1.0``,
      ``l1_coefficient=0.03``, ``alignment="cosine"``, ``alignment_coefficient=1.0``, no warm-up of either
      coefficient, ``mse_normalization="none"``;
    * PyTorch's default ``nn.Linear`` init, biases on both layers → ``init="torch-linear"``;
    * no input centring (the encoder sees the raw input) → ``apply_b_dec_to_input=False``;
    * activations as captured → ``normalize_activations="none"``.

    Trainer (:class:`JointTrainerConfig`):

    * Adam, lr 1e-5, betas (0.9, 0.999), no weight decay → ``optimizer="adam"``, ``lr=1e-5``;
    * no decoder-norm constraint → ``normalize_decoder=False`` (no renormalisation, no gradient projection);
    * no gradient clipping → ``grad_clip_norm=None``;
    * 20 epochs → ``epochs=20`` (``epochs × len(data)`` steps);
    * ``ReduceLROnPlateau(mode="min", factor=0.3, patience=3, min_lr=1e-7)`` stepped on the epoch's mean
      loss → ``lr_scheduler="plateau"``, ``plateau_factor=0.3``, ``plateau_patience=3``,
      ``plateau_min_lr=1e-7`` (torch's default threshold 1e-4, relative, as in the reference);
    * the best epoch's weights are the result → ``keep_best_epoch=True``;
    * batch of 8 pairs → a data choice: build the data with ``batch_size=REFERENCE_BATCH_SIZE`` (8).

    Remaining differences: :class:`~jsae.training.PairedTensorData` drops a last partial batch (the
    reference's ``DataLoader`` keeps it) and uses fused Adam on CPU/GPU (the same update up to float
    rounding); the reference saves the best epoch to a file and returns the last, jsae returns the best.
    Change any choice with :func:`dataclasses.replace`.
    """
    if d_in <= 0:
        raise ValueError(f"d_in must be positive, got {d_in}")
    sae_cfg = TrainingJointSAEConfig(
        d_in=d_in, d_sae=4 * d_in if d_sae is None else d_sae, activation="relu", shared_encoder=False,
        shared_decoder=False, loss_reduction="mean", mse_coefficient=1.0, mse_normalization="none",
        l1_coefficient=0.03, l1_warm_up_steps=0, alignment="cosine", alignment_coefficient=1.0,
        alignment_warm_up_steps=0, init="torch-linear", apply_b_dec_to_input=False, normalize_activations="none")
    trainer_cfg = JointTrainerConfig(
        epochs=20, lr=1e-5, optimizer="adam", adam_beta1=0.9, adam_beta2=0.999, weight_decay=0.0,
        lr_scheduler="plateau", plateau_factor=0.3, plateau_patience=3, plateau_min_lr=1e-7, keep_best_epoch=True,
        grad_clip_norm=None, normalize_decoder=False)
    return sae_cfg, trainer_cfg


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


def train_saelens_topk(x: Tensor, d_sae: int, k: int, steps: int, batch_size: int, lr: float, seed: int = 0, *,
                       aux_loss_coefficient: float = 1.0, dead_feature_window: int = 1000,
                       log_every: int | None = None) -> Any:
    """A plain SAELens TopK SAE on in-memory activations ``x [N, d_in]``, trained by SAELens's own
    ``SAETrainer`` at mean norm sqrt(d_in) with the scale folded back (the result takes raw activations).

    Dead-latent revival is SAELens's own: the AuxK loss (``aux_loss_coefficient``, SAELens's default 1.0; 0
    turns it off) on the latents that have not fired for more than ``dead_feature_window`` steps (SAELens's
    default 1000; the JSAE trainer's window has the same meaning, counted from ``>=`` instead of ``>``).  The
    returned SAE carries ``training_history``: every ``log_every`` steps (default ``steps // 20``) the total
    loss and the dead-latent count, under the JSAE trainer's names, for the protocol's convergence check."""
    from sae_lens import LoggingConfig, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import SAETrainerConfig

    if not 0 < batch_size <= x.shape[0]:
        raise ValueError(f"batch_size must be between 1 and the number of activations ({x.shape[0]}), got {batch_size}")
    if not aux_loss_coefficient >= 0:
        raise ValueError(f"aux_loss_coefficient must be a number >= 0 (0: no AuxK), got {aux_loss_coefficient}")
    if isinstance(dead_feature_window, bool) or not isinstance(dead_feature_window, int) or dead_feature_window < 1:
        raise ValueError(f"dead_feature_window must be a whole number of steps >= 1, got {dead_feature_window!r}")
    torch.manual_seed(seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=d_sae, k=k, aux_loss_coefficient=aux_loss_coefficient))
    scale = float(x.norm(dim=-1).mean()) / math.sqrt(x.shape[1])

    def provider() -> Iterator[Tensor]:
        g = torch.Generator().manual_seed(seed)
        while True:
            perm = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0] - batch_size + 1, batch_size):
                yield x[perm[i:i + batch_size]] / scale

    cfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size, lr=lr,
                           lr_end=lr / 10, device="cpu", logger=LoggingConfig(log_to_wandb=False),
                           dead_feature_window=dead_feature_window)
    trainer = _RecordingSAETrainer(cfg=cfg, sae=sae, data_provider=provider(), evaluator=None)
    trainer.log_every = max(1, steps // 20) if log_every is None else log_every
    trained = trainer.fit()
    trained.fold_activation_norm_scaling_factor(float(1 / scale))
    trained.training_history = trainer.history
    return trained


class _RecordingSAETrainer(SAETrainer):  # type: ignore[misc]
    """SAELens's ``SAETrainer`` that keeps the loss and dead-latent count every ``log_every`` steps."""

    log_every = 10

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.history: list[dict[str, float]] = []

    def step(self, batch: Tensor) -> Any:  # SAELens's public per-step seam
        out = super().step(batch)
        n = self.n_training_steps + 1  # fit() advances n_training_steps after step()
        if n % self.log_every == 0 or self.n_training_samples >= self.cfg.total_training_samples:
            self.history.append({"losses/overall_loss": float(out.loss.detach()),
                                 "sparsity/dead_features_vision": float(self.dead_neurons.sum()),
                                 "details/n_training_steps": float(n)})
        return out
