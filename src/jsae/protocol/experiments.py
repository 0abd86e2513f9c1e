"""The JSAE reference's steering experiments, run soundly (and, on request, with the reference's faults replayed).

The reference (``src/analyze_ablation_generate_metrics.py``) reads a table of experiments — a layer, JSAE latent
ids, target keywords, a target sentence, an image — captions each image greedily (50 new tokens) unsteered,
then for α = 0.2, 0.4, …, 3.0 adds ``α · Σ_j W_dec_text[j] / ‖W_dec_text[j]‖`` (the *text* decoder's unit rows
of the latents) at the image tokens at prefill and at every generated token, and scores the steered caption
(:func:`~jsae.protocol.reference_metrics.caption_metrics`: keyword hit, SBERT similarity gain to the target,
GPT-2 perplexity, distinct-3, zlib ratio).

:func:`run_experiments` does the same steering, the **sound** way by default: every α of the grid on every
image (one batch per experiment holds every (α, image) row, each with its own strength), and per α the mean
over images of every metric.  No α is chosen, least of all with the evaluation metric.

With ``reference_faults=True`` it also replays, per image, the reference's upward walk over the same
captions (greedy captions do not depend on the walk) with its stopping rules, in its order:

(a) stop when the similarity gain decreased from the previous α while it is > 0.1 (α chosen per image with
    the evaluation metric);
(b) stop when ``prev_ppl - ppl > 10`` (a perplexity *drop*: the sign of "rose by more than 10" reversed) or
    ``ppl > 40`` — never at the first α, which has no ``prev_ppl``;
(d) stop when the similarity gain is < -0.2 at this α and at the previous one;
(c) stop when distinct-3 < 0.3 and the reference's compression ratio (compressed / raw bytes) < 0.3;

an empty caption skips its α; the metrics reported are those of the last α not stopped.  Rules needing the
similarity or perplexity model are skipped when it is not given (``config.reference_rules``).  The result
names each fault (:data:`FAULTS`) with how often it fired and, for contrast, the same statistic on the
sound grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from jsae.data.judges import compression_ratio, distinct_3
from jsae.protocol.reference_metrics import (
    Experiment,
    caption_metrics,
    keyword_hit,
    read_experiment_table,
)
from jsae.report.markdown import experiments_markdown
from jsae.protocol.reference import REFERENCE_ALPHAS, REFERENCE_CAPTION_PROMPT
from jsae.protocol.sweep import POSITION_SETS, steer_interventions
from jsae.saes.metrics import summed_unit_rows

#: The reference faults :func:`run_experiments` reproduces with ``reference_faults=True``.
FAULTS = {
    "alpha_by_eval_metric": "rule (a): the walk stops when the similarity gain (the evaluation metric) starts to "
                            "decrease while > 0.1, so α is picked per image with the evaluation metric",
    "perplexity_rule_sign_reversed": "rule (b): the walk stops when prev_ppl - ppl > 10 (perplexity dropped by more "
                                     "than 10; the intended rule is a rise of more than 10) or ppl > 40",
    "last_not_best": "the walk reports the metrics of the last α not stopped, not of the best α walked",
}
RULES = {"a": "similarity gain decreased while > 0.1", "b_drop": "perplexity dropped by more than 10 (sign-reversed)",
         "b_over_40": "perplexity > 40", "d": "similarity gain < -0.2 twice in a row",
         "c": "distinct-3 < 0.3 and compression ratio < 0.3"}


# ---------------------------------------------------------------------------------------------------------------
# per-caption scores
# ---------------------------------------------------------------------------------------------------------------


def reference_repetition(text: str) -> tuple[float, float]:
    """The reference's ``evaluate_repetition`` of one caption: (:func:`~jsae.data.judges.distinct_3`,
    :func:`~jsae.data.judges.compression_ratio` = zlib-compressed bytes / raw bytes, lower = more repetitive), with
    its edge cases: (0, 0) for an empty text, (1, 1) under 4 words."""
    if not text:
        return 0.0, 0.0
    if len(text.split()) < 4:
        return 1.0, 1.0
    return distinct_3(text), compression_ratio(text)


class _SimilarityTable:
    """Each text's similarity to one target, computed once in one batch; answers like a SentenceSimilarity."""

    def __init__(self, model: Any, texts: Sequence[str], target: str) -> None:
        unique = list(dict.fromkeys(texts))
        self.target = target
        self.table = dict(zip(unique, np.asarray(model.similarity(unique, target), dtype=np.float64))) if unique else {}

    def similarity(self, texts: Sequence[str], target: str) -> np.ndarray:
        assert target == self.target
        return np.array([self.table[t] for t in texts], dtype=np.float64)


