"""Training throughput of the JSAE trainer against SAELens's trainer of the same architecture, in one run.

``python benchmarks/train_throughput.py --arch relu`` (defaults: d_in=512, d_sae=4096, 1024 pairs a step,
2 threads; ``--arch topk`` adds k=32; ``--density 0.02`` sets the ReLU codes' density first, see below).
What is timed, exactly:

* **SAELens** (``saelens-standard`` for ReLU + L1, ``saelens-topk`` for TopK):
  ``sae_lens.SAETrainer(SAETrainerConfig(...), StandardTrainingSAE(...) | TopKTrainingSAE(...),
  data_provider=<in-memory iterator>).fit()``; each step gets ``2 * batch`` vectors (both modalities of
  ``batch`` pairs through one SAE, so a step does as many vectors as a JSAE step).  Its vectors/s are
  converted to **pairs/s equivalent = vectors/s / 2**.  SAELens's defaults otherwise (its Adam, clipping,
  dead-latent statistics; L1 0.03 for the standard SAE).
* **JSAE** (``jsae-relu``: ``TrainingJointSAEConfig()``, the paper's ReLU + L1 + cosine; ``jsae-topk``:
  ``activation="topk", k``): ``JointSAETrainer(TrainingJointSAE(cfg), JointTrainerConfig(total_steps=steps),
  PairedTensorData(...)).fit()`` on its default training path (sparse TopK; for ReLU the fast path, which
  itself picks sparse or dense codes from the measured density).  ``jsae-relu-dense`` / ``jsae-topk-dense``
  run the same trainer on the plain-autograd reference (``paired_forward_pass(..., dense=True)``).

Density (``--density``, ReLU only): an L1-trained SAE has sparse codes, a freshly initialised one does not.
With ``--density rho`` each SAE's ``b_enc`` (SAELens's too) is set, before training, to minus the
``1 - rho`` quantile of each latent's pre-activations on the data, so a fraction ``rho`` of the codes is
active: a stand-in for a trained SAE at that density (the reported ``density`` is the one measured in the
timed steps).  Without it the codes are those of the initialisation (~50% active).

Each kind gets ``warmup`` untimed steps (one fit) in the same process; then, for ``rounds`` rounds, the kinds
run in alternation, each as a fresh trainer's ``fit()`` over ``steps`` steps.  **step**: the median wall
time of the trainer's own step method (``SAETrainer._train_step`` / ``JointSAETrainer._train_step``: forward,
backward, clipping, Adam, dead-latent statistics; wrapped on the instance) over the timed steps except each
fit's first (Adam allocates its moments there); **best**: the fastest step.  **unit**: the median time of one
dense encoder matmul ``x [2 * batch, d_in] @ W_enc [d_in, d_sae]`` (both modalities of a step), timed in
each round between the kinds.  **peak MiB**: the largest resident-set growth during a kind's first timed fit
(sampled every 2 ms, after ``malloc_trim``; weights, Adam moments and activations).  The machine's 1-minute
load average is recorded at the start and the end of the run.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import threading
import time
from typing import Any, Callable, Iterator

import torch

ARCH_KINDS = {"relu": ("saelens-standard", "jsae-relu-dense", "jsae-relu"),
              "topk": ("saelens-topk", "jsae-topk-dense", "jsae-topk")}
BASELINE = {"relu": "saelens-standard", "topk": "saelens-topk"}


def time_matmul(n: int, d_in: int, d_sae: int, reps: int = 5) -> float:
    x, w = torch.randn(n, d_in), torch.randn(d_in, d_sae) / d_in**0.5
    x @ w
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x @ w
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _pool(rows: int, d_in: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, d_in, generator=g), torch.randn(rows, d_in, generator=g) + 0.5


def _record_steps(obj: Any, name: str, sink: list[float]) -> None:
    """Wrap ``obj.name`` (an instance attribute, so nothing global changes) to time each call."""
    inner = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        sink.append(time.perf_counter() - t0)
        return out

    setattr(obj, name, timed)


class PeakRSS:
    """Largest resident-set growth while active (a sampling thread; torch releases the GIL in its kernels)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakRSS":
        gc.collect()  # the previous kind's trainer (SAELens's holds reference cycles)
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed memory, so growth is this kind's own
        except OSError:
            pass
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20


@torch.no_grad()
def set_code_density(W_enc: torch.Tensor, b_enc: torch.Tensor, sae_in: torch.Tensor, rho: float) -> None:
    """``b_enc = -`` the ``1 - rho`` quantile of each latent's pre-activation ``sae_in @ W_enc`` on the sample."""
    pre = sae_in @ W_enc
    k = min(pre.shape[0], max(1, round((1 - rho) * pre.shape[0])))
    b_enc.copy_(-pre.kthvalue(k, dim=0).values)


