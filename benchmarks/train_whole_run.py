"""Whole training runs from initialisation: the JSAE trainer against SAELens's trainer of the same architecture.

``python benchmarks/train_whole_run.py --arch relu --steps 2000`` (defaults: d_in 512, d_sae 4096, 1024 pairs a
step, 2 threads, both OpenMP wait policies).  What is measured, exactly:

* **Trainers, library defaults, from initialisation.**  JSAE: ``JointSAETrainer(TrainingJointSAE(
  TrainingJointSAEConfig(d_in, d_sae[, activation="topk", k])), JointTrainerConfig(total_steps=steps, lr),
  PairedTensorData(vision, text, batch)).fit()`` (its defaults otherwise: logging every 10 steps, clipping, Adam,
  decoder normalisation, dead-latent statistics).  SAELens: ``SAETrainer(SAETrainerConfig(...),
  StandardTrainingSAE(l1_coefficient=0.03) | TopKTrainingSAE(k), data_provider).fit()`` fed both modalities of
  the same pairs (``2 * batch`` vectors a step, as many as a JSAE step).  Nothing is prepared: the codes start at
  the density of the initialisation (~50% for ReLU) and fall as the L1 term bites.
* **Data** (``--data``): ``structured`` (default): pairs from :class:`jsae.protocol.synthetic.PairedSyntheticData`
  (sparse shared and private dictionary features, ``--features`` of each, firing with probability 0.02, plus
  offsets and noise), so an L1-trained SAE has sparse codes to find; ``gaussian``: unstructured Gaussian pairs
  (the codes of an L1-trained SAE stay dense longer); ``capture:DIR``: the pooled activations of a ``jsae run
  capture`` directory (``--layer``), at that model's width.
* **Interleaved, one step each.**  Both trainers' real ``fit()`` run in one process, each in its own Python
  thread, and a baton lets exactly one of them compute at a time: a trainer hands the baton over each time it
  asks its data for the next batch, so the two runs alternate step by step and see the same machine load.
  **step** = the time from receiving the baton to asking for the next batch (forward, backward, clipping, Adam,
  the trainer's bookkeeping and logging; waiting excluded).  **total** = the sum of a run's steps.
* **unit** = the median time of one dense encoder matmul ``x [2 * batch, d_in] @ W_enc [d_in, d_sae]`` (both
  modalities of a step), as in ``train_throughput.py``, timed every ``--unit-every`` steps between the two
  trainers' steps; a step's units are its time over the latest unit.
* **density**: the JSAE's measured fraction of active codes (ReLU: the path's own measurement, the higher of the
  two modalities; TopK: k / d_sae) and SAELens's (measured every ``--unit-every`` steps from its codes, that time
  not counted in its step).  **phases**: the steps at JSAE code density above 10% and at or below it; per phase
  the mean step of each trainer, in ms and in units, and their ratio.  **by path** (``path_phases``): a JSAE's steps
  on each path it took (dense codes, sparse), each against SAELens's steps of the same numbers.  A kind
  ``jsae-relu@0.1x2`` is the JSAE with the ReLU switch fixed at density 0.1 and stay factor 2 (default: by width).
* **Wait policies** (``--policies spin,passive``): one child process per policy (OpenMP reads
  ``OMP_WAIT_POLICY`` once, at start): ``spin`` = the variable unset (OpenMP's default, what a Python user
  gets), ``passive`` = ``OMP_WAIT_POLICY=PASSIVE``.  The 1-minute load average is recorded at each child's start
  and end.

Results go to ``benchmarks/results/train_whole_run_{arch}_{d_in}x{d_sae}_b{batch}_s{steps}.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

DENSE_PHASE = 0.1  # the JSAE code density above which a step belongs to the "dense" phase


def time_unit(n: int, d_in: int, d_sae: int) -> float:
    """The unit: ``train_throughput.time_matmul`` (imported here, in the child, so the parent never loads torch)."""
    from train_throughput import time_matmul

    return time_matmul(n, d_in, d_sae, reps=3)


def load_pairs(data: str, d_in: int, rows: int, features: int, layer: int | None) -> tuple[Any, Any]:
    import torch

    if data == "structured":
        from jsae.protocol.synthetic import PairedSyntheticData

        gen = PairedSyntheticData(d_in=d_in, n_shared=features, n_private=features, shared_firing_prob=0.02,
                                  private_firing_prob=0.02, seed=0)
        s = gen.sample(rows, seed=0)
        return s.vision.contiguous(), s.text.contiguous()
    if data == "gaussian":
        g = torch.Generator().manual_seed(0)
        return torch.randn(rows, d_in, generator=g), torch.randn(rows, d_in, generator=g) + 0.5
    if data.startswith("capture:"):
        from jsae.capture import read_layer

        v, t, _ = read_layer(data.removeprefix("capture:"), layer)
        return v.contiguous(), t.contiguous()
    raise SystemExit(f"--data must be structured, gaussian or capture:DIR, got {data!r}")


class Baton:
    """Lets the registered runners compute one at a time, in turn; a runner that finished leaves the rotation.
    Every ``unit_every`` rounds the unit matmul is timed between two runners' steps."""

    def __init__(self, names: list[str], unit_every: int, unit_shape: tuple[int, int, int]):
        self.order, self.turn, self.cond = list(names), names[0], threading.Condition()
        self.rounds, self.unit_every, self.unit_shape = 0, unit_every, unit_shape
        self.units: list[tuple[int, float]] = []  # (round, seconds)

    def wait(self, name: str) -> None:
        with self.cond:
            self.cond.wait_for(lambda: self.turn == name)

    def hand_over(self, name: str, finished: bool = False) -> None:
        with self.cond:
            i = self.order.index(name)
            if i == len(self.order) - 1:
                self.rounds += 1
                if self.rounds % self.unit_every == 0 or not self.units:
                    self.units.append((self.rounds, time_unit(*self.unit_shape)))
                if self.rounds % 100 == 0:  # progress, for long runs
                    print(f"round {self.rounds}, load {os.getloadavg()[0]:.2f}, {time.strftime('%H:%M:%S')}",
                          file=sys.stderr, flush=True)
            if finished:
                self.order.remove(name)
                i -= 1
            if self.order:
                self.turn = self.order[(i + 1) % len(self.order)]
            self.cond.notify_all()