class _PerplexityTable:
    """Each text's perplexity, computed once in one batch; answers like an LMPerplexity."""

    def __init__(self, model: Any, texts: Sequence[str]) -> None:
        unique = list(dict.fromkeys(texts))
        self.table = dict(zip(unique, np.asarray(model(unique), dtype=np.float64))) if unique else {}

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        return np.array([self.table[t] for t in texts], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------
# the reference's walk
# ---------------------------------------------------------------------------------------------------------------


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def reference_walk(alphas: Sequence[float], scores: Sequence[Mapping[str, Any]], *, use_similarity: bool,
                   use_perplexity: bool) -> dict[str, Any]:
    """The reference's upward walk over one image's per-α ``scores`` (``caption``, ``keyword_hit``,
    ``similarity_gain``, ``perplexity``, ``distinct_3``, ``compression_ratio`` in the reference's conventions),
    rules (a), (b), (d), (c) in its order.  Returns the α reported (the last not stopped; ``None`` when the
    walk stops before recording any), the α and rule it stopped at, and what each fault needs."""
    prev_sim: float | None = None
    prev_ppl: float | None = None
    reported: int | None = None
    stop_alpha, rule = None, None
    recorded: list[int] = []
    skipped: list[float] = []
    rise_not_stopped: list[float] = []
    last_evaluated: int | None = None
    for k, (alpha, s) in enumerate(zip(alphas, scores)):
        if not s["caption"].strip():
            skipped.append(float(alpha))
            continue
        last_evaluated = k
        sim = float(s["similarity_gain"]) if use_similarity else None
        ppl = float(s["perplexity"]) if use_perplexity else None
        d3, cr = s["distinct_3"], s["compression_ratio"]
        if use_similarity and prev_sim is not None and sim < prev_sim and sim > 0.1:
            rule = "a"
        elif use_perplexity and prev_ppl is not None and (prev_ppl - ppl > 10 or ppl > 40):
            rule = "b_drop" if prev_ppl - ppl > 10 else "b_over_40"
        elif use_similarity and prev_sim is not None and sim < -0.2 and prev_sim < -0.2:
            rule = "d"
        elif d3 < 0.3 and cr < 0.3:
            rule = "c"
        if rule is not None:
            stop_alpha = float(alpha)
            break
        if use_perplexity and prev_ppl is not None and ppl - prev_ppl > 10:
            rise_not_stopped.append(float(alpha))  # what the intended rule would have stopped at
        reported = k
        recorded.append(k)
        prev_sim, prev_ppl = sim, ppl
    metric = "similarity_gain" if use_similarity else "keyword_hit"
    values = [float(scores[k][metric]) for k in recorded]
    best = int(np.argmax(values)) if values else None
    out: dict[str, Any] = {
        "alpha": float(alphas[reported]) if reported is not None else None,
        "stopped_at": stop_alpha, "rule": rule, "rule_text": RULES.get(rule) if rule else None,
        "skipped_empty": skipped, "alphas_walked": [float(alphas[k]) for k in recorded],
        "perplexity_rose_gt_10_not_stopped": rise_not_stopped,
        "best_metric": metric, "best_alpha": float(alphas[recorded[best]]) if best is not None else None,
        "last_not_best": bool(values and values[-1] < values[best]),
    }
    if reported is not None:
        s = scores[reported]
        out.update(caption=s["caption"], keyword_hit=bool(s["keyword_hit"]), similarity_gain=_num(s.get("similarity_gain")),
                   perplexity=_num(s.get("perplexity")), distinct_3=_num(s["distinct_3"]),
                   compression_ratio=_num(s["compression_ratio"]))
    else:
        out["note"] = "the walk stopped before recording an α (the reference would fail on its empty record here)"
    if last_evaluated is not None:  # the reference prints Distinct_3 / Compression_Ratio of the last α evaluated
        d3, cr = scores[last_evaluated]["distinct_3"], scores[last_evaluated]["compression_ratio"]
        out["reference_reported_repetition"] = {"alpha": float(alphas[last_evaluated]), "distinct_3": _num(d3),
                                                "compression_ratio": _num(cr)}
    return out


# ---------------------------------------------------------------------------------------------------------------
# loading what an experiment needs
# ---------------------------------------------------------------------------------------------------------------


def _load_sae(run_dir: Path, method: str, layer: int) -> Any:
    from jsae.report.rundir import RunDir

    folder = RunDir(run_dir).sae_dir(method, layer)
    if not (folder / "cfg.json").is_file():
        raise FileNotFoundError(f"run directory {str(run_dir)!r} has no {method} SAE for layer {layer} "
                                f"({folder} is missing); make one with `jsae demo --layers {layer} --out {run_dir}` "
                                "or pass --run of a run that trained that layer")
    import json

    arch = json.loads((folder / "cfg.json").read_text()).get("architecture")
    if arch == "jsae":
        from jsae.saes.joint_sae import JointSAE

        return JointSAE.load_from_disk(folder).eval()
    from sae_lens import SAE

    return SAE.load_from_disk(str(folder)).eval()


def steering_direction(sae: Any, latents: Sequence[int], where: str = "") -> torch.Tensor:
    """``Σ_j W_dec[j] / ‖W_dec[j]‖`` over ``latents`` of the SAE's *text* decoder (a plain SAE: its decoder), as the
    reference builds it (:func:`jsae.saes.metrics.summed_unit_rows`; the reference adds 1e-8 to the norm, which
    changes nothing at float32 for the unit-norm rows it uses); a one-line error for a latent id out of range."""
    W = (sae.W_dec_of("text") if hasattr(sae, "W_dec_of") else sae.W_dec).detach().float().cpu()
    bad = [j for j in latents if not 0 <= int(j) < W.shape[0]]
    if bad:
        raise ValueError(f"{where}latent id {bad[0]} is out of range: the SAE has latents 0..{W.shape[0] - 1}")
    return summed_unit_rows(W, [int(j) for j in latents])


def _image_lookup(experiments: Sequence[Experiment], images: Any, data: str | None, data_split: str) -> dict[str, Any]:
    """``{image id: image}`` for every id of the table: ``images`` given (a mapping by id, or a sequence by
    index), the world split (integer indices), or a caption dataset (its ``image_id`` column, else row indices)."""
    wanted = {i for e in experiments for i in e.image_ids}
    for e in experiments:
        if not e.image_ids:
            raise ValueError(f"experiment {e.name!r} lists no image ids; write the images to steer in its image_ids "
                             "column, e.g. 0;1;2")
    out: dict[str, Any] = {}

    def unknown(e_id: str, why: str) -> ValueError:
        names = [e.name for e in experiments if e_id in e.image_ids]
        return ValueError(f"experiment {names[0]!r}: unknown image id {e_id!r} ({why})")

    def as_index(e_id: str, n: int | None, what: str) -> int:
        try:
            i = int(e_id.strip())
        except ValueError:
            raise unknown(e_id, f"{what} are integer row indices") from None
        if i < 0 or (n is not None and i >= n):
            raise unknown(e_id, f"{what} has rows 0..{n - 1}" if n is not None else f"{what} are indices >= 0")
        return i

    if images is not None:
        if isinstance(images, Mapping):
            keys = {str(k): k for k in images}
            for e_id in sorted(wanted):
                if e_id not in keys:
                    raise unknown(e_id, f"the images given have ids {sorted(keys)[:10]}")
                out[e_id] = images[keys[e_id]]
        else:
            seq = list(images)
            for e_id in sorted(wanted):
                out[e_id] = seq[as_index(e_id, len(seq), f"the {len(seq)} images given")]
        return out
    if data is None:
        from jsae.world.data import world_dataset

        idx = {e_id: as_index(e_id, None, f"image ids on the world ({data_split} split)") for e_id in wanted}
        ds = world_dataset(data_split, max(idx.values()) + 1, seed=0)
        return {e_id: ds[i]["image"] for e_id, i in idx.items()}
    import os

    from jsae.world.data import load_caption_dataset

    ds = load_caption_dataset(data, split=data_split)
    ids = [str(x) for x in ds["image_id"]]
    base = os.path.basename(str(data).rstrip("/")) or "data"
    synthetic = all(x == f"{base}-{data_split}-{i}" for i, x in enumerate(ids))  # no id column: row indices
    if synthetic:
        for e_id in wanted:
            out[e_id] = ds[as_index(e_id, len(ds), f"{data!r} has no image_id column, so ids")]["image"]
        return out
    first: dict[str, int] = {}
    for i, x in enumerate(ids):
        first.setdefault(x, i)
    for e_id in sorted(wanted):
        if e_id.strip() not in first:
            raise unknown(e_id, f"not in the image_id column of {data!r} ({data_split}), e.g. {ids[:3]}")
        out[e_id] = ds[first[e_id.strip()]]["image"]
    return out


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------


def _clean(x: Any) -> Any:
    """JSON-able: numpy scalars as Python numbers, non-finite floats as None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x) if math.isfinite(float(x)) else None
    return x


def _mean(values: Sequence[Any]) -> float | None:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else None


@dataclass(frozen=True)
class ExperimentsConfig:
    """The settings of :func:`run_experiments` (what ``jsae run experiments`` takes as options): the model and its
    loading (``model``, ``dtype``, ``device``, ``device_map``), the images (``data`` / ``data_split``), the run's
    SAEs (``method``), the α grid, the steered ``positions``, captioning (``prompt``, ``caption_template``,
    ``max_new_tokens``, ``batch_size``) and whether the reference's faulty walk is replayed.  Checked when made
    (one-line ``ValueError``s); ``alphas`` kept sorted."""

    model: str = "llava"
    data: str | None = None
    data_split: str = "test"
    method: str = "jsae"
    alphas: tuple[float, ...] = REFERENCE_ALPHAS
    positions: str = "image+generated"
    prompt: str | None = None
    caption_template: str | None = None
    max_new_tokens: int = 50
    reference_faults: bool = False
    batch_size: int = 64
    dtype: Any = "auto"
    device: Any = None
    device_map: Any = None

    def __post_init__(self) -> None:
        alphas = [float(a) for a in self.alphas]
        if not alphas or any(not math.isfinite(a) for a in alphas) or len(set(alphas)) != len(alphas):
            raise ValueError(f"alphas must be distinct finite numbers, e.g. 0.2,0.4,...,3.0; got {alphas}")
        object.__setattr__(self, "alphas", tuple(sorted(alphas)))
        if self.positions not in POSITION_SETS:
            raise ValueError(f"unknown steering positions {self.positions!r}; choose from {list(POSITION_SETS)}")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {self.max_new_tokens} and {self.batch_size}")

    def prompt_text(self) -> str:
        """The caption prompt: ``prompt``, else the reference's for a caption dataset, else the toy world's."""
        from jsae.world.processors import CAPTION_PROMPT

        if self.prompt is not None:
            return self.prompt
        return REFERENCE_CAPTION_PROMPT if self.data is not None else CAPTION_PROMPT


def _check_experiments(table: str | Path | Sequence[Experiment]) -> list[Experiment]:
    """The experiments of ``table``; a one-line error for an empty table."""
    experiments = list(table) if not isinstance(table, (str, Path)) else read_experiment_table(table)
    if not experiments:
        raise ValueError(f"the experiment table {str(table)!r} has no experiments; add rows "
                         "name,layer,latents,keywords,target,image_ids")
    return experiments


def _check_names_and_targets(experiments: list[Experiment], similarity: Any) -> None:
    """One-line errors for a missing target sentence the similarity gain needs and for a name used twice."""
    if similarity is not None:
        missing = [e.name for e in experiments if not e.target]
        if missing:
            raise ValueError(f"experiment {missing[0]!r} has no target sentence, which the similarity gain needs; "
                             "fill its target column or leave out the similarity model")
    names = [e.name for e in experiments]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"experiment name {dup[0]!r} appears more than once; give every experiment its own name")


def _checked_vlm(vlm: Any, cfg: ExperimentsConfig, experiments: list[Experiment], saes: dict[int, Any],
                 run_dir: Path) -> Any:
    """The given ``vlm`` (or ``(model, processor, adapter)``) or ``cfg.model`` loaded, checked against every
    experiment's layer and its SAE's site."""
    from jsae.interventions import check_sae_site
    from jsae.vlm import as_vlm

    if vlm is None:
        from jsae.vlm import load_vlm

        vlm = load_vlm(cfg.model, dtype=cfg.dtype, device=cfg.device, device_map=cfg.device_map)
    vlm = as_vlm(*vlm) if isinstance(vlm, tuple) and not hasattr(vlm, "adapter") else as_vlm(vlm)
    for e in experiments:
        vlm.adapter.check_layer(e.layer)
        check_sae_site(saes[e.layer], e.layer, vlm.adapter, f"run's {cfg.method} SAE ({str(run_dir)!r})",
                       "pass the run directory made with this model, or the --model the run was made with")
    return vlm


def _run_one(e: Experiment, direction: torch.Tensor, ims: list[Any], captioner: Any, cfg: ExperimentsConfig,
             similarity: Any, perplexity: Any) -> dict[str, Any]:
    """One experiment: unsteered captions, every α of the grid on every image (one batch, α-major), the caption
    metrics per α and, with ``cfg.reference_faults``, the reference's walk replayed on the same captions."""
    alphas = list(cfg.alphas)
    n = len(ims)
    unsteered = captioner(ims)
    strengths = [a for a in alphas for _ in range(n)]  # rows: α-major, image-minor
    rows = [im for _ in alphas for im in ims]
    steered = captioner(rows, lambda start, stop, d=direction, layer=e.layer, st=strengths:
                        steer_interventions(layer, cfg.positions, d, st[start:stop]))
    by_alpha = [steered[k * n:(k + 1) * n] for k in range(len(alphas))]
    texts = unsteered + steered
    sim = _SimilarityTable(similarity, texts, e.target) if similarity is not None else None
    ppl = _PerplexityTable(perplexity, texts) if perplexity is not None else None
    grid = []
    for alpha, caps in zip(alphas, by_alpha):
        m = caption_metrics(caps, unsteered, e.keywords, e.target or None, similarity=sim, perplexity=ppl)
        grid.append({"alpha": alpha, **m, "captions": caps})
    rec: dict[str, Any] = {"name": e.name, "layer": e.layer, "latents": list(e.latents), "keywords": list(e.keywords),
                           "target": e.target, "image_ids": list(e.image_ids), "n_images": n,
                           "direction_norm": float(direction.norm()), "unsteered": unsteered, "grid": grid}
    if cfg.reference_faults:
        walks = [_replayed_walk(e, i, by_alpha, unsteered, alphas, sim, ppl) for i in range(n)]
        rec["reference_walk"] = walks
        rec["reference_walk_summary"] = _walk_summary(walks, grid, alphas)
    return _clean(rec)


def _replayed_walk(e: Experiment, i: int, by_alpha: list[list[str]], unsteered: list[str], alphas: list[float],
                   sim: Any, ppl: Any) -> dict[str, Any]:
    """The reference's upward walk over image ``i``'s captions of the grid, with whether the grid's perplexity
    rose or dropped by more than 10 between neighbouring α."""
    scores = []
    for caps in by_alpha:
        c = caps[i]
        d3, cr = reference_repetition(c)
        scores.append({"caption": c, "keyword_hit": keyword_hit(c, e.keywords),
                       "similarity_gain": (sim.table[c] - sim.table[unsteered[i]]) if sim else None,
                       "perplexity": ppl.table[c] if ppl else None, "distinct_3": d3, "compression_ratio": cr})
    walk = reference_walk(alphas, scores, use_similarity=sim is not None, use_perplexity=ppl is not None)
    grid_ppl = [ppl.table[caps[i]] for caps in by_alpha] if ppl else []
    walk["grid_perplexity_rose_gt_10"] = any(b - a > 10 for a, b in pairwise(grid_ppl))
    walk["grid_perplexity_dropped_gt_10"] = any(a - b > 10 for a, b in pairwise(grid_ppl))
    return {"image_id": e.image_ids[i], "unsteered": unsteered[i], **walk}


def run_experiments(table: str | Path | Sequence[Experiment], run_dir: str | Path, config: ExperimentsConfig | None = None,
                    *, similarity: Any = None, perplexity: Any = None, progress: bool = True, vlm: Any = None,
                    images: Any = None, **settings: Any) -> dict[str, Any]:
    """Run the experiments of ``table`` (a CSV path, :func:`~jsae.protocol.reference_metrics.read_experiment_table`,
    or a list of :class:`Experiment`) with the SAEs of the run directory ``run_dir``
    (``<run>/saes/<method>/layer_<L>``); see the module docstring.

    ``config``: an :class:`ExperimentsConfig`, or its fields as keyword arguments (``model=``, ``alphas=``, ...).
    ``vlm``: an already-loaded ``VLM`` (or ``(model, processor, adapter)``) instead of ``jsae.load_vlm(model,
    dtype=, device=, device_map=)``.  Images: ``images`` (a mapping by id or a sequence indexed by id), else the
    world split ``data_split`` (ids are indices into ``world_dataset(data_split, max_id + 1, seed=0)``), else
    the caption dataset ``data`` (its ``image_id`` column, or row indices when it has none).  ``similarity`` (a
    :class:`~jsae.protocol.reference_metrics.SentenceSimilarity`) and ``perplexity`` (an
    :class:`~jsae.protocol.reference_metrics.LMPerplexity`) add those metrics (and the walk's rules on them).

    Returns ``{"experiments": [{"name", "layer", "latents", "keywords", "target", "image_ids", "n_images",
    "unsteered", "grid": [{"alpha", ...caption_metrics, "captions"}], "reference_walk": {...}}], "faults": [...],
    "config": {...}}`` (JSON-able; ``reference_walk`` and ``faults`` only with ``reference_faults``).  Raises a
    one-line ``ValueError`` / ``FileNotFoundError`` for bad input."""
    from tqdm.auto import tqdm

    from jsae.interventions import Captioner

    if config is not None and settings:
        raise ValueError(f"pass the settings {sorted(settings)} in config=ExperimentsConfig(...) or as keywords, not both")
    run_dir = Path(run_dir)
    experiments = _check_experiments(table)
    cfg = config or ExperimentsConfig(**settings)
    _check_names_and_targets(experiments, similarity)

    # everything cheap first, so a bad table fails before the model loads
    saes: dict[int, Any] = {}
    directions: list[torch.Tensor] = []
    for e in experiments:
        if e.layer not in saes:
            saes[e.layer] = _load_sae(run_dir, cfg.method, e.layer)
        directions.append(steering_direction(saes[e.layer], e.latents, f"experiment {e.name!r}: "))
    image_of = _image_lookup(experiments, images, cfg.data, cfg.data_split)
    vlm_given = vlm is not None
    vlm = _checked_vlm(vlm, cfg, experiments, saes, run_dir)
    prompt_text = cfg.prompt_text()
    captioner = Captioner(vlm.model, vlm.processor, vlm.adapter, prompt=prompt_text, batch_size=cfg.batch_size,
                          max_new_tokens=cfg.max_new_tokens, prompt_template=cfg.caption_template)
    records = [_run_one(e, direction, [image_of[i] for i in e.image_ids], captioner, cfg, similarity, perplexity)
               for e, direction in tqdm(list(zip(experiments, directions)), desc="experiments", disable=not progress)]

    rules = {"a": similarity is not None, "b": perplexity is not None, "c": True, "d": similarity is not None}
    record = {"table": str(table) if isinstance(table, (str, Path)) else None, "run_dir": str(run_dir),
              "model": "given (vlm=)" if vlm_given else cfg.model, "method": cfg.method, "data": cfg.data,
              "data_split": cfg.data_split, "images": "given" if images is not None else ("world" if cfg.data is None else "data"),
              "alphas": list(cfg.alphas), "positions": cfg.positions, "prompt": prompt_text,
              "caption_template": cfg.caption_template, "max_new_tokens": cfg.max_new_tokens,
              "similarity": getattr(similarity, "name", None) if similarity else None,
              "perplexity": getattr(perplexity, "name", None) if perplexity else None,
              "reference_faults": bool(cfg.reference_faults), "direction": "sum of the unit text-decoder rows of the latents",
              "alpha_choice": "none: every α of the grid on every image"}
    out: dict[str, Any] = {"experiments": records, "config": record}
    if cfg.reference_faults:
        record["reference_rules"] = {k: {"active": v, "rule": txt} for (k, v), txt in zip(
            rules.items(), ["similarity gain decreased while > 0.1", "prev_ppl - ppl > 10 or ppl > 40 (sign-reversed)",
                            "distinct-3 < 0.3 and compression ratio < 0.3", "similarity gain < -0.2 twice in a row"])}
        out["faults"] = _faults(records, rules)
    return _clean(out)


def _walk_summary(walks: list[dict], grid: list[dict], alphas: list[float]) -> dict[str, Any]:
    """Means over images of the walk's reported metrics, and the grid at the α nearest the median reported α."""
    reported = [w["alpha"] for w in walks if w["alpha"] is not None]
    fixed = None
    if reported:
        med = float(np.median(reported))
        fixed = min(alphas, key=lambda a: (abs(a - med), a))
    row = next((g for g in grid if g["alpha"] == fixed), None)
    return {
        "n_images": len(walks), "n_reported": len(reported), "alpha_mean": _mean(reported),
        "keyword_hit_rate": _mean([float(w["keyword_hit"]) for w in walks if "keyword_hit" in w]),
        "similarity_gain": _mean([w.get("similarity_gain") for w in walks]),
        "perplexity": _mean([w.get("perplexity") for w in walks]),
        "stopped_by": {r: sum(w["rule"] == r for w in walks) for r in RULES},
        "grid_at_fixed_alpha": None if row is None else {
            "alpha": fixed, "keyword_hit_rate": row["keyword_hit_rate_steered"],
            "similarity_gain": row.get("similarity_gain"), "perplexity": row.get("perplexity_steered")},
    }


def _faults(records: list[dict], rules: dict[str, bool]) -> list[dict[str, Any]]:
    """Each fault of :data:`FAULTS`: whether its rule was active, how often it fired per experiment, and the
    same statistic from the sound grid."""
    out = []
    for name, text in FAULTS.items():
        by_exp = {}
        fired = 0
        for rec in records:
            walks, summary = rec["reference_walk"], rec["reference_walk_summary"]
            grid_fixed = summary["grid_at_fixed_alpha"]
            if name == "alpha_by_eval_metric":
                n = summary["stopped_by"]["a"]
                stats = {"fired": n, "walk": {"alpha_per_image": [w["alpha"] for w in walks],
                                              "similarity_gain": summary["similarity_gain"],
                                              "keyword_hit_rate": summary["keyword_hit_rate"]},
                         "grid": grid_fixed}
            elif name == "perplexity_rule_sign_reversed":
                n = summary["stopped_by"]["b_drop"]
                stats = {"fired": n, "walk": {"stopped_by_drop_gt_10": n, "stopped_by_over_40": summary["stopped_by"]["b_over_40"],
                                              "rose_gt_10_not_stopped": sum(bool(w["perplexity_rose_gt_10_not_stopped"]) for w in walks),
                                              "perplexity": summary["perplexity"]},
                         "grid": {"images_with_rise_gt_10": sum(w["grid_perplexity_rose_gt_10"] for w in walks),
                                  "images_with_drop_gt_10": sum(w["grid_perplexity_dropped_gt_10"] for w in walks),
                                  "perplexity_at_fixed_alpha": (grid_fixed or {}).get("perplexity")}}
            else:
                n = sum(w["last_not_best"] for w in walks)
                metric = walks[0]["best_metric"] if walks else None
                stats = {"fired": n, "metric": metric,
                         "walk": {"reported": summary["similarity_gain" if metric == "similarity_gain" else "keyword_hit_rate"],
                                  "reported_alpha_per_image": [w["alpha"] for w in walks],
                                  "best_alpha_per_image": [w["best_alpha"] for w in walks]},
                         "grid": grid_fixed}
            fired += n
            by_exp[rec["name"]] = stats
        active = {"alpha_by_eval_metric": rules["a"], "perplexity_rule_sign_reversed": rules["b"],
                  "last_not_best": True}[name]
        out.append({"name": name, "fault": text, "active": active, "fired": fired, "by_experiment": by_exp})
    return out


# ---------------------------------------------------------------------------------------------------------------
# the report
# ---------------------------------------------------------------------------------------------------------------


def write_experiments_report(result: Mapping[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``experiments.json`` and ``experiments.md`` into ``out_dir`` (atomically); returns both paths."""
    from jsae.files import write_atomic, write_json

    out_dir = Path(out_dir)
    return (write_json(out_dir / "experiments.json", result),
            write_atomic(out_dir / "experiments.md", experiments_markdown(result)))


__all__ = ["FAULTS", "RULES", "ExperimentsConfig", "experiments_markdown", "reference_repetition", "reference_walk", "run_experiments",
           "steering_direction", "write_experiments_report"]