def saelens_trainer(arch: str, vision: torch.Tensor, text: torch.Tensor, d_sae: int, k: int, batch: int, steps: int,
                    lr: float, wrap: Callable[[Iterator[torch.Tensor]], Any] = lambda it: it,
                    prepare: Callable[[Any, torch.Tensor], None] | None = None) -> Any:
    """The SAELens baseline of both benchmarks (this one and ``train_whole_run.py``): ``SAETrainer`` with SAELens's
    ``StandardTrainingSAE`` (``arch="relu"``, L1 0.03) or ``TopKTrainingSAE`` at constant ``lr``, both modalities
    through the one SAE (``2 * batch`` vectors a step, reshuffled each epoch, seed 0).  ``wrap`` wraps the batch
    iterator, ``prepare(sae, vectors)`` runs on the new SAE before the trainer is built."""
    from sae_lens import (SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE,
                          TopKTrainingSAEConfig)
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    vectors = torch.cat([vision, text])  # both modalities through the one SAE

    def provider() -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        while True:
            order = torch.randperm(vectors.shape[0], generator=g)
            for i in range(0, vectors.shape[0] - 2 * batch + 1, 2 * batch):
                yield vectors[order[i:i + 2 * batch]]

    torch.manual_seed(0)
    d_in = vision.shape[1]
    sae: Any = (StandardTrainingSAE(StandardTrainingSAEConfig(d_in=d_in, d_sae=d_sae, l1_coefficient=0.03))
                if arch == "relu" else TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=k)))
    if prepare is not None:
        prepare(sae, vectors)
    cfg = SAETrainerConfig(total_training_samples=steps * 2 * batch, train_batch_size_samples=2 * batch, lr=lr, lr_end=lr,
                           logger=LoggingConfig(log_to_wandb=False))
    return SAETrainer(cfg=cfg, sae=sae, data_provider=wrap(provider()))


def saelens_fit(arch: str, vision: torch.Tensor, text: torch.Tensor, d_sae: int, k: int, batch: int, steps: int,
                lr: float, density: float | None, step_times: list[float] | None = None) -> float:
    def prepare(sae: Any, vectors: torch.Tensor) -> None:
        if arch == "relu" and density is not None:
            sample = vectors[torch.randperm(vectors.shape[0])[:2048]]
            set_code_density(sae.W_enc, sae.b_enc, sample - sae.b_dec, density)

    trainer = saelens_trainer(arch, vision, text, d_sae, k, batch, steps, lr, prepare=prepare)
    if step_times is not None:
        _record_steps(trainer, "_train_step", step_times)
    t0 = time.perf_counter()
    trainer.fit()
    dt = time.perf_counter() - t0
    assert trainer.n_training_steps == steps
    return dt


def jsae_fit(arch: str, vision: torch.Tensor, text: torch.Tensor, d_sae: int, k: int, batch: int, steps: int, lr: float,
             density: float | None, dense: bool = False, step_times: list[float] | None = None,
             paths: list[tuple[str, float | None]] | None = None) -> float:
    import jsae  # noqa: F401
    from jsae.saes.joint_sae import MODALITIES, TrainingJointSAE, TrainingJointSAEConfig
    from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData

    extra = {"activation": "topk", "k": k} if arch == "topk" else {}
    cfg = TrainingJointSAEConfig(d_in=vision.shape[1], d_sae=d_sae, **extra)
    tcfg = JointTrainerConfig(total_steps=steps, lr=lr, progress=False, log_every=10**9)
    data = PairedTensorData(vision, text, batch, seed=0)
    torch.manual_seed(0)
    sae = TrainingJointSAE(cfg)
    if density is not None and arch == "relu":
        for m, x in zip(MODALITIES, (vision, text)):
            set_code_density(sae.W_enc_of(m), sae.b_enc_of(m), x[:2048] - sae.b_dec_of(m), density)
    inner = sae.paired_forward_pass

    def forward(*args: Any, **kwargs: Any) -> Any:  # the reference path on request; record the path taken
        out = inner(*args, **kwargs, dense=dense)
        if paths is not None:
            paths.append((out.path, out.density))
        return out

    sae.paired_forward_pass = forward  # type: ignore[method-assign]
    trainer = JointSAETrainer(sae, tcfg, data)
    if step_times is not None:
        _record_steps(trainer, "_train_step", step_times)
    t0 = time.perf_counter()
    trainer.fit(resume=False)
    dt = time.perf_counter() - t0
    assert trainer.step == steps
    return dt