class Runner:
    """One trainer in its thread: times its steps between baton hand-overs."""

    def __init__(self, name: str, baton: Baton, threads: int):
        self.name, self.baton, self.threads = name, baton, threads
        self.steps: list[float] = []
        self.excluded = 0.0  # measurement work done inside a step, not counted in it
        self.density: list[tuple[int, float]] = []
        self.loss: list[tuple[int, float]] = []
        self.setup = 0.0
        self.error: BaseException | None = None

    def batches(self, source: Iterator[Any]) -> Iterator[Any]:
        """Wrap a batch iterator: each request closes the current step and hands the baton over."""
        for batch in source:
            now = time.perf_counter()
            if self._start is None:  # the first request ends the trainer's set-up
                self.setup = now - self._t0
            else:
                self.steps.append(now - self._start - self.excluded)
            self.excluded = 0.0
            self.baton.hand_over(self.name)
            self.baton.wait(self.name)
            self._start = time.perf_counter()
            yield batch

    def run(self, fit: Any) -> None:
        import torch

        torch.set_num_threads(self.threads)  # per thread (OpenMP's setting is the calling thread's)
        torch.set_flush_denormal(True)  # per thread; the JSAE trainer sets it itself, SAELens's gets it here
        self._start: float | None = None
        try:
            self.baton.wait(self.name)
            self._t0 = time.perf_counter()
            fit()
            self.steps.append(time.perf_counter() - self._start - self.excluded)  # type: ignore[operator]
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            self.error = exc
        finally:
            self.baton.hand_over(self.name, finished=True)


