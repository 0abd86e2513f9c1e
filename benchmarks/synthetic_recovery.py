"""Ground-truth benchmark for the alignment claim (``python benchmarks/synthetic_recovery.py``).

Data: :class:`jsae.synthetic.PairedSyntheticData` — shared concepts that fire in both modalities of a
pair along *different* (by default nearly orthogonal) directions, plus modality-private features.

Methods, trained with the same width, steps, batch, learning rate, seed and sparsity penalty:

==================  =============================================================================
jsae-cosine         separate encoders/decoders, ``1 - cos(z_v, z_t)`` alignment (the paper)
jsae-infonce        separate encoders/decoders, symmetric InfoNCE alignment
jsae-none           separate encoders/decoders, no alignment (latent j of vision vs latent j of text)
shared-encoder      one encoder for both modalities, separate decoders, no alignment loss (VL-SAE style)
separate+hungarian  two independent SAEs, text latents paired to vision latents after training by
                    Hungarian matching of code correlations on the training pairs
                    (:mod:`jsae.baselines`).  Two independent SAEs with this config and seed are
                    bit-for-bit the jsae-none model, so that model is reused rather than retrained.
==================  =============================================================================

Metrics (definitions in :mod:`jsae.synthetic`) on held-out pairs: shared-concept recovery (mean over
concepts of the best latent's min(corr in vision, corr in text)), its minimum over concepts, the
fraction of concepts recovered above 0.9, paired code agreement, FVU, L0 and dead latents per
modality.  The table is printed and the full results (with the configs) written as JSON.

``--activation topk`` runs the same comparison with TopK SAEs (``--k``) instead of ReLU + L1.
"""

from __future__ import annotations

import argparse
import platform
import time
from dataclasses import asdict
from typing import Any

import torch

METHODS = ("jsae-cosine", "jsae-infonce", "jsae-none", "shared-encoder", "separate+hungarian")

# The defaults: the full benchmark takes about a minute on one CPU core.
DEFAULTS: dict[str, Any] = dict(
    d_in=64, n_shared=32, n_private=16, d_sae=256, steps=2000, batch=256, lr=1e-3,
    l1=0.1, k=4, n_train=32768, n_test=8192, seed=0,
)


def method_config(method: str, base: dict[str, Any]) -> dict[str, Any]:
    """The ``TrainingJointSAEConfig`` keyword arguments of ``method`` (on top of ``base``)."""
    kw = dict(base)
    if method == "jsae-cosine":
        kw.update(alignment="cosine")
    elif method == "jsae-infonce":
        kw.update(alignment="infonce")
    elif method in ("jsae-none", "separate+hungarian"):
        kw.update(alignment="none")
    elif method == "shared-encoder":
        kw.update(alignment="none", shared_encoder=True)
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return kw


def run(d_in: int = 64, n_shared: int = 32, n_private: int = 16, d_sae: int = 256, steps: int = 2000,
        batch: int = 256, lr: float = 1e-3, l1: float = 0.1, k: int = 4, activation: str = "relu",
        n_train: int = 32768, n_test: int = 8192, seed: int = 0, methods: tuple[str, ...] = METHODS,
        direction_cosine: float | None = None, alignment_coefficient: float = 1.0,
        verbose: bool = True) -> dict[str, Any]:
    """Train every method and return ``{"settings": ..., "results": {method: metrics}}``."""
    import jsae  # noqa: F401  (registers the architecture)
    from jsae.training.recipes import match_separate_saes
    from jsae.saes.joint_sae import TrainingJointSAEConfig
    from jsae.protocol.synthetic import PairedSyntheticConfig, PairedSyntheticData, evaluate_sae
    from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData

    gen = PairedSyntheticData(PairedSyntheticConfig(d_in=d_in, n_shared=n_shared, n_private=n_private,
                                                    direction_cosine=direction_cosine, seed=seed))
    train, test = gen.sample(n_train, seed=seed), gen.sample(n_test, seed=seed + 1)
    base = dict(d_in=d_in, d_sae=d_sae, activation=activation, k=k, l1_coefficient=l1 if activation == "relu" else 0.0,
                alignment_coefficient=alignment_coefficient)
    trainer_cfg = JointTrainerConfig(total_steps=steps, lr=lr, seed=seed, progress=False, log_every=max(1, steps))
    results: dict[str, Any] = {}
    trained: dict[str, Any] = {}
    for method in methods:
        t0 = time.perf_counter()
        if method == "separate+hungarian" and "jsae-none" in trained:
            sae, train_s = trained["jsae-none"]  # identical config and seed: the same two independent SAEs
        else:
            cfg = TrainingJointSAEConfig(**method_config(method, base))
            data = PairedTensorData(train.vision, train.text, batch, seed=seed)
            sae = JointSAETrainer.from_config(cfg, trainer_cfg, data).fit()
            train_s = time.perf_counter() - t0
            trained[method] = (sae, train_s)
        perm = match_separate_saes(sae, train.vision, train.text)[0] if method == "separate+hungarian" else None
        m = evaluate_sae(sae, test, text_permutation=perm)
        m["train_seconds"] = round(train_s, 2)
        results[method] = m
        if verbose:
            print(f"  trained {method:<20s} in {train_s:5.1f} s", flush=True)
    settings = dict(d_in=d_in, n_shared=n_shared, n_private=n_private, d_sae=d_sae, steps=steps, batch=batch, lr=lr,
                    l1=l1, k=k, activation=activation, n_train=n_train, n_test=n_test, seed=seed,
                    alignment_coefficient=alignment_coefficient, generator=asdict(gen.cfg),
                    mean_abs_direction_cosine=float(gen.direction_cosines().abs().mean()),
                    true_l0_per_modality=float(((train.shared > 0).sum(-1) + (train.vision_private > 0).sum(-1)).double().mean()),
                    torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine())
    return {"settings": settings, "results": results}