def run(arch: str = "relu", d_in: int = 512, d_sae: int = 4096, k: int = 32, batch: int = 1024, steps: int = 5,
        rounds: int = 2, warmup: int = 2, lr: float = 3e-4, threads: int = 2, density: float | None = None,
        kinds: tuple[str, ...] | None = None, pool_rows: int | None = None) -> dict[str, Any]:
    torch.set_num_threads(threads)
    # Denormal floats (tiny Adam moments of rarely firing latents) make CPU arithmetic ~10x slower; the JSAE
    # trainer flushes them during fit(); the same setting is applied to SAELens's trainer here.
    torch.set_flush_denormal(True)
    kinds = kinds or ARCH_KINDS[arch]
    rows = pool_rows or min(16 * batch, max(2 * batch, 16384))
    vision, text = _pool(rows, d_in, seed=0)
    load_start = os.getloadavg()[0]

    def fn(kind: str) -> Callable[..., float]:
        def call(n: int, st: list[float] | None = None, paths: list | None = None) -> float:
            if kind.startswith("saelens"):
                return saelens_fit(arch, vision, text, d_sae, k, batch, n, lr, density, st)
            return jsae_fit(arch, vision, text, d_sae, k, batch, n, lr, density, dense=kind.endswith("-dense"),
                            step_times=st, paths=paths)
        return call

    for kind in kinds:  # warm-up (allocator, thread pool, lazy imports)
        if warmup:
            fn(kind)(warmup)
    seconds: dict[str, list[float]] = {kind: [] for kind in kinds}
    steps_s: dict[str, list[float]] = {kind: [] for kind in kinds}
    paths: dict[str, list] = {kind: [] for kind in kinds}
    peak: dict[str, float] = {}
    mm = []
    for r in range(rounds):
        mm.append(time_matmul(2 * batch, d_in, d_sae))
        for kind in kinds:
            st: list[float] = []
            if r == 0:
                with PeakRSS() as p:
                    seconds[kind].append(fn(kind)(steps, st, paths[kind]))
                peak[kind] = p.growth_mib
            else:
                seconds[kind].append(fn(kind)(steps, st, paths[kind]))
            steps_s[kind] += st[1:] if len(st) > 1 else st  # the first step allocates Adam's moments
    mm.append(time_matmul(2 * batch, d_in, d_sae))
    unit = statistics.median(mm)
    out: dict[str, Any] = {"settings": dict(arch=arch, d_in=d_in, d_sae=d_sae, k=k if arch == "topk" else None,
                                            batch_pairs=batch, steps=steps, rounds=rounds, warmup=warmup, lr=lr,
                                            threads=threads, density_set=density, torch=torch.__version__,
                                            load_average_1min_start=load_start,
                                            load_average_1min_end=os.getloadavg()[0]),
                           "unit_ms": unit * 1e3, "unit_ms_all": [m * 1e3 for m in mm], "kinds": {}}
    for kind in kinds:
        med, best = statistics.median(steps_s[kind]), min(steps_s[kind])
        r = dict(step_seconds=steps_s[kind], fit_seconds=seconds[kind], step_ms=med * 1e3, best_step_ms=best * 1e3,
                 pairs_per_s=batch / med, units=med / unit, best_units=best / unit, peak_rss_growth_mib=peak[kind])
        if paths[kind]:
            timed = [p for i, p in enumerate(paths[kind]) if i % steps]  # the steps that were timed
            r["paths"] = sorted({p for p, _ in timed})
            dens = [d for _, d in timed if d is not None]
            r["density"] = statistics.median(dens) if dens else None
        out["kinds"][kind] = r
    base = out["kinds"].get(BASELINE[arch])
    if base:
        for r in out["kinds"].values():
            r["ratio_vs_saelens"] = r["pairs_per_s"] / base["pairs_per_s"]
            r["ratio_vs_saelens_best"] = base["best_step_ms"] / r["best_step_ms"]
    return out


