"""The JSAE paper's protocol end to end on one VLM (``jsae demo``; by default the shipped toy LLaVA):
:func:`run_protocol` checks the settings (:mod:`jsae.protocol.config`), opens the run directory
(:func:`open_run`) and calls the stages of :mod:`jsae.protocol.stages` in order:

1. :func:`~jsae.protocol.stages.capture_stage` — pooled (image, caption) pairs at every layer, per data part;
2. :func:`~jsae.protocol.stages.train_stage` — every method of :mod:`jsae.protocol.methods` at every swept layer;
3. :func:`~jsae.protocol.stages.label_stage` — each SAE's features labelled on held-out pairs, SAE metrics, saved
   SAELens-style;
4. :func:`~jsae.protocol.stages.choose_concepts` — the concepts to sweep;
5. :func:`~jsae.protocol.stages.sweep_stage` — dose–response steering and suppression curves of every method's
   directions and of the oracle (difference of means) on a fixed strength grid (:mod:`jsae.protocol.sweep`);
6. :func:`~jsae.protocol.stages.statistics_stage` — r50, effect at a small strength and at matched preservation,
   image-bootstrap intervals, comparisons with the oracle (:mod:`jsae.protocol.stats`);
7. :func:`jsae.report.write_run_report` — ``report.md``, ``dose_response.png``, ``features.html`` read back
   from the run directory.

``ProtocolConfig(preset="reference")`` (``jsae demo --preset reference``) runs the JSAE reference code's
protocol as closely as this runner allows (:func:`~jsae.protocol.config.apply_preset`; the prompts by
:func:`~jsae.protocol.reference.reference_prompts`), and the report lists every remaining difference
(:func:`~jsae.protocol.reference.reference_differences`).

Writes into ``out`` (layout in :mod:`jsae.report.rundir`): ``run.json`` records the configuration and the
fingerprint of every data part, so that a directory holding another run, or the same run on other data, is
refused unless ``overwrite``.  A run grows in place by its :data:`~jsae.protocol.config.GROWABLE` settings
(reusing capture, SAEs and curves) and by its :data:`~jsae.protocol.config.SWEEP_ONLY` ones (reusing capture
and SAEs).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from jsae.data.sources import DataSource, check_fingerprint
from jsae.files import write_json
from jsae.protocol.config import (SWEEP_ONLY, ProtocolConfig, check_concepts, check_config, config_differences,
                                  config_record, data_source, default_layers, world_prompts)
from jsae.protocol.reference import reference_prompts
from jsae.protocol.stages import (captioner_for, capture_stage, choose_concepts, label_stage, layer_data, load_methods,
                                  statistics_stage, sweep_stage, train_stage)
from jsae.protocol.sweep import Curve
from jsae.report.rundir import RunDir

ARTEFACTS = ("report.md", "metrics.json", "dose_response.png", "features.html")


def open_run(out: Path, cfg: ProtocolConfig, source: DataSource, overwrite: bool, progress: bool = False) -> RunDir:
    """The run directory for ``cfg``: a new one, the same run to resume or to grow (other ``layers`` or
    ``concepts``, :data:`~jsae.protocol.config.GROWABLE`), or (``overwrite``) a replaced one; a directory holding
    a run with other settings (the error names them), or this run on other data, is refused — the settings are
    compared before the data is generated and fingerprinted."""
    from jsae.locks import LOCK_FILE

    run = RunDir(out)
    config = config_record(cfg)
    old = None
    if out.exists() and any(f.name != LOCK_FILE for f in out.iterdir()):
        if not run.exists() and not overwrite:
            raise FileExistsError(f"{out} is not empty and holds no jsae run; choose a new --out or pass --overwrite")
        if run.exists() and not overwrite:
            old = run.run_info()
            diff = config_differences(old.get("config") or {}, config)
            if diff:
                raise FileExistsError(f"{out} holds a run with other settings ({'; '.join(diff)}); a run grows in "
                                      "place only by --layers, --concepts and the sweep's own options ("
                                      f"{', '.join('--' + g.replace('_', '-') for g in SWEEP_ONLY if g != 'gen_batch')}):"
                                      " pass its other options as they were, --overwrite to replace it, or a new --out")
    if progress:
        tqdm.write(f"{'checking the data against the run in ' + str(out) if old else 'preparing the data'}: generating "
                   f"and fingerprinting the {' / '.join(source.parts)} pairs (this can take a minute)")
    from jsae.parallel import forked_map, workers

    n = workers()  # the parts made by two processes where the machine has a core for each (the same rows)
    fingerprints = source.prepare(lambda fn, spans, done: forked_map(fn, spans, n, done))
    if old is not None:
        for part, fp in fingerprints.items():
            check_fingerprint(old.get("data", {}).get(part), fp, f"the run in {out} ({part} part)",
                              "pass --overwrite to redo it or choose a new --out")
    if overwrite and out.exists():
        _empty(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(run.run_file, {"config": config, "data": fingerprints, "started": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return run


def _empty(out: Path) -> None:
    """Remove everything in ``out`` but its lock file (held by this process)."""
    from jsae.locks import LOCK_FILE

    for f in out.iterdir():
        if f.name == LOCK_FILE:
            continue
        if f.is_dir() and not f.is_symlink():
            shutil.rmtree(f)
        else:
            f.unlink()


# ---- the runner ---------------------------------------------------------------------------------------


def run_protocol(out: str | Path, cfg: ProtocolConfig | None = None, overwrite: bool = False, progress: bool = True,
                 scores_out: bool = False) -> dict[str, Any]:
    """Run the protocol into ``out``; returns the metrics (with the curves under ``"_curves"`` if ``scores_out``).

    ``out`` is checked before anything is loaded and locked for the run (a second run on it gets a one-line
    error naming this process's pid).  A run that fails in a new (or empty) ``out`` removes what it wrote, so
    the corrected retry starts clean; an interrupted one (Ctrl-C, a kill) leaves it to resume."""
    from jsae.guards import check_output_dir
    from jsae.locks import LOCK_FILE, DirLock

    cfg = cfg or ProtocolConfig()
    check_config(cfg)
    out = check_output_dir(out, "--out")
    created = not out.exists()
    fresh = created or not any(f.name != LOCK_FILE for f in out.iterdir())
    try:
        with DirLock(out, "jsae demo run"):
            try:
                return _run_protocol(out, cfg, overwrite, progress, scores_out)
            except Exception:
                if fresh:
                    _empty(out)
                raise
    except Exception:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _cpu() -> float:
    """CPU seconds of this process and of its ended worker processes (the stages' forked workers)."""
    t = os.times()
    return time.process_time() + t.children_user + t.children_system


def _run_protocol(out: Path, cfg: ProtocolConfig, overwrite: bool, progress: bool, scores_out: bool) -> dict[str, Any]:
    from jsae.report import write_run_report
    from jsae.vlm import load_vlm

    t0, c0 = time.time(), _cpu()
    timings: dict[str, float] = {}
    vlm = load_vlm(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map)
    from jsae.protocol.sweep import POSITION_SETS

    every_step = any(tm == "every_step" for p in cfg.positions for _, tm in POSITION_SETS[p])
    layers = cfg.layers or default_layers(vlm.adapter.n_layers, cfg.n_sweep_layers, last=every_step)
    for layer in layers:
        vlm.adapter.check_layer(layer)
    cfg, prompt_notes = reference_prompts(cfg, vlm.processor, vlm.adapter)
    cfg = world_prompts(cfg, vlm.processor)
    source = data_source(cfg)
    if cfg.text_source == "generated":  # the text view pools captions the model itself produces
        caption = captioner_for(cfg, vlm)
        for part in ("train", "label"):
            source.with_captions(part, caption([ex["image"] for ex in source.items(part)], []))
    run = open_run(Path(out), cfg, source, overwrite, progress)  # refuses another run before anything is written
    previous = _previous_run(run, cfg) if not overwrite else None

    captures = capture_stage(run, cfg, vlm, source, progress=progress)
    timings["capture_s"], timings["capture_cpu_s"] = time.time() - t0, _cpu() - c0
    judge = source.judge(vlm.model, vlm.processor)
    if cfg.concepts:
        check_concepts(cfg.concepts, judge.concepts, "the labelling data's")
    kept = [L for L in layers if previous and L in previous["layers"]
            and all((run.sae_dir(m, L) / "cfg.json").is_file() for m in cfg.methods)]
    new = [L for L in layers if L not in kept]
    if kept and progress:
        tqdm.write(f"growing the run in {out}: reusing the capture and the SAEs of layer(s) {kept}"
                   + (f"; training layer(s) {new}" if new else ""))
    methods_by_layer, data = train_stage(cfg, vlm, captures, new, progress)
    labels_by_layer, sae_rows = label_stage(run, source, methods_by_layer, data, vlm, cfg)
    for L in kept:
        methods_by_layer[L], data[L] = load_methods(run, L, cfg.methods), layer_data(captures, L)
    sae_rows = sorted(sae_rows + [r for r in (previous or {}).get("saes", []) if r["layer"] in kept],
                      key=lambda r: (layers.index(r["layer"]), list(cfg.methods).index(r["method"])))
    methods_by_layer = {L: methods_by_layer[L] for L in layers}
    timings["train_label_s"] = time.time() - t0 - timings["capture_s"]
    timings["train_label_cpu_s"] = _cpu() - c0 - timings["capture_cpu_s"]
    items = source.items("train" if cfg.reference_faults else "eval")  # the reference evaluates on training images
    concepts, dropped = choose_concepts(cfg, judge, items)
    same_sweep = previous is not None and all((previous.get("config") or {}).get(k) == config_record(cfg).get(k)
                                              for k in SWEEP_ONLY)
    old_curves = _previous_curves(previous, kept, concepts) if same_sweep else {}
    curves, skipped, norms = [], dict((previous or {}).get("skipped", {}) if same_sweep else {}), {}
    todo = [(new, concepts)] + [([L], [c for c in concepts if (L, c) not in old_curves]) for L in kept]
    for todo_layers, todo_concepts in todo:
        if todo_layers and todo_concepts:
            c, _, sk, nm = sweep_stage(cfg, vlm, judge, source, methods_by_layer, data, todo_layers, todo_concepts,
                                       items, progress)
            curves += c
            skipped.update(sk)
            norms.update(nm)
    for L in kept:
        if str(L) in (previous or {}).get("token_norms", {}):
            norms.setdefault(L, float(previous["token_norms"][str(L)]))
        curves += [c for (layer, concept), cs in old_curves.items() if layer == L and concept in concepts for c in cs]
    curves.sort(key=lambda c: (layers.index(c.layer), concepts.index(c.concept)))
    norms = {L: norms[L] for L in layers}
    if kept and progress:
        tqdm.write(f"reused {sum(len(v) for v in old_curves.values())} curves of layer(s) {kept}")
    timings["sweep_s"] = time.time() - t0 - timings["capture_s"] - timings["train_label_s"]
    timings["sweep_cpu_s"] = _cpu() - c0 - timings["capture_cpu_s"] - timings["train_label_cpu_s"]
    timings["total_s"] = time.time() - t0  # capture to statistics (the report is written from the files after)
    timings["total_cpu_s"] = _cpu() - c0  # CPU time of this process and its workers: what a stage costs beside other jobs
    metrics = statistics_stage(cfg, judge, vlm.adapter.n_layers, layers, concepts, sae_rows, curves, timings, prompt_notes,
                               skipped, norms, dropped)
    write_json(run.metrics_file, metrics)
    write_run_report(run, vlm, source.pairs("label"))
    if scores_out:
        metrics["_curves"] = curves
    return metrics


def _previous_run(run: RunDir, cfg: ProtocolConfig) -> dict[str, Any] | None:
    """The metrics of the finished run in ``run`` that this one grows (the same settings but for
    :data:`~jsae.protocol.config.GROWABLE`; :func:`open_run` has checked them and the data), else None."""
    try:
        metrics = run.metrics()
    except (FileNotFoundError, ValueError):
        return None
    return metrics if not config_differences(metrics.get("config") or {}, config_record(cfg)) else None


def _previous_curves(previous: dict[str, Any] | None, layers: list[int],
                     concepts: list[str]) -> dict[tuple[int, str], list[Curve]]:
    """The curves of a previous run at ``layers`` and ``concepts``, by (layer, concept); none from a run written
    before the per-image scores were kept in full."""
    from jsae.protocol.sweep import Curve

    out: dict[tuple[int, str], list[Curve]] = {}
    if not previous:
        return out
    try:
        for rec, sc in zip(previous["curves"], previous["scores"]):
            if rec["layer"] in layers and rec["concept"] in concepts:
                out.setdefault((rec["layer"], rec["concept"]), []).append(Curve.from_metrics(rec, sc))
    except KeyError:
        return {}
    return out


__all__ = ["ARTEFACTS", "open_run", "run_protocol"]
