"""Training a JSAE on paired (vision, text) batches.

``JointSAETrainer(sae, cfg, data).fit()`` trains on any iterable of ``(vision [B, d_in], text [B, d_in])``
tuples.  It does Adam/AdamW with warm-up and linear decay, gradient clipping, unit-norm decoder rows,
dead-latent tracking (which feeds the TopK auxiliary loss) and resampling, atomic checkpoints every N steps and
**exact resume**: weights, optimiser, RNG and data position are restored, so a run killed with SIGKILL
and resumed ends with the same weights as one that was never interrupted.

Epochs (the reference protocol's way, all options): ``epochs`` trains ``epochs × steps_per_epoch`` steps
(``steps_per_epoch`` defaults to ``len(data)``); ``lr_scheduler="plateau"`` is PyTorch's
``ReduceLROnPlateau`` stepped once per epoch on the epoch's mean loss; ``keep_best_epoch`` restores, at
the end, the weights of the epoch with the lowest mean loss.  An epoch's mean loss is the mean of the
steps' total losses over that epoch (averaged over ranks under data parallelism); only complete epochs
count.  The scheduler state, the epoch losses, the running sum of the current epoch and the best weights
are part of every checkpoint, so resume stays exact.

Data position: if ``data`` has ``batches(start)`` (yielding the batches from global index ``start`` on,
across epochs, as :class:`PairedTensorData` and the capture reader do) it is used; otherwise the trainer
re-iterates ``data`` once per epoch and skips the batches already consumed.

Dead latents: a latent that has not fired for ``dead_feature_window`` steps is dead.  A TopK JSAE trains them
with SAELens's AuxK loss (``TrainingJointSAEConfig.aux_loss_coefficient``).  ``resample_every=N`` (any
activation; meant for ReLU + L1, which has no auxiliary loss) resamples them as Anthropic's "Towards
Monosemanticity" does, after every N-th step that is followed by at least N more steps (so every resampled
latent gets a full period of training), in both branches:

* the candidate inputs are the step's global batch and, when the data has ``batches(start)``, the next
  ``resample_batches - 1`` batches (the same on every rank, so data parallelism stays exact);
* each dead latent draws one input with probability proportional to the square of its reconstruction loss
  ``||x - x̂||²`` in that modality (distinct inputs while the pool allows; a generator seeded by
  ``(seed, step)``, so no RNG state is consumed);
* its decoder row becomes that input minus the candidates' mean, at unit norm (the alive rows' mean norm
  when ``normalize_decoder`` is off); its encoder column the same direction at ``resample_encoder_scale``
  (0.2) × the mean norm of the alive latents' encoder columns; its ``b_enc`` puts the zero of its
  pre-activation at the candidates' mean.  TM sets ``b_enc = 0`` with an encoder input centred by a
  ``b_dec`` started at the data's geometric median; ours starts at 0, and while ``b_dec`` is still far from
  the mean an uncentred direction would make every resampled latent fire on every input along the mean
  (measured: the explained variance fell below 0 after each resampling on offset synthetic data);
* the Adam moments of every changed row, column and bias entry are reset to zero, and the latent's
  firing counter restarts.

With a shared encoder or decoder only latents dead in both branches are resampled, all from one input drawn
from both modalities' candidates.  ``trainer.resampled`` lists ``{"step", "vision", "text"}`` (latents
resampled per branch) and is part of every checkpoint; resampling depends only on checkpointed state, so
resume stays exact.

Data parallel: under ``torchrun`` (``torch.distributed`` initialised, gloo on CPU is enough) every rank
reads the same global batch and trains on its slice; gradients and dead-latent statistics are averaged
across ranks, so the run matches one process with the same global batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from jsae.saes.joint_sae import MODALITIES, TrainingJointSAE, TrainingJointSAEConfig
from jsae.saes.sparse_relu import ThreadPick, one_thread
from jsae.files import replace_dir, write_json, writing
from jsae.training.data import check_paired_batch
from jsae.saes.metrics import explained_variance

LATEST = "latest.json"


@dataclass
class JointTrainerConfig:
    """Optimisation and bookkeeping of a JSAE run (the SAE's own losses live in its config).

    Give ``total_steps`` or ``epochs`` (``epochs × steps_per_epoch`` steps, ``steps_per_epoch`` defaulting to
    ``len(data)``).  ``lr_scheduler="plateau"`` (torch's ``ReduceLROnPlateau(plateau_factor, plateau_patience,
    plateau_min_lr)`` on each epoch's mean loss) and ``keep_best_epoch`` work in epochs too; see the module
    docstring.  :func:`jsae.training.recipes.reference_configs` sets them as the JSAE reference code does."""

    total_steps: int | None = None  # or give epochs
    lr: float = 3e-4
    lr_warm_up_steps: int = 0
    lr_decay_steps: int = 0  # linear decay to lr_end over the last lr_decay_steps steps
    lr_end: float | None = None  # default lr / 10
    # "warmup-decay": the schedule above, per step; "plateau": torch's ReduceLROnPlateau on each epoch's mean loss
    lr_scheduler: Literal["warmup-decay", "plateau"] = "warmup-decay"
    plateau_factor: float = 0.1  # ReduceLROnPlateau(factor, patience, min_lr); these are torch's defaults
    plateau_patience: int = 10
    plateau_min_lr: float = 0.0
    epochs: int | None = None  # train epochs × steps_per_epoch steps instead of total_steps
    steps_per_epoch: int | None = None  # default len(data); needed when data has no len()
    keep_best_epoch: bool = False  # at the end, restore the weights of the epoch with the lowest mean loss
    optimizer: Literal["adam", "adamw"] = "adam"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    grad_clip_norm: float | None = 1.0
    normalize_decoder: bool = True  # unit-norm decoder rows (gradient's parallel part removed)
    dead_feature_window: int = 1000  # steps without firing after which a latent counts as dead
    resample_every: int = 0  # resample dead latents every N steps ("Towards Monosemanticity"); 0: off
    resample_batches: int = 8  # batches of candidate inputs for resampling (the step's and the next ones)
    resample_encoder_scale: float = 0.2  # a resampled encoder column's norm / the alive columns' mean norm
    mse_norm_batches: int = 4  # batches used to estimate input variance (mse_normalization="variance")
    checkpoint_every: int = 0  # 0: only the final checkpoint
    checkpoint_dir: str | None = None
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    log_to_wandb: bool = False
    wandb_project: str = "jsae"
    wandb_run_name: str | None = None

    def __post_init__(self) -> None:
        if self.total_steps is None and self.epochs is None:
            raise ValueError("give total_steps or epochs (e.g. JointTrainerConfig(total_steps=1000))")
        if self.total_steps is not None and self.epochs is not None:
            raise ValueError(f"give total_steps or epochs, not both (got total_steps={self.total_steps}, "
                             f"epochs={self.epochs}); drop one")
        if self.total_steps is not None and self.total_steps <= 0:
            raise ValueError(f"total_steps must be positive, got {self.total_steps}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")
        if self.steps_per_epoch is not None and self.steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive (or None for len(data)), got {self.steps_per_epoch}")
        if self.lr_scheduler not in ("warmup-decay", "plateau"):
            raise ValueError(f"unknown lr_scheduler {self.lr_scheduler!r}; choose 'warmup-decay' or 'plateau'")
        if self.lr_scheduler == "plateau" and (self.lr_warm_up_steps or self.lr_decay_steps):
            raise ValueError("lr_warm_up_steps and lr_decay_steps belong to lr_scheduler='warmup-decay'; "
                             "set them to 0 with lr_scheduler='plateau'")
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"plateau_factor must be between 0 and 1 (exclusive), got {self.plateau_factor}")
        if self.plateau_patience < 0:
            raise ValueError(f"plateau_patience must be >= 0 epochs, got {self.plateau_patience}")
        if not 0 <= self.plateau_min_lr < math.inf:
            raise ValueError(f"plateau_min_lr must be a finite number >= 0, got {self.plateau_min_lr}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose 'adam' or 'adamw'")
        if self.total_steps is not None and self.lr_warm_up_steps + self.lr_decay_steps > self.total_steps:
            raise ValueError("lr_warm_up_steps + lr_decay_steps exceeds total_steps; shorten them")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("checkpoint_every needs a checkpoint_dir")
        for name in ("log_every", "keep_checkpoints", "mse_norm_batches", "dead_feature_window", "resample_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
        if isinstance(self.resample_every, bool) or not isinstance(self.resample_every, int) or self.resample_every < 0:
            raise ValueError(f"resample_every must be a whole number of steps >= 0 (0: no resampling), got {self.resample_every!r}")
        if not (self.resample_encoder_scale > 0 and math.isfinite(self.resample_encoder_scale)):
            raise ValueError(f"resample_encoder_scale must be a positive finite number, got {self.resample_encoder_scale}")
        if isinstance(self.checkpoint_every, bool) or not isinstance(self.checkpoint_every, int) or self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be a whole number >= 0 (0: only the final checkpoint), got {self.checkpoint_every!r}")
        if self.grad_clip_norm is not None and not (self.grad_clip_norm > 0 and math.isfinite(self.grad_clip_norm)):
            raise ValueError(f"grad_clip_norm must be a positive finite number or None, got {self.grad_clip_norm}")
        from jsae.guards import check_device

        check_device(self.device, "JointTrainerConfig.device")

    @property
    def uses_epochs(self) -> bool:
        """Whether the run needs epoch boundaries (epochs, the plateau scheduler or best-epoch selection)."""
        return self.epochs is not None or self.lr_scheduler == "plateau" or self.keep_best_epoch


# trainer options added after the first trained results: left out of checkpoint fingerprints while at their
# default, so checkpoints written before them stay resumable
_OPTIONAL_DEFAULTS: dict[str, Any] = {"lr_scheduler": "warmup-decay", "plateau_factor": 0.1, "plateau_patience": 10,
                                      "plateau_min_lr": 0.0, "epochs": None, "steps_per_epoch": None,
                                      "keep_best_epoch": False, "resample_every": 0, "resample_batches": 8,
                                      "resample_encoder_scale": 0.2}


def _stream(data: Iterable[tuple[Tensor, Tensor]], start: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless stream of batches from global index ``start`` (epoch after epoch)."""
    position = to_skip = start
    while True:
        if hasattr(data, "batches"):
            source, to_skip = data.batches(position), 0  # type: ignore[attr-defined]
        else:
            source = data
        produced = 0
        for batch in source:
            produced += 1
            if to_skip:
                to_skip -= 1
                continue
            position += 1
            yield batch
        if produced == 0:
            raise ValueError("the training data yielded no batches; check that the dataset is not empty")


def _flush_denormal_enabled() -> bool:
    """Whether the CPU flushes denormal floats now (torch has a setter only): a denormal product reads 0."""
    return bool((torch.tensor([1e-39], dtype=torch.float32) * 1.0)[0] == 0)


def _distributed(device: str) -> tuple[int, int]:
    """(rank, world size); under ``torchrun`` the process group is started here if the caller did not."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if str(device).startswith("cuda") else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _draw(weights: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` indices drawn with probability proportional to ``weights``: distinct ones while there are enough
    inputs of positive weight (a small candidate pool would otherwise hand one outlier to many latents)."""
    distinct = n <= int((weights > 0).sum())
    return torch.multinomial(weights, n, replacement=not distinct, generator=generator)


class TrainingDiverged(ValueError):
    """The loss or the weights became NaN/inf; the last good checkpoint is kept."""


def _tidy_checkpoints(root: Path) -> None:
    """Under the directory's lock: finish a re-save a kill interrupted (``latest.json`` names a folder moved
    aside as ``.step-N.old-*``), then delete temporaries of killed writes."""
    try:
        name = json.loads((root / LATEST).read_text())["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):
        name = None
    if name and not (root / name).is_dir():
        olds = sorted(root.glob(f".{name}.old-*"))
        if olds:
            os.replace(olds[-1], root / name)
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".step-*.old-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".{LATEST}.tmp-*"):
        stale.unlink(missing_ok=True)


def data_fingerprint(data: Any) -> dict[str, Any] | None:
    """What identifies the training data for a checkpoint: ``data.provenance`` when the data defines it, else
    for in-memory paired tensors a hash of their bytes with the batching settings; None when unknown."""
    own = getattr(data, "provenance", None)
    if own is not None:
        return dict(own() if callable(own) else own)
    vision, text = getattr(data, "vision", None), getattr(data, "text", None)
    if not (isinstance(vision, Tensor) and isinstance(text, Tensor)):
        return None
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for x in (vision, text):
        x = x.detach().cpu().contiguous()
        h.update(f"{x.dtype}{tuple(x.shape)}".encode())
        h.update(x.view(torch.uint8).numpy().tobytes() if x.numel() else b"")
    return {"sha": h.hexdigest(), "batch_size": getattr(data, "batch_size", None), "shuffle": getattr(data, "shuffle", None),
            "seed": getattr(data, "seed", None)}


class JointSAETrainer:
    """Trains a :class:`TrainingJointSAE` on paired batches.  See the module docstring."""

    def __init__(self, sae: TrainingJointSAE, cfg: JointTrainerConfig, data: Iterable[tuple[Tensor, Tensor]]):
        if not isinstance(sae, TrainingJointSAE):
            raise TypeError(f"JointSAETrainer trains a TrainingJointSAE, got {type(sae).__name__}")
        self.sae, self.cfg, self.data = sae.to(cfg.device), cfg, data
        self.rank, self.world_size = _distributed(cfg.device)
        params = list(dict.fromkeys(sae.parameters()))
        if self.world_size > 1:  # every rank starts from rank 0's weights
            with torch.no_grad():
                for p in params:
                    dist.broadcast(p.data, src=0)
        opt_cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        # fused: one kernel per step instead of ~10 foreach passes over every parameter (8.4M params:
        # 64 ms vs 256 ms on this CPU); same update up to float rounding
        fused = torch.device(cfg.device).type in ("cpu", "cuda")
        self.optimizer = opt_cls(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay,
                                 fused=fused)
        self.epoch_length, self.total_steps = self._resolve_steps()
        self.scheduler: Any
        if cfg.lr_scheduler == "plateau":
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience,
                min_lr=cfg.plateau_min_lr)
        else:
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        # epoch bookkeeping (only when cfg.uses_epochs): complete epochs' mean losses, the running loss sum of
        # the current epoch, and the best epoch's index, loss and weights (keep_best_epoch)
        self.epoch_losses: list[float] = []
        self._epoch_loss_sum = torch.zeros((), dtype=torch.float64, device=cfg.device)
        self.best_epoch: int | None = None
        self.best_loss = math.inf
        self.best_state: dict[str, Tensor] | None = None
        self.steps_since_fired = torch.zeros(len(MODALITIES), sae.cfg.d_sae, dtype=torch.long, device=cfg.device)
        # the optimiser step and decoder housekeeping run on the thread count this machine runs them faster on
        self._housekeeping = ThreadPick()
        self.history: list[dict[str, float]] = []
        self.resampled: list[dict[str, int]] = []  # resample_every: latents resampled per branch, per resampling
        self._wandb: Any = None

    @classmethod
    def from_config(cls, sae_cfg: TrainingJointSAEConfig, cfg: JointTrainerConfig,
                    data: Iterable[tuple[Tensor, Tensor]]) -> "JointSAETrainer":
        """Build the SAE under ``cfg.seed`` (so a run is deterministic for a seed) and its trainer."""
        torch.manual_seed(cfg.seed)
        return cls(TrainingJointSAE(sae_cfg), cfg, data)

    def _resolve_steps(self) -> tuple[int | None, int]:
        """(steps per epoch or None when the run needs no epochs, total steps)."""
        c, epoch_length = self.cfg, None
        if c.uses_epochs:
            epoch_length = c.steps_per_epoch
            if epoch_length is None:
                try:
                    epoch_length = len(self.data)  # type: ignore[arg-type]
                except TypeError:
                    raise ValueError(f"epochs, lr_scheduler='plateau' and keep_best_epoch need the epoch length, but the "
                                     f"data ({type(self.data).__name__}) has no len(); set steps_per_epoch") from None
                if epoch_length <= 0:
                    raise ValueError("the training data has len() 0; check that the dataset is not empty")
        total = c.total_steps if c.total_steps is not None else c.epochs * epoch_length  # type: ignore[operator]
        if c.lr_warm_up_steps + c.lr_decay_steps > total:
            raise ValueError(f"lr_warm_up_steps + lr_decay_steps exceeds the {total} training steps; shorten them")
        return epoch_length, total

    # ---- schedules ---------------------------------------------------------------------------
    def _lr_factor(self, step: int) -> float:
        c = self.cfg
        if step < c.lr_warm_up_steps:
            return (step + 1) / c.lr_warm_up_steps
        decay_start = self.total_steps - c.lr_decay_steps
        if c.lr_decay_steps and step >= decay_start:
            end = (c.lr_end if c.lr_end is not None else c.lr / 10) / c.lr
            return 1.0 + (end - 1.0) * (step - decay_start + 1) / c.lr_decay_steps
        return 1.0

    def _coefficients(self) -> dict[str, float]:
        out = {}
        for name, value in self.sae.get_coefficients().items():
            if isinstance(value, tuple):
                v, warm = value
                value = v * min(1.0, (self.step + 1) / warm) if warm > 0 else v
            out[name] = float(value)
        return out

    # ---- the loop ----------------------------------------------------------------------------
    def fit(self, resume: bool = True, *, allow_provenance_mismatch: bool = False) -> TrainingJointSAE:
        """Train to ``total_steps`` (or ``epochs``); with ``resume`` (default) continue from the latest
        checkpoint.  With ``keep_best_epoch`` the returned SAE holds the best epoch's weights.

        The checkpoint directory is locked for the run (a second trainer on it gets a one-line error naming
        this process's pid); a checkpoint made for another model, layer, hook or data is refused unless
        ``allow_provenance_mismatch``.  A non-finite loss or weight stops the run with
        :class:`TrainingDiverged`, keeping the last good checkpoint."""
        c = self.cfg
        flush = torch.device(c.device).type == "cpu"
        before = _flush_denormal_enabled()
        if flush:
            # Adam moments of rarely firing latents decay into denormal floats, which made CPU steps up to
            # ~7x slower (synthetic benchmark, jsae-cosine); flushing them to zero changes no visible
            # result.  Process-wide, so the previous setting is restored when fit() returns.
            torch.set_flush_denormal(True)
        try:
            return self._fit(resume, allow_provenance_mismatch)
        finally:
            if flush:
                torch.set_flush_denormal(before)

    def _fit(self, resume: bool, allow_provenance_mismatch: bool = False) -> TrainingJointSAE:
        if not self.cfg.checkpoint_dir or self.rank != 0:
            return self._fit_locked(resume, allow_provenance_mismatch)
        from jsae.guards import check_output_dir
        from jsae.locks import DirLock

        root = check_output_dir(self.cfg.checkpoint_dir, "checkpoint_dir")
        with DirLock(root, "jsae trainer"):
            _tidy_checkpoints(root)
            return self._fit_locked(resume, allow_provenance_mismatch)

    def _fit_locked(self, resume: bool, allow_provenance_mismatch: bool) -> TrainingJointSAE:
        c = self.cfg
        if resume and c.checkpoint_dir and (Path(c.checkpoint_dir) / LATEST).exists():
            self.load_checkpoint(c.checkpoint_dir, allow_provenance_mismatch=allow_provenance_mismatch)
        else:
            torch.manual_seed(c.seed)
            if self.sae.cfg.mse_normalization == "variance":
                self._estimate_mse_scale()
            if c.normalize_decoder:
                self.sae.set_decoder_norm_to_unit_norm()
        if c.log_to_wandb and self.rank == 0:
            import wandb

            self._wandb = wandb.init(project=c.wandb_project, name=c.wandb_run_name,
                                     config={"sae": self.sae.cfg.to_dict(), "trainer": asdict(c)})
        stream = _stream(self.data, self.step)
        bar = tqdm(total=self.total_steps, initial=self.step, desc="training JSAE", disable=not c.progress or self.rank != 0)
        try:
            while self.step < self.total_steps:
                vision, text = check_paired_batch(next(stream), self.sae.cfg.d_in, self.step)
                metrics = self._train_step(vision, text)
                self.step += 1
                bar.update(1)
                if self.epoch_length is not None and self.step % self.epoch_length == 0:
                    self._end_epoch()
                saving = bool(c.checkpoint_every) and self.step % c.checkpoint_every == 0 and self.step < self.total_steps
                if self.step == 1 or saving or self.step % c.log_every == 0 or self.step == self.total_steps:
                    self._check_finite(metrics)  # before logging or saving: a diverged state is never kept
                if self.step % c.log_every == 0 or self.step == self.total_steps:
                    self._log(metrics)
                    bar.set_postfix(loss=f"{metrics['losses/overall_loss']:.4g}")
                if saving:
                    self.save_checkpoint()
        finally:
            bar.close()
        if c.keep_best_epoch and self.best_state is not None:
            self.sae.load_state_dict(self.best_state)
        if c.checkpoint_dir:
            self.save_checkpoint()
        if self._wandb is not None:
            self._wandb.finish()
        return self.sae

    @torch.no_grad()
    def _check_finite(self, metrics: dict[str, float]) -> None:
        """Stop with :class:`TrainingDiverged` when the logged loss or any weight is NaN/inf."""
        loss = metrics.get("losses/overall_loss", float("nan"))
        bad_loss = len(metrics) > 1 and not math.isfinite(loss)
        bad = [n for n, p in self.sae.named_parameters() if not bool(torch.isfinite(p).all())]
        if not (bad_loss or bad):
            return
        where = ""
        if self.cfg.checkpoint_dir and (Path(self.cfg.checkpoint_dir) / LATEST).is_file():
            where = f"; the last good checkpoint ({json.loads((Path(self.cfg.checkpoint_dir) / LATEST).read_text())['checkpoint']}) is kept in {self.cfg.checkpoint_dir}"
        what = f"loss {loss}" if bad_loss else f"non-finite weights in {bad[:3]}"
        raise TrainingDiverged(f"training diverged by step {self.step} ({what}){where}; lower lr (now {self.cfg.lr:g}), "
                               "keep grad_clip_norm on, or rescale the activations (check their magnitude)")

    def _slice(self, x: Tensor) -> Tensor:
        if self.world_size == 1:
            return x
        per = x.shape[0] // self.world_size
        if per * self.world_size != x.shape[0]:
            raise ValueError(f"global batch {x.shape[0]} does not split over {self.world_size} ranks; "
                             "use a batch size divisible by the number of processes")
        return x[self.rank * per:(self.rank + 1) * per]

    def _train_step(self, batch_vision: Tensor, batch_text: Tensor) -> dict[str, float]:
        sae, c = self.sae, self.cfg
        vision = self._slice(batch_vision.to(c.device, sae.dtype))
        text = self._slice(batch_text.to(c.device, sae.dtype))
        dead = self.steps_since_fired >= c.dead_feature_window
        out = sae.paired_forward_pass(vision, text, self._coefficients(), dead)
        self.optimizer.zero_grad(set_to_none=True)
        with one_thread(out.path == "sparse" and torch.device(c.device).type == "cpu"):  # a sparse backward: small ops
            out.loss.backward()
        if self.world_size > 1:
            for p in self.optimizer.param_groups[0]["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad.div_(self.world_size)
        with self._housekeeping.block(torch.device(c.device).type == "cpu"):  # memory-bound: see ThreadPick
            if c.normalize_decoder:
                self.sae.remove_gradient_parallel_to_decoder_directions()
            if c.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.optimizer.param_groups[0]["params"], c.grad_clip_norm)
            self.optimizer.step()
            if c.normalize_decoder:
                self.sae.set_decoder_norm_to_unit_norm()
        if c.lr_scheduler == "warmup-decay":
            self.scheduler.step()
        if self.epoch_length is not None:
            self._epoch_loss_sum += out.loss.detach().to(torch.float64)
        with torch.no_grad():
            # the sparse paths know which latents fired; otherwise a pass over the codes (codes >= 0)
            fired = torch.stack([out.fired[m] if out.fired else out.feature_acts[m].amax(0) > 0 for m in MODALITIES]).long()
            if self.world_size > 1:
                dist.all_reduce(fired, op=dist.ReduceOp.MAX)
            self.steps_since_fired = (self.steps_since_fired + 1) * (1 - fired)
        n = self.step + 1
        if c.resample_every and n % c.resample_every == 0 and n + c.resample_every <= self.total_steps:
            self._resample_dead(batch_vision, batch_text)
        if (self.step + 1) % c.log_every and self.step + 1 != self.total_steps:
            return {"losses/overall_loss": float("nan")}
        with one_thread(torch.device(c.device).type == "cpu"):  # a few small passes, every log_every steps
            return self._metrics(out, vision, text)

    # ---- dead-latent resampling ("Towards Monosemanticity"; see the module docstring) -----------------
    def _resample_candidates(self, vision: Tensor, text: Tensor) -> dict[str, Tensor]:
        """The step's global batch and, for data with ``batches(start)``, the next ``resample_batches - 1``."""
        vs, ts = [vision], [text]
        if self.cfg.resample_batches > 1 and hasattr(self.data, "batches"):
            stream = _stream(self.data, self.step + 1)
            for j in range(self.cfg.resample_batches - 1):
                v, t = check_paired_batch(next(stream), self.sae.cfg.d_in, self.step + 1 + j)
                vs.append(v)
                ts.append(t)
        return {m: torch.cat(xs).to(self.cfg.device, self.sae.dtype) for m, xs in zip(MODALITIES, (vs, ts))}

    @torch.no_grad()
    def _resample_dead(self, vision: Tensor, text: Tensor) -> None:
        sae, c = self.sae, self.cfg
        dead = self.steps_since_fired >= c.dead_feature_window  # [2, d_sae], the same on every rank
        shared = sae.cfg.shared_encoder or sae.cfg.shared_decoder
        if shared:  # a shared row serves both branches: only latents dead in both
            dead = dead.all(0, keepdim=True).expand_as(dead)
        self.resampled.append({"step": self.step + 1, **{m: int(dead[i].sum()) for i, m in enumerate(MODALITIES)}})
        if not bool(dead.any()):
            return
        gen = torch.Generator().manual_seed((c.seed * 1_000_003 + self.step + 1) % 2**63)
        centred, weights, means = {}, {}, {}
        for m, x in self._resample_candidates(vision, text).items():
            _, recon = sae.encode_decode(x, m)
            loss = (recon - x).double().pow(2).sum(-1).cpu()
            w = loss.pow(2)
            weights[m] = w if bool(torch.isfinite(w).all()) and float(w.sum()) > 0 else torch.ones_like(w)
            centred[m] = x - x.mean(0)
            means[m] = x.mean(0)
        directions: dict[str, Tensor] = {}
        if shared:
            n = int(dead[0].sum())
            pick = _draw(torch.cat([weights[m] for m in MODALITIES]), n, gen)
            pool = torch.cat([centred[m] for m in MODALITIES])
            directions = dict.fromkeys(MODALITIES, pool[pick.to(pool.device)])
        else:
            for i, m in enumerate(MODALITIES):
                n = int(dead[i].sum())
                if n:
                    pick = _draw(weights[m], n, gen)
                    directions[m] = centred[m][pick.to(centred[m].device)]
        done: set[int] = set()
        for i, m in enumerate(MODALITIES):
            if m not in directions:
                continue
            idx, alive = dead[i].nonzero().squeeze(1), ~dead[i]
            unit = directions[m] / directions[m].norm(dim=-1, keepdim=True).clamp(min=1e-8)
            W_enc, b_enc, W_dec = sae.W_enc_of(m), sae.b_enc_of(m), sae.W_dec_of(m)
            if id(W_dec) not in done:
                norm = 1.0 if c.normalize_decoder or not alive.any() else float(W_dec[alive].norm(dim=-1).mean())
                W_dec[idx] = unit * norm
                self._reset_moments(W_dec, (idx,))
                done.add(id(W_dec))
            if id(W_enc) not in done:
                cols = W_enc[:, alive] if alive.any() else W_enc
                w = unit * (c.resample_encoder_scale * float(cols.norm(dim=0).mean()))
                W_enc[:, idx] = w.T
                # zero pre-activation at the candidates' mean (0 when the encoder's input is centred there)
                origin = means[m] - sae.b_dec_of(m) * float(sae.cfg.apply_b_dec_to_input)
                b_enc[idx] = -(w @ origin)
                self._reset_moments(W_enc, (slice(None), idx))
                self._reset_moments(b_enc, (idx,))
                done.add(id(W_enc))
            self.steps_since_fired[i, idx] = 0

    def _reset_moments(self, param: Tensor, index: tuple[Any, ...]) -> None:
        """Zero Adam's first and second moments of ``param[index]``."""
        state = self.optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][index] = 0.0

    @torch.no_grad()
    def _metrics(self, out: Any, vision: Tensor, text: Tensor) -> dict[str, float]:
        m: dict[str, float] = {"losses/overall_loss": float(out.loss)}
        m.update({f"losses/{k}": float(v) for k, v in out.losses.items()})
        for name, x in zip(MODALITIES, (vision, text)):
            m[f"metrics/explained_variance_{name}"] = float(explained_variance(out.sae_out[name], x))
            z = out.feature_acts[name]  # the count of positive codes as an integer (no float copy of the codes)
            m[f"metrics/l0_{name}"] = int(torch.count_nonzero(z > 0)) / max(1, z.numel() // z.shape[-1])
        dead = self.steps_since_fired >= self.cfg.dead_feature_window
        for i, name in enumerate(MODALITIES):
            m[f"sparsity/dead_features_{name}"] = float(dead[i].sum())
        m["details/current_learning_rate"] = float(self.optimizer.param_groups[0]["lr"])
        m["details/n_training_steps"] = float(self.step + 1)
        return m

    def _end_epoch(self) -> None:
        """Close an epoch: its mean loss, the plateau scheduler's step, the best epoch's weights."""
        mean = self._epoch_loss_sum / self.epoch_length
        if self.world_size > 1:
            dist.all_reduce(mean)
            mean = mean / self.world_size
        loss = float(mean)
        self._epoch_loss_sum.zero_()
        self.epoch_losses.append(loss)
        if self.cfg.lr_scheduler == "plateau":
            self.scheduler.step(loss)
        if self.cfg.keep_best_epoch and loss < self.best_loss:
            self.best_loss, self.best_epoch = loss, len(self.epoch_losses) - 1
            self.best_state = {k: v.detach().clone() for k, v in self.sae.state_dict().items()}
        if self._wandb is not None:
            self._wandb.log({"losses/epoch_mean_loss": loss, "details/epoch": float(len(self.epoch_losses)),
                             "details/current_learning_rate": float(self.optimizer.param_groups[0]["lr"])},
                            step=self.step)

    def _log(self, metrics: dict[str, float]) -> None:
        metrics = {**metrics, "details/n_training_steps": float(self.step)}
        self.history.append(metrics)
        if self._wandb is not None:
            self._wandb.log(metrics, step=self.step)

    @torch.no_grad()
    def _estimate_mse_scale(self) -> None:
        """Mean squared norm of the centred inputs of each modality over the first few batches."""
        stream, sums = _stream(self.data, 0), torch.zeros(len(MODALITIES), dtype=torch.float64)
        norms = torch.zeros(len(MODALITIES), dtype=torch.float64)
        fix = "or set mse_normalization='none'"
        for i in range(self.cfg.mse_norm_batches):
            for j, x in enumerate(check_paired_batch(next(stream), self.sae.cfg.d_in, i)):
                if x.shape[0] < 2:
                    raise ValueError(f"mse_normalization='variance' estimates the input variance from batches, but batch {i} "
                                     f"holds {x.shape[0]} pair; use a batch size of at least 2 {fix}")
                x = x.double()
                sums[j] += (x - x.mean(0)).pow(2).sum(-1).mean()
                norms[j] += x.pow(2).sum(-1).mean()
        scale = sums / self.cfg.mse_norm_batches
        for j, name in enumerate(MODALITIES):
            if not float(scale[j]) > 1e-10 * float(norms[j] / self.cfg.mse_norm_batches) or float(scale[j]) == 0:
                raise ValueError(f"mse_normalization='variance': the {name} activations of the first "
                                 f"{self.cfg.mse_norm_batches} batches are constant (variance {float(scale[j]):.3g}), so "
                                 f"their variance cannot normalise the loss; check the capture {fix}")
            if not math.isfinite(float(scale[j].to(self.sae.dtype))):
                raise ValueError(f"the {name} activations are too large to train in {self.sae.dtype} (mean squared norm "
                                 f"{float(norms[j] / self.cfg.mse_norm_batches):.3g}); rescale them (e.g. divide by their norm)")
        self.sae.mse_scale.copy_(scale.clamp(min=1e-12).to(self.sae.dtype))

    # ---- checkpoints -------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, Any]:
        sae_cfg = {k: v for k, v in self.sae.cfg.to_dict().items() if k not in ("metadata", "device")}
        trainer_cfg = {k: v for k, v in asdict(self.cfg).items()
                       if k not in ("checkpoint_every", "checkpoint_dir", "keep_checkpoints", "progress", "device",
                                    "log_to_wandb", "wandb_project", "wandb_run_name", "log_every")
                       and not (k in _OPTIONAL_DEFAULTS and v == _OPTIONAL_DEFAULTS[k])}
        return {"sae": sae_cfg, "trainer": trainer_cfg, "world_size": self.world_size}

    def provenance(self) -> dict[str, Any]:
        """Where this run's checkpoints come from: the SAE's model, layer, hook and pooling, and the data."""
        from jsae.provenance import sae_record

        if not hasattr(self, "_data_fp"):
            self._data_fp = data_fingerprint(self.data)
        return {"sae": {k: v for k, v in sae_record(self.sae).items() if k != "d_in"}, "data": self._data_fp}

    def save_checkpoint(self) -> Path:
        """Write ``step-XXXXXXX/`` atomically (tmp dir + rename), then point ``latest.json`` at it."""
        root = Path(self.cfg.checkpoint_dir)  # type: ignore[arg-type]
        final = root / f"step-{self.step:07d}"
        if self.rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.sae.save_model(tmp)
            tensors, groups = self._optimizer_tensors()
            tensors["rng"] = torch.get_rng_state()
            tensors["steps_since_fired"] = self.steps_since_fired.cpu()
            tensors["mse_scale"] = self.sae.mse_scale.detach().cpu()
            state: dict[str, Any] = {"step": self.step, "fingerprint": self._fingerprint(), "param_groups": groups,
                                     "history": self.history, "provenance": self.provenance()}
            if self.cfg.resample_every:
                state["resampled"] = self.resampled
            if self.epoch_length is not None:
                tensors["epoch_loss_sum"] = self._epoch_loss_sum.detach().cpu()
                for k, v in (self.best_state or {}).items():
                    tensors[f"best.{k}"] = v.detach().cpu().contiguous()
                state["epochs"] = {"epoch_losses": self.epoch_losses, "best_epoch": self.best_epoch,
                                   "best_loss": None if self.best_epoch is None else self.best_loss}
                if self.cfg.lr_scheduler == "plateau":
                    state["scheduler"] = self.scheduler.state_dict()
            with writing(final / "trainer_state.safetensors", "free some disk space and re-run: training resumes from the "
                         "last checkpoint"):
                save_file(tensors, tmp / "trainer_state.safetensors")
            write_json(tmp / "trainer_state.json", state)
            replace_dir(tmp, final)  # a re-saved step is moved aside first; _tidy_checkpoints finishes a killed swap
            write_json(root / LATEST, {"checkpoint": final.name, "step": self.step})
            for old in sorted(root.glob("step-*"))[: -self.cfg.keep_checkpoints or None]:
                if old != final:
                    shutil.rmtree(old, ignore_errors=True)
        if self.world_size > 1:
            dist.barrier()
        return final

    def _optimizer_tensors(self) -> tuple[dict[str, Tensor], list[dict[str, Any]]]:
        sd = self.optimizer.state_dict()
        tensors = {f"optim.{i}.{k}": v.detach().cpu().contiguous() for i, st in sd["state"].items() for k, v in st.items()}
        return tensors, sd["param_groups"]

    def load_checkpoint(self, checkpoint_dir: str | Path, *, allow_provenance_mismatch: bool = False) -> None:
        """Restore weights, optimiser, RNG, dead-latent counters and data position.  A checkpoint made for another
        model, layer, hook, pooling or data is refused unless ``allow_provenance_mismatch``."""
        from jsae.guards import confined

        root = Path(checkpoint_dir)
        try:
            latest = json.loads((root / LATEST).read_text())
            ckpt = confined(root, latest["checkpoint"], f"the checkpoint named in {root / LATEST}")
            state = json.loads((ckpt / "trainer_state.json").read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{root} holds no readable jsae checkpoint ({str(exc).splitlines()[0]}); point checkpoint_dir "
                             "at a trainer's checkpoint directory or start with resume=False") from None
        theirs_p = state.get("provenance")
        if theirs_p is not None and not allow_provenance_mismatch:
            from jsae.provenance import ProvenanceError, mismatches

            mine_p = self.provenance()
            diff = [f"{k} {x!r} vs {y!r}" for k, x, y in mismatches(theirs_p.get("sae") or {}, mine_p["sae"])]
            if theirs_p.get("data") is not None and mine_p["data"] is not None and theirs_p["data"] != mine_p["data"]:
                keys = sorted(k for k in set(theirs_p["data"]) | set(mine_p["data"])
                              if theirs_p["data"].get(k) != mine_p["data"].get(k))
                diff.append(f"training data ({', '.join(keys)} differ)")
            if diff:
                raise ProvenanceError(f"checkpoint directory {root} holds a run of another model, layer or data "
                                      f"(checkpoint vs this run: {'; '.join(diff)}); use a new checkpoint_dir, or pass "
                                      "allow_provenance_mismatch=True to resume it anyway")
        mine, theirs = self._fingerprint(), state["fingerprint"]
        if mine != theirs:
            diff = sorted({f"{part}.{k}" for part in ("sae", "trainer") for k in set(mine[part]) | set(theirs[part])
                           if mine[part].get(k) != theirs[part].get(k)} | ({"world_size"} if mine["world_size"] != theirs["world_size"] else set()))
            raise ValueError(f"checkpoint directory {root} was written by a run with another config (differs in {diff}); "
                             "use a new checkpoint_dir or the same config")
        try:
            weights = load_file(ckpt / "sae_weights.safetensors", device=str(self.cfg.device))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{ckpt / 'sae_weights.safetensors'} is corrupt or truncated ({str(exc).splitlines()[0]}); "
                             f"delete {ckpt} and {root / LATEST} to resume from an older checkpoint, or start anew") from None
        try:
            tensors = load_file(ckpt / "trainer_state.safetensors")
        except Exception as exc:  # noqa: BLE001
            raise ValueError(f"{ckpt / 'trainer_state.safetensors'} is corrupt or truncated ({str(exc).splitlines()[0]}); "
                             f"delete {ckpt} and {root / LATEST} to resume from an older checkpoint, or start anew") from None
        weights["mse_scale"] = tensors["mse_scale"].to(self.cfg.device)
        self.sae.load_state_dict(weights)
        opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, i, name = key.split(".", 2)
                opt_state["state"].setdefault(int(i), {})[name] = value.to(self.cfg.device) if value.ndim else value
        self.optimizer.load_state_dict(opt_state)
        self.step = int(state["step"])
        if self.cfg.lr_scheduler == "plateau":  # the optimiser's param groups hold the reduced lr
            self.scheduler.load_state_dict(state["scheduler"])
        else:
            self.scheduler.last_epoch = self.step
            for group in self.optimizer.param_groups:
                group["lr"] = group["initial_lr"] * self._lr_factor(self.step)
        torch.set_rng_state(tensors["rng"])
        self.steps_since_fired = tensors["steps_since_fired"].to(self.cfg.device)
        self.history = state.get("history", [])
        self.resampled = list(state.get("resampled", []))
        if self.epoch_length is not None:
            epochs = state["epochs"]
            self.epoch_losses = list(epochs["epoch_losses"])
            self._epoch_loss_sum = tensors["epoch_loss_sum"].to(self.cfg.device)
            self.best_epoch = epochs["best_epoch"]
            self.best_loss = math.inf if epochs["best_loss"] is None else float(epochs["best_loss"])
            best = {k.removeprefix("best."): v.to(self.cfg.device) for k, v in tensors.items() if k.startswith("best.")}
            self.best_state = best or None


def train_jsae(sae_cfg: TrainingJointSAEConfig, data: Iterable[tuple[Tensor, Tensor]], **trainer_kwargs: Any) -> TrainingJointSAE:
    """One-call training: ``train_jsae(cfg, data, total_steps=1000, lr=1e-3)`` (or ``epochs=20``)."""
    return JointSAETrainer.from_config(sae_cfg, JointTrainerConfig(**trainer_kwargs), data).fit()


__all__ = ["JointSAETrainer", "JointTrainerConfig", "train_jsae"]
