"""Train a small JSAE on fixed synthetic pairs; used by the trainer tests as a subprocess.

usage: train_paired.py OUT.safetensors CKPT_DIR TOTAL_STEPS [--slow SECONDS] [--batch N] [--alignment NAME]
                       [--activation relu|topk] [--l1 COEF] [--resample-every N]
With --resample-every, the trainer's resampling log is written to OUT with the suffix .json.  Works under ``torchrun --nproc_per_node 2`` too (the trainer starts the gloo process group itself).
"""

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from jsae import TrainingJointSAEConfig
from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData


class SlowData(PairedTensorData):
    """Paired data that sleeps per batch, so a test can kill training between checkpoints."""

    delay = 0.0

    def batches(self, start=0):
        for batch in super().batches(start):
            time.sleep(self.delay)
            yield batch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("ckpt")
    ap.add_argument("steps", type=int)
    ap.add_argument("--slow", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--activation", default="topk")
    ap.add_argument("--alignment", default="cosine")
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--l1", type=float, default=0.03)
    ap.add_argument("--resample-every", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(123)
    latent = torch.rand(512, 6, generator=g)
    vision = latent @ torch.randn(6, 16, generator=g) + 0.05 * torch.randn(512, 16, generator=g)
    text = latent @ torch.randn(6, 16, generator=g) + 0.05 * torch.randn(512, 16, generator=g)
    data = SlowData(vision, text, batch_size=args.batch, seed=7)
    data.delay = args.slow
    sae_cfg = TrainingJointSAEConfig(d_in=16, d_sae=48, activation=args.activation, k=4, alignment=args.alignment,
                                     mse_normalization="variance", l1_coefficient=args.l1)
    cfg = JointTrainerConfig(total_steps=args.steps, lr=3e-3, lr_warm_up_steps=3, lr_decay_steps=10,
                             checkpoint_every=args.every if args.ckpt != "-" else 0,
                             checkpoint_dir=args.ckpt if args.ckpt != "-" else None,
                             dead_feature_window=4, log_every=5, progress=False, seed=11, resample_every=args.resample_every)
    trainer = JointSAETrainer.from_config(sae_cfg, cfg, data)
    sae = trainer.fit()
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, args.out)
        if args.resample_every:
            Path(args.out).with_suffix(".json").write_text(json.dumps(trainer.resampled))


if __name__ == "__main__":
    main()