def saelens_runner(runner: Runner, arch: str, vision: Any, text: Any, d_sae: int, k: int, batch: int, steps: int,
                   lr: float, every: int) -> Any:
    import torch
    from train_throughput import saelens_trainer  # the baseline's one set-up (in the child, like time_unit)

    trainer = saelens_trainer(arch, vision, text, d_sae, k, batch, steps, lr, wrap=runner.batches)
    inner = trainer.step

    def step(batch_: Any) -> Any:  # SAELens's step, plus a density / loss sample every `every` steps (not timed)
        out = inner(batch_)
        n = trainer.n_training_steps
        if n % every == 0 or n == steps - 1:
            t0 = time.perf_counter()
            with torch.no_grad():
                runner.density.append((n, float((out.feature_acts > 0).float().mean())))
                runner.loss.append((n, float(out.loss.detach())))
            runner.excluded += time.perf_counter() - t0
        return out

    trainer.step = step  # type: ignore[method-assign]
    return lambda: (trainer.fit(), _check(trainer.n_training_steps, steps))


def jsae_runner(runner: Runner, arch: str, vision: Any, text: Any, d_sae: int, k: int, batch: int, steps: int,
                lr: float, every: int, dense: bool = False, switch: tuple[float, float] | None = None) -> Any:
    import torch
    from jsae.saes.joint_sae import TrainingJointSAE, TrainingJointSAEConfig
    from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData

    extra = {"activation": "topk", "k": k} if arch == "topk" else {}
    torch.manual_seed(0)
    sae = TrainingJointSAE(TrainingJointSAEConfig(d_in=vision.shape[1], d_sae=d_sae, **extra))
    if switch is not None:  # a kind "jsae-relu@S" or "@SxF": the ReLU path's switch density S (and stay factor F)
        sae.sparse_relu_max_density = switch[0]
        if switch[1] is not None:
            sae.sparse_relu_stay_factor = switch[1]
    data = PairedTensorData(vision, text, batch, seed=0)

    class Data:  # the trainer's data, its batches requested through the runner
        def __len__(self) -> int:
            return len(data)

        def batches(self, start: int = 0) -> Iterator[Any]:
            return runner.batches(data.batches(start))

    trainer = JointSAETrainer(sae, JointTrainerConfig(total_steps=steps, lr=lr, progress=False), Data())
    inner = sae.paired_forward_pass
    count = [0]

    def forward(*args: Any, **kwargs: Any) -> Any:  # record the measured density (or the path's, when known)
        out = inner(*args, **kwargs, dense=dense) if dense else inner(*args, **kwargs)
        n = count[0]
        count[0] += 1
        if out.density is not None:
            runner.density.append((n, out.density))
        elif arch == "topk":
            runner.density.append((n, k / d_sae))
        elif n % every == 0 or n == steps - 1:
            t0 = time.perf_counter()
            with torch.no_grad():
                runner.density.append((n, max(float((z > 0).float().mean()) for z in out.feature_acts.values())))
            runner.excluded += time.perf_counter() - t0
        if n % every == 0 or n == steps - 1:
            t0 = time.perf_counter()
            runner.loss.append((n, float(out.loss.detach())))
            runner.excluded += time.perf_counter() - t0
        runner.path = getattr(runner, "path", [])
        runner.path.append(out.path)
        return out

    sae.paired_forward_pass = forward  # type: ignore[method-assign]
    return lambda: (trainer.fit(resume=False), _check(trainer.step, steps))


def _switch(kind: str) -> tuple[float, float | None] | None:
    """``jsae-relu@0.1x2`` -> (0.1, 2.0): a JSAE kind with a fixed ReLU switch density and stay factor (None: the
    library's); None for a kind without ``@`` (the library's switch by width)."""
    if "@" not in kind:
        return None
    rho, _, factor = kind.split("@", 1)[1].partition("x")
    try:
        switch = float(rho), float(factor) if factor else None
    except ValueError:
        switch = (-1.0, None)
    if not (0 <= switch[0] <= 1 and (switch[1] is None or switch[1] >= 1)):
        raise ValueError(f"--kinds: {kind!r}: a switch is @DENSITY (0..1) or @DENSITYxFACTOR (factor >= 1), "
                         "e.g. jsae-relu@0.1x2")
    return switch


def _check(done: int, steps: int) -> None:
    if done != steps:
        raise RuntimeError(f"the trainer ran {done} steps, not {steps}")


