"""The methods the protocol compares, trained on the same pairs with the same width, steps, batch and
learning rate at every swept layer:

- ``jsae``: JSAE with the cosine alignment loss (the paper);
- ``jsae-none``: the same with alignment ``none`` (the ablation that removes only the alignment loss);
- ``separate``: two separately trained SAEs aligned after training (Hungarian matching of codes;
  the ``jsae-none`` weights with the text latents permuted, see :mod:`jsae.training.recipes`);
- ``saelens-topk``: a plain SAELens TopK SAE trained on the vision pools only, by SAELens's ``SAETrainer``.

Two recipes for the JSAE methods (``jsae``, ``jsae-none`` and, through it, ``separate``):

- ``recipe="default"``: :data:`DEFAULT_RECIPE` (a :class:`JSAERecipe`: trained at mean norm sqrt(d_in) with the
  scale folded back, variance-normalised per-sample MSE, L1 0.03, unit-norm decoder rows, ``steps`` steps at
  ``lr`` with warm-up and decay, no gradient clipping, batch ``batch_size``) — the one default recipe of jsae,
  also used by ``jsae sae train`` and the release builder;
- ``recipe="reference"``: the JSAE reference code's choices, :func:`~jsae.training.recipes.reference_configs`
  (element-mean loss, PyTorch ``Linear`` init, no centring, no decoder-norm constraint, Adam 1e-5, 20 epochs of
  batches of :data:`~jsae.training.recipes.REFERENCE_BATCH_SIZE`, plateau scheduler, best epoch kept), with
  ``d_sae = 4 · d_in`` unless ``d_sae`` is given; ``reference`` overrides fields of its trainer config (e.g.
  ``{"epochs": 2}``; ``"batch_size"`` sets the data's batch).

Width: ``d_sae``, or ``expansion_factor`` × ``d_in`` (the paper: 4; give one of them).

Dead-latent revival (``revival=True``, the default) is each method's own ordinary option, on the same
schedule (:func:`revival_schedule`): a latent is dead after ``steps / 16`` steps without firing
(:data:`REVIVAL_WINDOW`, rounded); the JSAE methods of the default recipe (ReLU + L1) resample their dead
latents every ``steps / 8`` steps (:data:`REVIVAL_PERIOD`, the last time with a full period left; ``JointTrainerConfig.resample_every``, "Towards Monosemanticity"), the SAELens TopK
baseline trains them with SAELens's AuxK loss (coefficient 1.0).  ``revival=False`` turns both off (no
resampling, AuxK coefficient 0).  The reference recipe's JSAE methods never resample (the reference has no
revival).

The SAELens TopK baseline keeps its own recipe in both (``steps`` steps of ``batch_size`` at ``lr``, at the
same width): under ``recipe="reference"`` it is therefore *not* a matched budget with the JSAE methods (other
optimiser, steps and batch), only a matched width.

A new method is one more branch of :func:`train_methods` returning a :class:`Method` (its SAE, whether
it is joint) and its name in :data:`METHODS`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch
from torch import Tensor

from jsae.saes.joint_sae import JointSAE, TrainingJointSAEConfig
from jsae.training import JointTrainerConfig
from jsae.training.data import PairedTensorData
from jsae.training.recipes import (REFERENCE_BATCH_SIZE, match_separate_saes, reference_configs, train_saelens_topk,
                                   unit_norm_scale)
from jsae.report.rundir import METHOD_INFO
from jsae.saes.metrics import summed_unit_rows

#: The methods' names, from the one registry :data:`jsae.report.rundir.METHOD_INFO` (report order).
METHODS = tuple(METHOD_INFO)
RECIPES = ("default", "reference")
#: With revival, a latent is dead after this fraction of the training steps without firing ...
REVIVAL_WINDOW = 1 / 16
#: ... and the JSAE methods resample their dead latents after every this fraction of the steps.
REVIVAL_PERIOD = 1 / 8


@dataclass(frozen=True)
class JSAERecipe:
    """jsae's default JSAE recipe, in one place: the protocol's JSAE methods, the release builder
    (:mod:`jsae.releases.build`) and ``jsae sae train --preset default`` all train with it.

    The pairs are scaled to mean norm sqrt(d_in) for training (SAELens's convention, so ``l1_coefficient`` means the
    same at every layer and model) and the scale is folded back into the weights, so the SAE takes raw
    activations; variance-normalised per-sample MSE; Adam at ``lr`` with a linear warm-up over the first
    ``1/warm_up_divisor`` of the steps and a linear decay over the last ``1/decay_divisor``; unit-norm decoder rows
    (the trainer's default); no gradient clipping (as the reference code).  Every committed result and shipped
    release was trained with these values (lr 3e-3).  The reference code's own recipe is
    :func:`jsae.training.recipes.reference_configs` (``--preset reference``)."""

    lr: float = 3e-3
    warm_up_divisor: int = 20
    decay_divisor: int = 5
    grad_clip_norm: float | None = None
    mse_normalization: str = "variance"
    l1_coefficient: float = 0.03

    def sae_config(self, d_in: int, d_sae: int, **fields: Any) -> TrainingJointSAEConfig:
        """The SAE's config (``fields`` override or add any :class:`TrainingJointSAEConfig` field)."""
        return TrainingJointSAEConfig(d_in=d_in, d_sae=d_sae, **{"mse_normalization": self.mse_normalization,
                                                                  "l1_coefficient": self.l1_coefficient, **fields})

    def trainer_config(self, steps: int, lr: float | None = None, **fields: Any) -> JointTrainerConfig:
        """The trainer's config for ``steps`` steps (``lr``: the recipe's when None; ``fields``: any other
        :class:`JointTrainerConfig` field)."""
        return JointTrainerConfig(total_steps=steps, lr=self.lr if lr is None else lr,
                                  lr_warm_up_steps=steps // self.warm_up_divisor,
                                  lr_decay_steps=steps // self.decay_divisor,
                                  **{"grad_clip_norm": self.grad_clip_norm, **fields})

    def fit(self, sae_cfg: TrainingJointSAEConfig, trainer_cfg: JointTrainerConfig, data: PairedTensorData, *,
            allow_provenance_mismatch: bool = False) -> Any:
        """Train on ``data`` (in-memory pairs, e.g. :func:`jsae.training.load_pairs`'s) scaled to mean norm
        sqrt(d_in), then fold the scale into the weights: the returned SAE (eval mode, with its
        ``training_history``) takes raw activations.  Deterministic for ``trainer_cfg.seed``."""
        from jsae.training import JointSAETrainer

        scale = unit_norm_scale(data.vision, data.text)
        scaled = copy.copy(data)
        scaled.vision, scaled.text = data.vision * scale, data.text * scale
        trainer = JointSAETrainer.from_config(sae_cfg, trainer_cfg, scaled)
        sae = trainer.fit(allow_provenance_mismatch=allow_provenance_mismatch).eval()
        sae.fold_activation_norm_scaling_factor(scale)
        sae.training_history = list(trainer.history)  # logged losses, for convergence checks
        return sae


#: The default JSAE recipe (see :class:`JSAERecipe`).
DEFAULT_RECIPE = JSAERecipe()


def resolve_d_sae(d_in: int, d_sae: int | None, expansion_factor: int | None) -> int | None:
    """The width from ``d_sae`` or ``expansion_factor × d_in`` (None when neither is given)."""
    if expansion_factor is None:
        return d_sae
    if d_sae is not None:
        raise ValueError(f"give d_sae ({d_sae}) or expansion_factor ({expansion_factor}), not both")
    if isinstance(expansion_factor, bool) or not isinstance(expansion_factor, int) or expansion_factor < 1:
        raise ValueError(f"expansion_factor must be a whole number >= 1 (d_sae = expansion_factor x d_in; the paper: 4), "
                         f"got {expansion_factor!r}")
    return expansion_factor * d_in


def revival_schedule(steps: int) -> tuple[int, int]:
    """``(dead_feature_window, resample_every)`` for a run of ``steps`` steps with revival."""
    return max(1, round(steps * REVIVAL_WINDOW)), max(1, round(steps * REVIVAL_PERIOD))


@dataclass
class Method:
    """One SAE of one method at one layer, with how to read and edit it."""

    name: str
    sae: Any  # a JointSAE, or a SAELens SAE for the vision-only baseline
    joint: bool

    def codes(self, x: Tensor, modality: str) -> Tensor:
        with torch.no_grad():
            if self.joint:
                return self.sae.encode(x, modality)
            return self.sae.encode(x)

    def steer_direction(self, features: list[int], decoder: str = "text") -> Tensor:
        """Σ of the features' unit decoder rows: a joint SAE's ``decoder`` branch ("text", the paper's choice, or
        "vision"); a single-modality SAE's only decoder."""
        return summed_unit_rows(self.sae.W_dec_of(decoder) if self.joint else self.sae.W_dec, features)


def permute_text_branch(sae: JointSAE, text_order: Tensor) -> JointSAE:
    """A copy of ``sae`` whose text latent ``i`` is the original text latent ``text_order[i]``."""
    import copy

    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.text.W_enc.copy_(sae.text.W_enc[:, text_order])
        out.text.b_enc.copy_(sae.text.b_enc[text_order])
        out.text.W_dec.copy_(sae.text.W_dec[text_order])
    return out


def train_methods(vision: Tensor, text: Tensor, *, layer: int, d_sae: int | None, steps: int, batch_size: int, lr: float,
                  seed: int, methods: Sequence[str], metadata: dict[str, Any], k: int = 16, recipe: str = "default",
                  reference: dict[str, Any] | None = None, expansion_factor: int | None = None,
                  revival: bool = True) -> dict[str, Method]:
    """Train every method on the same pairs at the same width (``d_sae``, or ``expansion_factor × d_in``): with
    ``recipe="default"`` all with the same steps, batch and learning rate; with ``recipe="reference"`` the JSAE
    methods by the reference's configs (``reference`` overrides their trainer fields; no width given: ``4 · d_in``)
    and the TopK baseline by its own recipe (``steps``, ``batch_size``, ``lr``); ``revival``: each method's own
    dead-latent revival on one schedule.  See the module docstring."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {list(RECIPES)}")
    d_sae = resolve_d_sae(vision.shape[1], d_sae, expansion_factor)
    if recipe == "reference":
        return _train_reference(vision, text, layer=layer, d_sae=d_sae, steps=steps, batch_size=batch_size, lr=lr,
                                seed=seed, methods=methods, metadata=metadata, k=k, reference=reference or {},
                                revival=revival)
    if d_sae is None:
        raise ValueError("d_sae or expansion_factor is required by the default recipe (only the reference recipe "
                         "defaults the width to 4 * d_in)")
    out: dict[str, Method] = {}
    window, period = revival_schedule(steps)
    tcfg = DEFAULT_RECIPE.trainer_config(steps, lr, seed=seed, progress=False, log_every=max(steps // 20, 1),
                                         **({"dead_feature_window": window, "resample_every": period} if revival else {}))
    data = PairedTensorData(vision, text, batch_size=min(batch_size, vision.shape[0]), seed=seed)
    for name in [m for m in ("jsae", "jsae-none") if m in methods or (m == "jsae-none" and "separate" in methods)]:
        cfg = DEFAULT_RECIPE.sae_config(vision.shape[1], d_sae, alignment="cosine" if name == "jsae" else "none")
        for key, value in {**metadata, "layer": layer}.items():
            cfg.metadata[key] = value
        out[name] = Method(name, DEFAULT_RECIPE.fit(cfg, tcfg, data), True)
    if "separate" in methods:
        text_order, _ = match_separate_saes(out["jsae-none"].sae, vision, text)
        out["separate"] = Method("separate", permute_text_branch(out["jsae-none"].sae, text_order), True)
    if "saelens-topk" in methods:
        out["saelens-topk"] = Method("saelens-topk", _train_saelens_topk(vision, d_sae, k, steps, batch_size, lr, seed,
                                                                         revival), False)
    return {m: out[m] for m in methods}


def _train_reference(vision: Tensor, text: Tensor, *, layer: int, d_sae: int | None, steps: int, batch_size: int,
                     lr: float, seed: int, methods: Sequence[str], metadata: dict[str, Any], k: int,
                     reference: dict[str, Any], revival: bool) -> dict[str, Method]:
    """``train_methods(..., recipe="reference")``: the JSAE methods on the raw pools by :func:`reference_configs`."""
    from jsae.training import JointSAETrainer

    reference = dict(reference)
    ref_batch = int(reference.pop("batch_size", REFERENCE_BATCH_SIZE))
    sae_cfg, tcfg = reference_configs(vision.shape[1], d_sae)
    tcfg = replace(tcfg, seed=seed, progress=False, **reference)
    out: dict[str, Method] = {}
    for name in [m for m in ("jsae", "jsae-none") if m in methods or (m == "jsae-none" and "separate" in methods)]:
        cfg = replace(sae_cfg, alignment="cosine" if name == "jsae" else "none", metadata=copy.deepcopy(sae_cfg.metadata))
        for key, value in {**metadata, "layer": layer}.items():
            cfg.metadata[key] = value
        data = PairedTensorData(vision, text, batch_size=min(ref_batch, vision.shape[0]), seed=seed)
        out[name] = Method(name, JointSAETrainer.from_config(cfg, tcfg, data).fit().eval(), True)
    if "separate" in methods:
        text_order, _ = match_separate_saes(out["jsae-none"].sae, vision, text)
        out["separate"] = Method("separate", permute_text_branch(out["jsae-none"].sae, text_order), True)
    if "saelens-topk" in methods:  # its own recipe at the same width: see the module docstring
        out["saelens-topk"] = Method("saelens-topk", _train_saelens_topk(vision, sae_cfg.d_sae, k, steps, batch_size, lr,
                                                                         seed, revival), False)
    return {m: out[m] for m in methods}


def _train_saelens_topk(vision: Tensor, d_sae: int, k: int, steps: int, batch_size: int, lr: float, seed: int,
                        revival: bool) -> Any:
    """The vision-only baseline: a plain SAELens TopK SAE on the vision pools (SAELens's ``SAETrainer``), with
    AuxK on the revival schedule, or none."""
    window, _ = revival_schedule(steps)
    return train_saelens_topk(vision, d_sae, k, steps, min(batch_size, vision.shape[0]), lr, seed,
                              aux_loss_coefficient=1.0 if revival else 0.0,
                              dead_feature_window=window if revival else 1000,
                              log_every=max(steps // 20, 1)).eval()


__all__ = ["DEFAULT_RECIPE", "METHODS", "RECIPES", "JSAERecipe", "REVIVAL_PERIOD", "REVIVAL_WINDOW", "Method", "permute_text_branch", "resolve_d_sae",
           "revival_schedule", "train_methods"]