COLUMNS = [("shared_recovery", "recovery", "{:.3f}"), ("shared_recovery_min", "rec.min", "{:.3f}"),
           ("shared_recovered_frac_0.9", "frac>.9", "{:.2f}"), ("code_agreement", "agree", "{:.3f}"),
           ("fvu_vision", "FVU v", "{:.4f}"), ("fvu_text", "FVU t", "{:.4f}"), ("l0_vision", "L0 v", "{:.2f}"),
           ("l0_text", "L0 t", "{:.2f}"), ("dead_vision", "dead v", "{:d}"), ("dead_text", "dead t", "{:d}"),
           ("train_seconds", "train s", "{:.1f}")]


def format_table(out: dict[str, Any]) -> str:
    head = f"{'method':<20s}" + "".join(f"{h:>10s}" for _, h, _ in COLUMNS)
    lines = [head, "-" * len(head)]
    for method, m in out["results"].items():
        lines.append(f"{method:<20s}" + "".join(f"{fmt.format(m[key]):>10s}" for key, _, fmt in COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in DEFAULTS.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    p.add_argument("--activation", choices=("relu", "topk"), default="relu")
    p.add_argument("--direction-cosine", type=float, default=None)
    p.add_argument("--alignment-coefficient", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1, help="1: the matrices are tiny and the machine is shared")
    p.add_argument("--out", default="benchmarks/results/synthetic_recovery.json")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    # Adam moments of rarely firing latents decay into denormal floats, which made the aligned runs ~20x
    # slower on this CPU (201 s vs 10 s for jsae-cosine); flushing them to zero changes nothing visible.
    torch.set_flush_denormal(True)
    kw = {name: getattr(a, name) for name in DEFAULTS}
    t0 = time.perf_counter()
    out = run(**kw, activation=a.activation, direction_cosine=a.direction_cosine,
              alignment_coefficient=a.alignment_coefficient)
    out["settings"]["total_seconds"] = round(time.perf_counter() - t0, 1)
    s = out["settings"]
    print(f"\nsynthetic recovery: d_in={s['d_in']} shared={s['n_shared']} private={s['n_private']}/modality "
          f"|cos(u_c,v_c)|={s['mean_abs_direction_cosine']:.3f} true L0={s['true_l0_per_modality']:.2f}; "
          f"d_sae={s['d_sae']} {s['activation']}" + (f" l1={s['l1']}" if s["activation"] == "relu" else f" k={s['k']}")
          + f" steps={s['steps']} batch={s['batch']} lr={s['lr']}")
    print(format_table(out))
    print(f"total {s['total_seconds']} s")
    from jsae.files import write_json

    print(f"wrote {write_json(a.out, out)}")  # atomic (tmp + rename), parent directories created
    return out


if __name__ == "__main__":
    main()
