"""Training throughput of the JSAE trainer against SAELens's own TopK training, in one run.

``python benchmarks/train_throughput.py`` (defaults: d_in=512, d_sae=4096, k=32, 1024 pairs per step,
2 threads).  What is timed, exactly:

* **SAELens**: ``sae_lens.SAETrainer(SAETrainerConfig(...), TopKTrainingSAE(TopKTrainingSAEConfig(d_in,
  d_sae, k)), data_provider=<in-memory iterator>).fit()`` over ``steps`` steps of ``2 * batch``
  vectors (both modalities of ``batch`` pairs go through one SAE, so a step does the same number of
  vectors as a JSAE step).  SAELens's defaults otherwise (dense decode, aux loss, decoder-norm
  rescaling).  Its vectors/s are converted to **pairs/s equivalent = vectors/s / 2**.
* **JSAE**: ``JointSAETrainer.from_config(TrainingJointSAEConfig(activation="topk", k, alignment=
  "cosine"), JointTrainerConfig(total_steps=steps), PairedTensorData(...)).fit()``: ``steps`` steps of
  ``batch`` pairs; pairs/s = steps * batch / seconds.  Each pair is 2 vectors.
  Here the SAE runs its *dense reference* pass (``paired_forward_pass(..., dense=True)``).
* **jsae+sparse** (the default training path, :mod:`jsae.saes.sparse_topk`): the same trainer with
  ``TrainingJointSAE.paired_forward_pass`` on its sparse TopK branch (sparse-backward TopK encoder, sparse
  decoder backward, cosine alignment from the sparse codes).
* **jsae+sparse+fused**: additionally the trainer's Adam built with ``fused=True`` (a one-line
  change proposed for ``JointSAETrainer.__init__``).

Each kind gets one untimed warm-up fit (2 steps) in the same process; then, for ``rounds`` rounds,
the kinds are run in alternation, each as a fresh trainer's ``fit()`` over ``steps`` steps.  Reported:

* **step** (primary): the median wall time of the trainer's own step method — ``SAETrainer.step``
  (forward, backward, clip, Adam, dead-latent stats) and ``JointSAETrainer._train_step`` (the same
  plus decoder-norm projection) — over all timed steps; both are wrapped on the instance, nothing
  else changes;
* **best**: the fastest single step (the least disturbed by other users of the machine);
* **fit**: the best round's whole ``fit()`` wall time / steps (loop, data fetching, tqdm and one-off
  decoder normalisation included; nothing subtracted).

Matmul unit: the median time of one dense encoder matmul ``x @ W_enc`` with ``x [2 * batch, d_in]``
(both modalities of a step; the **primary** unit) and with ``x [batch, d_in]``; step times are
printed in both.  Targets: JSAE >= 2.0x SAELens pairs/s, step <= 3 primary matmul-equivalents.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Iterator

import torch


def time_matmul(n: int, d_in: int, d_sae: int, reps: int = 7) -> float:
    x, w = torch.randn(n, d_in), torch.randn(d_in, d_sae) / d_in**0.5
    x @ w
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pool(n_batches: int, batch: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = n_batches * batch
    return torch.randn(n, d_in, generator=g), torch.randn(n, d_in, generator=g) + 0.5


def _record_steps(obj: Any, name: str, sink: list[float]) -> None:
    """Wrap ``obj.name`` (an instance attribute, so nothing global changes) to time each call."""
    inner = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        sink.append(time.perf_counter() - t0)
        return out

    setattr(obj, name, timed)


def saelens_fit_seconds(vision: torch.Tensor, text: torch.Tensor, d_sae: int, k: int, batch: int, steps: int, lr: float,
                        step_times: list[float] | None = None) -> float:
    from sae_lens import SAETrainer, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    vectors = torch.cat([vision, text])  # both modalities through the one SAE

    def provider() -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        while True:
            order = torch.randperm(vectors.shape[0], generator=g)
            for i in range(0, vectors.shape[0] - 2 * batch + 1, 2 * batch):
                yield vectors[order[i:i + 2 * batch]]

    torch.manual_seed(0)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=vision.shape[1], d_sae=d_sae, k=k))
    cfg = SAETrainerConfig(total_training_samples=steps * 2 * batch, train_batch_size_samples=2 * batch, lr=lr, lr_end=lr,
                           logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider())
    if step_times is not None:
        _record_steps(trainer, "step", step_times)
    t0 = time.perf_counter()
    trainer.fit()
    dt = time.perf_counter() - t0
    assert trainer.n_training_steps == steps
    return dt


def jsae_fit_seconds(vision: torch.Tensor, text: torch.Tensor, d_sae: int, k: int, batch: int, steps: int, lr: float,
                     sparse_encoder: bool = False, fused_adam: bool = False, alignment: str = "cosine",
                     step_times: list[float] | None = None) -> float:
    import jsae  # noqa: F401
    from jsae.saes.joint_sae import TrainingJointSAE, TrainingJointSAEConfig
    from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData

    cfg = TrainingJointSAEConfig(d_in=vision.shape[1], d_sae=d_sae, activation="topk", k=k, alignment=alignment)
    tcfg = JointTrainerConfig(total_steps=steps, lr=lr, progress=False, log_every=10**9)
    data = PairedTensorData(vision, text, batch, seed=0)
    torch.manual_seed(0)
    sae = TrainingJointSAE(cfg) if sparse_encoder else DenseJointSAE(cfg)
    trainer = JointSAETrainer(sae, tcfg, data)
    if fused_adam:
        use_fused_adam(trainer)
    if step_times is not None:
        _record_steps(trainer, "_train_step", step_times)
    t0 = time.perf_counter()
    trainer.fit(resume=False)
    dt = time.perf_counter() - t0
    assert trainer.step == steps
    return dt


def _dense_class() -> type:
    from jsae.saes.joint_sae import TrainingJointSAE

    class _DenseJointSAE(TrainingJointSAE):  # type: ignore[misc]
        """TrainingJointSAE on its dense reference pass (the baseline of the sparse TopK path)."""

        def paired_forward_pass(self, vision, text, coefficients, dead_neuron_mask=None, *, dense=True):  # type: ignore[no-untyped-def]
            return super().paired_forward_pass(vision, text, coefficients, dead_neuron_mask, dense=True)

    return _DenseJointSAE


def DenseJointSAE(cfg: Any) -> Any:  # noqa: N802  (a factory that reads like a class)
    return _dense_class()(cfg)


def use_fused_adam(trainer: Any) -> None:
    """The proposed trainer change, applied from outside: ``torch.optim.Adam(..., fused=True)``."""
    c = trainer.cfg
    params = list(dict.fromkeys(trainer.sae.parameters()))
    opt_cls = torch.optim.AdamW if c.optimizer == "adamw" else torch.optim.Adam
    trainer.optimizer = opt_cls(params, lr=c.lr, betas=(c.adam_beta1, c.adam_beta2), weight_decay=c.weight_decay, fused=True)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, trainer._lr_factor)


def run(d_in: int = 512, d_sae: int = 4096, k: int = 32, batch: int = 1024, steps: int = 6, rounds: int = 2,
        lr: float = 3e-4, threads: int = 2, kinds: tuple[str, ...] = ("saelens", "jsae", "jsae+sparse", "jsae+sparse+fused")) -> dict[str, Any]:
    torch.set_num_threads(threads)
    # Denormal floats (tiny Adam moments of rarely firing latents) make CPU arithmetic ~10x slower;
    # flushing them to zero is applied to every kind alike.
    torch.set_flush_denormal(True)
    vision, text = _pool(16, batch, d_in, seed=0)
    fns = {
        "saelens": lambda n, st=None: saelens_fit_seconds(vision, text, d_sae, k, batch, n, lr, step_times=st),
        "jsae": lambda n, st=None: jsae_fit_seconds(vision, text, d_sae, k, batch, n, lr, step_times=st),
        "jsae+sparse": lambda n, st=None: jsae_fit_seconds(vision, text, d_sae, k, batch, n, lr, sparse_encoder=True, step_times=st),
        "jsae+sparse+fused": lambda n, st=None: jsae_fit_seconds(vision, text, d_sae, k, batch, n, lr, sparse_encoder=True,
                                                                 fused_adam=True, step_times=st),
    }
    for kind in kinds:  # warm-up (allocator, thread pool, lazy imports)
        fns[kind](2)
    load = os.getloadavg()[0]  # other users of the machine show up here (this process adds ~1-2)
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    steps_s: dict[str, list[float]] = {kind: [] for kind in kinds}
    mm2, mm1 = [], []
    for _ in range(rounds):
        mm2.append(time_matmul(2 * batch, d_in, d_sae))
        mm1.append(time_matmul(batch, d_in, d_sae))
        for kind in kinds:
            seconds[kind].append(fns[kind](steps, steps_s[kind]))
    unit2, unit1 = statistics.median(mm2), statistics.median(mm1)
    out: dict[str, Any] = {"settings": dict(d_in=d_in, d_sae=d_sae, k=k, batch_pairs=batch, steps=steps, rounds=rounds,
                                            lr=lr, threads=threads, torch=torch.__version__,
                                            load_average_1min=load),
                           "matmul_2B_ms": unit2 * 1e3, "matmul_B_ms": unit1 * 1e3,
                           "matmul_2B_ms_all": [m * 1e3 for m in mm2], "kinds": {}}
    for kind in kinds:
        fit_step_s = min(seconds[kind]) / steps  # best round, whole fit() wall time / steps
        med, best = statistics.median(steps_s[kind]), min(steps_s[kind])
        out["kinds"][kind] = dict(fit_seconds=seconds[kind], step_seconds=steps_s[kind],
                                  step_ms=med * 1e3, best_step_ms=best * 1e3, fit_step_ms=fit_step_s * 1e3,
                                  pairs_per_s=batch / med, pairs_per_s_fit=batch / fit_step_s,
                                  matmul_equiv_2B=med / unit2, matmul_equiv_B=med / unit1, best_matmul_equiv_2B=best / unit2)
    base = out["kinds"].get("saelens")
    if base:
        for kind, r in out["kinds"].items():
            r["ratio_vs_saelens"] = r["pairs_per_s"] / base["pairs_per_s"]
            r["ratio_vs_saelens_best"] = base["best_step_ms"] / r["best_step_ms"]
            r["ratio_vs_saelens_fit"] = r["pairs_per_s_fit"] / base["pairs_per_s_fit"]
    return out


def format_report(out: dict[str, Any]) -> str:
    s = out["settings"]
    lines = [f"train throughput: d_in={s['d_in']} d_sae={s['d_sae']} k={s['k']} batch={s['batch_pairs']} pairs "
             f"(SAELens: {2 * s['batch_pairs']} vectors/step), {s['rounds']} rounds x {s['steps']} steps, "
             f"{s['threads']} threads, torch {s['torch']}, 1-min load average {s['load_average_1min']:.2f} (incl. this run)",
             f"matmul unit (median): x[{2 * s['batch_pairs']},{s['d_in']}] @ W_enc = {out['matmul_2B_ms']:.1f} ms (primary); "
             f"x[{s['batch_pairs']},{s['d_in']}] @ W_enc = {out['matmul_B_ms']:.1f} ms",
             "step = the trainer's own step method (SAETrainer.step / JointSAETrainer._train_step), median over all timed steps;",
             "best = fastest step; fit = best round's whole fit() wall time / steps (loop, data, decoder init included)",
             f"{'trainer':<20s}{'step ms':>9s}{'pairs/s':>9s}{'vs SAELens':>11s}{'matmuls':>9s}{'(B unit)':>9s}"
             f"{'best ms':>9s}{'vs SL':>7s}{'matmuls':>9s}{'fit ms':>9s}{'vs SL':>7s}"]
    for kind, r in out["kinds"].items():
        lines.append(f"{kind:<20s}{r['step_ms']:>9.1f}{r['pairs_per_s']:>9.0f}{r.get('ratio_vs_saelens', float('nan')):>10.2f}x"
                     f"{r['matmul_equiv_2B']:>9.2f}{r['matmul_equiv_B']:>9.2f}{r['best_step_ms']:>9.1f}"
                     f"{r.get('ratio_vs_saelens_best', float('nan')):>6.2f}x{r['best_matmul_equiv_2B']:>9.2f}"
                     f"{r['fit_step_ms']:>9.1f}{r.get('ratio_vs_saelens_fit', float('nan')):>6.2f}x")
    lines.append("targets: >= 2.0x SAELens pairs/s; <= 3 matmul-equivalents (primary 2B unit)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="JSAE vs SAELens TopK training throughput")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024, help="pairs per step (SAELens gets 2x vectors)")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--kinds", default="saelens,jsae,jsae+sparse,jsae+sparse+fused")
    p.add_argument("--out", default="benchmarks/results/train_throughput.json")
    a = p.parse_args(argv)
    out = run(a.d_in, a.d_sae, a.k, a.batch, a.steps, a.rounds, threads=a.threads, kinds=tuple(a.kinds.split(",")))
    print(format_report(out))
    from jsae.files import write_json

    print(f"wrote {write_json(a.out, out)}")  # atomic (tmp + rename), parent directories created
    return out


if __name__ == "__main__":
    main()