KINDS = {"relu": ("saelens-standard", "jsae-relu"), "topk": ("saelens-topk", "jsae-topk")}


def child(a: argparse.Namespace) -> dict[str, Any]:
    """One policy: both trainers' whole runs, interleaved step by step, in this process."""
    import torch

    torch.set_num_threads(a.threads)
    load_start = os.getloadavg()[0]
    vision, text = load_pairs(a.data, a.d_in, a.rows, a.features, a.layer)
    d_in = vision.shape[1]
    kinds = tuple(a.kinds.split(",")) if a.kinds else KINDS[a.arch]
    baton = Baton(list(kinds), a.unit_every, (2 * a.batch, d_in, a.d_sae))
    runners, threads = {}, []
    for kind in kinds:
        r = Runner(kind, baton, a.threads)
        if kind.startswith("saelens"):
            fit = saelens_runner(r, a.arch, vision, text, a.d_sae, a.k, a.batch, a.steps, a.lr, a.unit_every)
        else:
            fit = jsae_runner(r, a.arch, vision, text, a.d_sae, a.k, a.batch, a.steps, a.lr, a.unit_every,
                              dense=kind.endswith("-dense"), switch=_switch(kind))
        runners[kind] = r
        threads.append(threading.Thread(target=r.run, args=(fit,), name=kind))
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    last = t0
    for t in threads:
        while t.is_alive():
            t.join(timeout=min(10.0, a.partial_every))
            if a.partial and time.perf_counter() - last >= a.partial_every and t.is_alive():
                last = time.perf_counter()
                done = min(len(r.steps) for r in runners.values())
                if done >= 2:  # the steps both trainers have finished, summarised as if the run stopped there
                    from jsae.files import write_json

                    part = summarise(a, kinds, runners, baton.units[:], last - t0, load_start, done, d_in)
                    write_json(a.partial, {a.policy: {**part, "partial": {"steps_done": done, "of": a.steps}}})
    wall = time.perf_counter() - t0
    for r in runners.values():
        if r.error is not None:
            raise r.error
    return summarise(a, kinds, runners, baton.units, wall, load_start, a.steps, d_in)


def summarise(a: argparse.Namespace, kinds: tuple[str, ...], runners: dict[str, "Runner"], units: list[tuple[int, float]],
              wall: float, load_start: float, steps: int, d_in: int) -> dict[str, Any]:
    """The record of a policy's run over its first ``steps`` steps (all of them, or a partial snapshot's)."""
    import torch

    unit_all = [u for _, u in units]

    def unit_at(step: int) -> float:  # the latest unit timed at or before this step's round
        best = units[0][1]
        for rnd, u in units:
            if rnd <= step + 1:
                best = u
        return best

    out: dict[str, Any] = {"settings": dict(policy=a.policy, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                                            arch=a.arch, d_in=d_in, d_sae=a.d_sae, k=a.k if a.arch == "topk" else None,
                                            batch_pairs=a.batch, steps=steps, lr=a.lr, threads=a.threads, data=a.data,
                                            torch=torch.__version__, load_average_1min_start=load_start,
                                            load_average_1min_end=os.getloadavg()[0], wall_seconds=wall),
                           "unit_ms": statistics.median(unit_all) * 1e3, "units_ms": [(r, u * 1e3) for r, u in units],
                           "kinds": {}}
    jsae_kind = next(k for k in kinds if k.startswith("jsae"))
    jd = dict(runners[jsae_kind].density[:])
    dense_steps = [i for i in range(steps) if jd.get(i, 1.0) > DENSE_PHASE]
    phases = {"dense (>10%)": set(dense_steps), "sparse (<=10%)": set(range(steps)) - set(dense_steps)}
    for kind, r in runners.items():
        steps_s = list(r.steps[:steps])
        per_unit = [s / unit_at(i) for i, s in enumerate(steps_s)]
        rec: dict[str, Any] = dict(total_seconds=sum(steps_s), setup_seconds=r.setup, mean_step_ms=statistics.mean(steps_s) * 1e3,
                                   median_step_ms=statistics.median(steps_s) * 1e3, mean_units=statistics.mean(per_unit),
                                   step_ms=[s * 1e3 for s in steps_s], density=[d for d in r.density[:] if d[0] < steps], loss=[x for x in r.loss[:] if x[0] < steps], phases={})
        if hasattr(r, "path"):
            path = r.path[:steps]
            rec["paths"] = {p: path.count(p) for p in sorted(set(path))}
            base_steps = runners[next(k for k in kinds if k.startswith("saelens"))].steps[:steps]
            rec["path_phases"] = {}  # the steps this trainer ran on each path, against SAELens's same steps
            for p in rec["paths"]:
                sel = [i for i, q in enumerate(path) if q == p and i < len(steps_s) and i < len(base_steps)]
                if sel:
                    rec["path_phases"][p] = dict(steps=len(sel), first=sel[0], last=sel[-1],
                                                 mean_step_ms=statistics.mean(steps_s[i] for i in sel) * 1e3,
                                                 mean_units=statistics.mean(per_unit[i] for i in sel),
                                                 ratio_vs_saelens=sum(base_steps[i] for i in sel) / sum(steps_s[i] for i in sel))
        for phase, idx in phases.items():
            sel = [i for i in sorted(idx) if i < len(steps_s)]
            if sel:
                rec["phases"][phase] = dict(steps=len(sel), first=sel[0], mean_step_ms=statistics.mean(steps_s[i] for i in sel) * 1e3,
                                            mean_units=statistics.mean(per_unit[i] for i in sel))
        out["kinds"][kind] = rec
    base = out["kinds"][next(k for k in kinds if k.startswith("saelens"))]
    for rec in out["kinds"].values():
        rec["ratio_vs_saelens"] = base["total_seconds"] / rec["total_seconds"]
        for phase, p in rec["phases"].items():
            if phase in base["phases"]:
                p["ratio_vs_saelens"] = base["phases"][phase]["mean_step_ms"] / p["mean_step_ms"]
    return out