def crossover(densities: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.3), d_in: int = 512, d_sae: int = 4096,
              batch: int = 1024, reps: int = 5, threads: int = 2) -> dict[str, Any]:
    """Where the ReLU fast path should switch: the median time of one paired forward + backward on sparse codes
    and on dense codes (``sparse_relu_max_density`` forced to 1 and to 0), interleaved, at each density."""
    import jsae  # noqa: F401
    from jsae.saes.joint_sae import MODALITIES, TrainingJointSAE, TrainingJointSAEConfig

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    vision, text = _pool(batch, d_in, seed=0)
    torch.manual_seed(0)
    sae = TrainingJointSAE(TrainingJointSAEConfig(d_in=d_in, d_sae=d_sae))
    coefficients = {"l1": 0.03, "alignment": 1.0, "aux": 0.0}
    rows = []
    for rho in densities:
        for m, x in zip(MODALITIES, (vision, text)):
            set_code_density(sae.W_enc_of(m), sae.b_enc_of(m), x - sae.b_dec_of(m), rho)
        times: dict[float, list[float]] = {1.0: [], 0.0: []}
        for _ in range(reps + 1):
            for forced in times:
                sae.sparse_relu_max_density = forced
                sae.zero_grad(set_to_none=True)
                t0 = time.perf_counter()
                sae.paired_forward_pass(vision, text, coefficients).loss.backward()
                times[forced].append(time.perf_counter() - t0)
        unit = time_matmul(2 * batch, d_in, d_sae)
        rows.append(dict(density=rho, sparse_ms=statistics.median(times[1.0][1:]) * 1e3,
                         dense_codes_ms=statistics.median(times[0.0][1:]) * 1e3, unit_ms=unit * 1e3))
    return {"settings": dict(d_in=d_in, d_sae=d_sae, batch_pairs=batch, reps=reps, threads=threads,
                             load_average_1min=os.getloadavg()[0]), "rows": rows}


def format_report(out: dict[str, Any]) -> str:
    s = out["settings"]
    dens = f", codes set to density {s['density_set']}" if s["density_set"] is not None else ""
    lines = [f"train throughput ({s['arch']}): d_in={s['d_in']} d_sae={s['d_sae']}"
             + (f" k={s['k']}" if s["k"] else "") + f" batch={s['batch_pairs']} pairs (SAELens: {2 * s['batch_pairs']} "
             f"vectors/step){dens}, {s['rounds']} rounds x {s['steps']} steps, {s['threads']} threads, torch {s['torch']}, "
             f"1-min load average {s['load_average_1min_start']:.2f} -> {s['load_average_1min_end']:.2f} (incl. this run)",
             f"unit (median): x[{2 * s['batch_pairs']},{s['d_in']}] @ W_enc[{s['d_in']},{s['d_sae']}] = {out['unit_ms']:.1f} ms",
             f"{'trainer':<18s}{'step ms':>10s}{'pairs/s':>10s}{'vs SAELens':>11s}{'units':>7s}{'best ms':>10s}{'vs SL':>7s}"
             f"{'units':>7s}{'peak MiB':>9s}  path (density)"]
    for kind, r in out["kinds"].items():
        path = ",".join(r.get("paths", [])) + (f" ({r['density']:.3f})" if r.get("density") is not None else "")
        lines.append(f"{kind:<18s}{r['step_ms']:>10.1f}{r['pairs_per_s']:>10.1f}{r.get('ratio_vs_saelens', float('nan')):>10.2f}x"
                     f"{r['units']:>7.2f}{r['best_step_ms']:>10.1f}{r.get('ratio_vs_saelens_best', float('nan')):>6.2f}x"
                     f"{r['best_units']:>7.2f}{r['peak_rss_growth_mib']:>9.0f}  {path}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="JSAE vs SAELens training throughput, same architecture")
    p.add_argument("--arch", choices=("relu", "topk"), default="relu")
    p.add_argument("--d-in", type=int, default=512)
    p.add_argument("--d-sae", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=1024, help="pairs per step (SAELens gets 2x vectors)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--density", type=float, default=None, help="ReLU: set the codes' density first (e.g. 0.02)")
    p.add_argument("--kinds", default=None, help="comma-separated subset of " + str(ARCH_KINDS))
    p.add_argument("--crossover", action="store_true", help="ReLU: time the sparse and dense-code passes by density")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    from jsae.files import write_json

    if a.crossover:
        out = crossover(d_in=a.d_in, d_sae=a.d_sae, batch=a.batch, threads=a.threads)
        print(f"forward + backward, sparse vs dense codes ({out['settings']})")
        for r in out["rows"]:
            print(f"density {r['density']:.2f}: sparse {r['sparse_ms']:.0f} ms, dense codes {r['dense_codes_ms']:.0f} ms "
                  f"(unit {r['unit_ms']:.0f} ms)")
        print(f"wrote {write_json(a.out or 'benchmarks/results/train_throughput_relu_crossover.json', out)}")
        return out
    out = run(a.arch, a.d_in, a.d_sae, a.k, a.batch, a.steps, a.rounds, a.warmup, threads=a.threads, density=a.density,
              kinds=tuple(a.kinds.split(",")) if a.kinds else None)
    print(format_report(out))
    dens = f"_rho{a.density:g}" if a.density is not None else ""
    path = a.out or f"benchmarks/results/train_throughput_{a.arch}_{a.d_in}x{a.d_sae}_b{a.batch}{dens}.json"
    print(f"wrote {write_json(path, out)}")  # atomic (tmp + rename), parent directories created
    return out


if __name__ == "__main__":
    main()