def _trajectory(density: list[tuple[int, float]], steps: int, points: int = 6) -> str:
    d = dict(density)
    marks = sorted({min(steps - 1, round(i * (steps - 1) / (points - 1))) for i in range(points)})
    got = []
    for m in marks:
        near = min(d, key=lambda s: abs(s - m)) if d else None
        if near is not None:
            got.append(f"{near}:{d[near]:.3f}")
    return " ".join(got)


def format_report(out: dict[str, Any]) -> str:
    s = out["settings"]
    lines = [f"whole run ({s['arch']}, policy {s['policy']}): d_in={s['d_in']} d_sae={s['d_sae']}" + (f" k={s['k']}" if s["k"] else "")
             + f" batch={s['batch_pairs']} pairs, {s['steps']} steps from initialisation, data {s['data']}, {s['threads']} threads,"
             f" 1-min load {s['load_average_1min_start']:.2f} -> {s['load_average_1min_end']:.2f}, wall {s['wall_seconds']:.0f} s",
             f"unit (median of {len(out['units_ms'])}): {out['unit_ms']:.1f} ms",
             f"{'trainer':<18s}{'total s':>9s}{'vs SAELens':>11s}{'units/step':>11s}   phases (steps: ms, units, vs SAELens)"]
    for kind, r in out["kinds"].items():
        ph = "; ".join(f"{name} {p['steps']} from {p['first']}: {p['mean_step_ms']:.0f} ms, {p['mean_units']:.2f} u, "
                       f"{p.get('ratio_vs_saelens', float('nan')):.2f}x" for name, p in r["phases"].items())
        lines.append(f"{kind:<18s}{r['total_seconds']:>9.1f}{r['ratio_vs_saelens']:>10.2f}x{r['mean_units']:>11.2f}   {ph}")
        lines.append(f"{'':<18s}density (step:value) {_trajectory(r['density'], s['steps'])}"
                     + (f"; paths {r['paths']}" if r.get("paths") else ""))
        if r.get("path_phases"):
            lines.append(f"{'':<18s}by path: " + "; ".join(
                f"{name} {p['steps']} (steps {p['first']}-{p['last']}): {p['mean_step_ms']:.0f} ms, {p['mean_units']:.2f} u, "
                f"{p['ratio_vs_saelens']:.2f}x" for name, p in r["path_phases"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="JSAE vs SAELens whole training runs from initialisation, interleaved "
                                            "step by step, under both OpenMP wait policies")
    p.add_argument("--arch", choices=("relu", "topk"), default="relu")
    p.add_argument("--d-in", type=int, default=512, help="width of the structured / Gaussian data (>= 1)")
    p.add_argument("--d-sae", type=int, default=4096, help="latents (>= 1)")
    p.add_argument("--k", type=int, default=32, help="TopK's k (>= 1)")
    p.add_argument("--batch", type=int, default=1024, help="pairs per step (>= 1); SAELens gets 2x vectors")
    p.add_argument("--steps", type=int, default=2000, help="steps of each run (>= 2)")
    p.add_argument("--lr", type=float, default=3e-4, help="learning rate of both trainers (> 0)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (>= 1)")
    p.add_argument("--unit-every", type=int, default=25, help="steps between unit timings (>= 1)")
    p.add_argument("--rows", type=int, default=16384, help="pairs of structured / Gaussian data (>= batch)")
    p.add_argument("--features", type=int, default=1024, help="structured data: shared and private features each (>= 1)")
    p.add_argument("--data", default="structured", help="structured | gaussian | capture:DIR")
    p.add_argument("--layer", type=int, default=None, help="capture:DIR: the layer (default: its first)")
    p.add_argument("--kinds", default=None, help="comma-separated trainers (default: SAELens and the JSAE of --arch; "
                                                 "add jsae-relu-dense / jsae-topk-dense for the plain-autograd path, "
                                                 "jsae-relu@0.1x2 for a ReLU switch at density 0.1 with stay factor 2)")
    p.add_argument("--policies", default="spin,passive", help="comma-separated OpenMP wait policies: spin, passive")
    p.add_argument("--policy", default=None, help=argparse.SUPPRESS)  # set in a child process
    p.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    p.add_argument("--partial", default=None, help="write a snapshot of the steps done so far to this JSON file "
                   "every --partial-every seconds (for runs that may not finish)")
    p.add_argument("--partial-every", type=float, default=300.0, help="seconds between snapshots (> 0)")
    a = p.parse_args(argv)
    for name, low in (("d_in", 1), ("d_sae", 1), ("k", 1), ("batch", 1), ("steps", 2), ("threads", 1), ("unit_every", 1),
                      ("features", 1)):
        if getattr(a, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(a, name)}")
    if not a.lr > 0:
        p.error(f"--lr must be > 0, got {a.lr}")
    if not a.partial_every > 0:
        p.error(f"--partial-every must be > 0, got {a.partial_every}")
    if a.rows < a.batch:
        p.error(f"--rows ({a.rows}) must be at least --batch ({a.batch})")
    if a.arch == "topk" and a.k > a.d_sae:
        p.error(f"--k ({a.k}) must be at most --d-sae ({a.d_sae})")
    for kind in (a.kinds.split(",") if a.kinds else []):
        try:
            _switch(kind)
        except ValueError as exc:
            p.error(str(exc))
    policies = a.policies.split(",")
    if any(x not in ("spin", "passive") for x in policies):
        p.error(f"--policies takes spin and/or passive, got {a.policies!r}")
    if a.policy is not None:  # the child: one policy, results to a file
        out = child(a)
        Path(a.child_out).write_text(json.dumps(out))
        return out
    from jsae.files import write_json

    results: dict[str, Any] = {}
    for policy in policies:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        if policy == "passive":
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        with tempfile.TemporaryDirectory() as tmp:
            res = Path(tmp) / "out.json"
            args = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--policy", policy,
                    "--child-out", str(res)]
            subprocess.run(args, env=env, check=True)
            results[policy] = json.loads(res.read_text())
        print(format_report(results[policy]), flush=True)
    path = a.out or f"benchmarks/results/train_whole_run_{a.arch}_{a.d_in}x{a.d_sae}_b{a.batch}_s{a.steps}.json"
    print(f"wrote {write_json(path, results)}")  # atomic (tmp + rename)
    return results


if __name__ == "__main__":
    main()
