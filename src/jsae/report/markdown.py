"""Markdown, in one place: tables, the ``report.md`` of a protocol run and of a multi-model sweep, the
``experiments.md`` of a steering-experiment table (:mod:`jsae.protocol.experiments`) and the ``report.md`` of VISTA
in the embedded world (:mod:`jsae.vista.experiment`).  Each renderer reads a plain metrics dict."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from jsae.report.rundir import METHOD_INFO


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else "n/a" if v is None else str(v)  # noqa: E731
    return head + "".join("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def _ci(row: dict[str, Any], key: str, fmt: str = "{:.2f}") -> str:
    """``"v [lo, hi]"`` of ``row[key]`` with ``row[key + "_low"]`` / ``row[key + "_high"]`` (``–`` when missing)."""
    v = row.get(key)
    if v is None:
        return "–"
    if v == float("inf"):
        return "not reached"
    f = lambda x: "∞" if x == float("inf") else ("–" if x is None else fmt.format(x))  # noqa: E731
    if row.get(key + "_low") is None:
        return f(v)
    return f"{f(v)} [{f(row[key + '_low'])}, {f(row[key + '_high'])}]"


def _relative(r: dict[str, Any]) -> str:
    """A direction's r50 against the oracle's, in words: ``1.3× [1.1, 1.6]``; with concepts that never reach +0.5
    (counted at twice the grid top) ``≥ 16.6× [6.2, 37.5] (9/12 reached)``: a lower bound, since the concepts not
    reached would need more than the grid holds."""
    a, b = r["reached"].split("/")
    ratio = f"{2 ** r['log2_vs_oracle']:.1f}× [{2 ** r['log2_vs_oracle_low']:.1f}, {2 ** r['log2_vs_oracle_high']:.1f}]"
    return ratio if a == b else f"≥ {ratio} ({r['reached']} reached)"


def _compare(r: dict[str, Any]) -> str:
    """``"never"`` (no concept reaches +0.5), ``"easier"`` / ``"harder"`` (the log2 ratio's interval excludes 0), or
    ``"as easy"`` (it includes 0) than the oracle."""
    if r.get("log2_vs_oracle") is None or r["reached"].startswith("0/"):
        return "never"
    if r.get("log2_vs_oracle_high") is not None and r["log2_vs_oracle_high"] < 0:
        return "easier"
    if r.get("log2_vs_oracle_low") is not None and r["log2_vs_oracle_low"] > 0:
        return "harder"
    return "as easy"


def _verdict(here: list[dict[str, Any]], measure: str) -> str:
    groups: dict[str, list[str]] = {}
    for r in here:
        if r["key"] != "oracle":
            groups.setdefault(_compare(r), []).append(r["key"])
    words = {"easier": f"{'suppress' if measure == 'suppression' else 'steer'} *more easily* than the oracle",
             "as easy": "as easily as the oracle (interval includes 1×)", "harder": "need more strength than the oracle",
             "never": "never reach +0.5"}
    parts = [f"{', '.join(f'`{k}`' for k in groups[g])} {words[g]}" for g in ("easier", "as easy", "harder", "never")
             if g in groups]
    return "; ".join(parts) if parts else "only the oracle was measured"


def convergence_note(saes: list[dict[str, Any]]) -> list[str]:
    """One line saying which SAEs are not converged (and their dead latents), so no verdict is read as if they were."""
    rows = [r for r in saes if r.get("converged") is False]
    if not rows:
        return []
    dead = [r.get("dead_vision") for r in rows if r.get("dead_vision") is not None]
    width = max((r.get("d_sae") or 0) for r in rows)
    return [f"- SAEs: {len(rows)} of {len(saes)} are not converged by the criterion (fewer than 10% dead latents in every branch and a late "
            f"loss plateau): {min(dead)}–{max(dead)} of {width} vision latents never fire on the held-out pairs. "
            "Their directions are measured as trained; a longer or larger run (`--steps`, `--n-train`) may change them."]


def what_this_shows(s: dict[str, Any]) -> list[str]:
    """Per measure, positions and layer: how far the oracle gets, each direction's r50 relative to the oracle's with
    its interval (the numbers of the tables below, in words), and a one-line verdict: which directions steer (or
    suppress) more easily than the oracle, as easily, with more strength, or never — and whether the alignment loss
    made a difference (the JSAE against its ablation, with the bootstrap p-value)."""
    out = []
    tests = s.get("tests", {})
    for measure in ("steering", "suppression"):
        rows = [r for r in s.get("rows", []) if r["measure"] == measure]
        for pos, layer in sorted({(r["positions"], r["layer"]) for r in rows}, key=lambda x: (x[0], x[1])):
            here = [r for r in rows if (r["positions"], r["layer"]) == (pos, layer)]
            oracle = next((r for r in here if r["key"] == "oracle"), None)
            if oracle is None:
                continue
            what = f"{measure} at {pos}" if measure == "steering" else "suppression (negative steering)"
            if oracle.get("r50") is None:
                out.append(f"- **Layer {layer}, {what}**: even the oracle direction does not reach +0.5 on the grid. "
                           f"**Verdict: nothing {'steers' if measure == 'steering' else 'suppresses'} here** through "
                           "these positions; no direction is compared.")
                continue
            parts = []
            for r in sorted((r for r in here if r["key"] != "oracle"),
                            key=lambda r: (r.get("log2_vs_oracle") is None, r.get("log2_vs_oracle") or 0)):
                if _compare(r) == "never":
                    parts.append(f"`{r['key']}` never reaches it ({r['reached']})")
                else:
                    parts.append(f"`{r['key']}` needs {_relative(r)} the oracle's strength")
            verdict = _verdict(here, measure)
            for decoder in ("text", "vision"):
                t = tests.get(f"{measure}@{pos} L{layer}: log2 r50 jsae:{decoder} − jsae-none:{decoder}")
                if t and t.get("p_value") is not None:
                    better = t["statistic"] < 0
                    verdict += (f"; alignment ({decoder} decoder): the JSAE needs {2 ** t['statistic']:.1f}× its "
                                f"ablation's strength ({'less' if better else 'more'}; p = {t['p_value']:.3f}, "
                                f"Holm {t['p_holm']:.2f})")
            out.append(f"- **Layer {layer}, {what}**: the oracle reaches +0.5 at r50 = {oracle['r50']:.2f} "
                       f"({oracle['reached']} concepts); " + "; ".join(parts) + f". **Verdict**: {verdict}.")
    return out


HOW_TO_READ = [
    "## How to read this report", "",
    "- **Directions** (`key`): `oracle` = difference of the mean image-token state of images with and without the concept "
    "(what the model itself separates the concept by); `<method>:<decoder>` = the sum of the unit decoder rows of the "
    "method's 3 latents most correlated with the concept, from its `text` or `vision` decoder. Methods: `jsae` (cosine "
    "alignment, the paper), `jsae-none` (the same SAE without the alignment loss: the ablation), `separate` (`jsae-none` "
    "with its text latents matched to its vision latents after training), `saelens-topk` (a vision-only SAELens TopK SAE).",
    "- **Strength** r: the added vector's norm in units of the layer's mean per-token image-state norm (r = 1 adds a "
    "vector as long as a typical image-token state).",
    "- **Effect**: steering — the share of steered captions that mention the concept minus the unsteered share, on images "
    "without it; suppression — the drop in mentions on images with it. **Preservation**: share of the image's other "
    "objects still named. **Fluency**: the caption parses completely under the world's grammar. **Hallucination**: an "
    "object type named that is neither in the image nor the concept.",
    "- **r50**: the strength at which the mean effect reaches +0.5 (interpolated in log strength); `reached` counts "
    "the concepts whose curve gets there; `log2_vs_oracle` is log2 of r50 over the oracle's r50 (0 = as easy as the "
    "oracle, 1 = twice the strength; a concept never reaching +0.5 counts at twice the grid top); `at_floor` counts "
    "curves already at +0.5 at the smallest strength. `effect_small`: effect at r = 1. `effect_matched`: effect at the "
    "strongest point that still keeps ≥ 75% of the other objects.",
    "- **Intervals** `v [lo, hi]`: 95% bootstrap intervals that resample images (an image's scores across concepts, "
    "layers and methods together) and concepts. **Empty cells**: `–` = not reached on the grid (no r50 to report) or "
    "no comparison possible; `not reached` = that concept never reaches +0.5; `n/a` = does not apply (the oracle's "
    "cosine to itself, a TopK SAE's text branch, a training history too short for the loss-plateau check).",
    "- **Curves table**: `fluency_max` = the highest share of fluent captions at any strength of the curve (a "
    "direction that breaks the grammar everywhere scores low); `hallucination_max` = the highest share of captions "
    "naming an object type neither in the image nor the concept; `cos_oracle` = cosine of the direction with the "
    "oracle's; `top_corr` = the correlation with the concept of the direction's best latent (its label strength); "
    "`effect_best_alpha` (only with `--reference-faults`) = each image's best effect over the grid, the reference's "
    "in-sample pick. **Tests**: `statistic` = the mean log2 r50 difference (< 0: the first direction needs less), "
    "`p_value` from the bootstrap, `p_holm` after Holm's correction over every test of the run (multiple comparisons), "
    "`n` = concepts.",
    "- **SAEs**: FVU = fraction of variance unexplained on pooled held-out pairs (what the SAE is trained on) and "
    "`fvu_vision_tokens` / `fvu_text_tokens` on single image-token / text-token states (what an edit touches; larger, "
    "because the SAEs are trained on pooled vectors); `converged` = fewer than 10% of the latents are dead (never fire "
    "on held-out pairs) in every branch and the loss fell by less than 5% from the third to the last quarter of "
    "training.", "",
]


def protocol_report(m: dict[str, Any]) -> str:
    """``report.md`` of a protocol run from its ``metrics.json``."""
    cfg = m.get("config", {})
    s = m["summary"]
    unit = "absolute α" if cfg.get("alphas") else "× the mean per-token image-state norm"
    lines = [f"# jsae demo: {m['model']}", "",
             f"{m['n_layers']} decoder layers; swept layers {m['layers']}; concepts {m['concepts']}; methods {m['methods']}; "
             f"{cfg.get('n_images')} images per concept at every strength; strengths {unit}: "
             f"{cfg.get('alphas') or cfg.get('ratios')}.", ""]
    if m.get("concepts_dropped"):
        lines += ["Concepts not swept: " + "; ".join(f"{c}: {r}" for c, r in m["concepts_dropped"].items()), ""]
    q = m.get("model_quality") or {}
    if q.get("caption_nats_per_template"):
        lines += [f"Toy model on validation scenes: object accuracy {q.get('object_accuracy')}, captions without "
                  f"hallucination {q.get('no_hallucination')}; caption cross-entropy per template (nats per token, "
                  "low = the model expects it): " + ", ".join(f"{k}: {v:.2f}" for k, v in q["caption_nats_per_template"].items())
                  + ".", ""]
    fid = q.get("fidelity") or {}
    if fid:
        holds = fid.get("lens_top5_target") and fid.get("lens_right_of_six_target") and (
            fid.get("steering_target") or fid.get("steering_target_matched"))
        lines += [f"World fidelity of this model (`jsae world fidelity`): the logit lens names the object's type in the top 5 "
                  f"at up to {fid.get('lens_best_top5', 0):.0%} of single-object image tokens (right type of six "
                  f"{fid.get('lens_best_right_of_six', 0):.0%}); the text oracle steers the image tokens within 2× the image "
                  f"oracle at layers {', '.join(fid.get('steering_target_layers') or []) or 'none'}"
                  + (f" (with both oracles taken within scenes of equal object count: layers "
                     f"{', '.join(fid.get('steering_target_layers_matched') or []) or 'none'})"
                     if "steering_target_matched" in fid else "")
                  + ". "
                  + ("This world can test text-derived directions at the image tokens." if holds else
                     "This world cannot fairly test text-derived directions at the image tokens: a null result for a text "
                     "decoder here is predicted by the world, whatever the SAE."), ""]
    shows = what_this_shows(s) + convergence_note(m.get("saes") or [])
    if shows:
        lines += ["## What this shows", "", *shows, ""]
    lines += ["![dose response](dose_response.png)", "",
              "Feature browser (every joint SAE of the run, with a selector for SAE and layer): "
              "[features.html](features.html)", "", *HOW_TO_READ]
    lines += ["## SAEs (held-out pairs)", "",
              "FVU on pooled pairs and on per-token states (`fvu_vision_tokens`, `fvu_text_tokens`: edits are per "
              "token); dead = "
              "latents that never fire on the held-out pairs; alignment diagnostics of the joint SAEs: paired cosine of "
              "codes, centred paired cosine (mean code removed), median per-latent vision–text correlation, share of code "
              "mass on the top latent.", "",
              markdown_table(m["saes"], ["layer", "method", "fvu_vision", "fvu_text", "fvu_vision_tokens",
                                         "fvu_text_tokens", "l0_vision",
                                         "l0_text", "dead_vision", "dead_text", "loss_drop_last_quarter", "converged", "paired_cosine",
                                         "centred_paired_cosine", "median_latent_corr", "top_latent_mass"])]
    for measure, what in (("steering", "Steering (images without the concept)"),
                          ("suppression", "Suppression by negative steering (images with the concept)")):
        rows = [r for r in s.get("rows", []) if r["measure"] == measure]
        if not rows:
            continue
        lines += [f"## {what}", "",
                  "Per layer and direction, over concepts with 95% intervals resampling images (an image's scores across "
                  "concepts, layers and methods together) and concepts: r50 = strength for a +0.5 effect (geometric mean "
                  "over the concepts where it is reached; `reached` counts them), its ratio to the oracle's (log2, < 0 = "
                  "needs less than the oracle), the effect at strength 1, and the effect at matched preservation "
                  f"(the strongest point keeping ≥ {s.get('level', 0.75):.0%} of the other objects).", "",
                  markdown_table([{**r, "r50": _ci(r, "r50"), "log2_vs_oracle": _ci(r, "log2_vs_oracle"),
                                   "effect_small": _ci(r, "effect_small"), "effect_matched": _ci(r, "effect_matched")}
                                  for r in rows],
                                 ["positions", "key", "layer", "reached", "at_floor", "r50", "log2_vs_oracle", "oracle_reached",
                                  "effect_small", "effect_matched", "cos_oracle"])]
    clamp = [r for r in s.get("rows", []) if r["measure"] == "clamp"]
    if clamp:
        lines += ["## Suppression by clamping (SAE latents to 0 with the error term; oracle: its direction projected out)", "",
                  markdown_table([{**r, "effect": _ci(r, "effect_small"), "preservation": _ci(r, "preservation")}
                                  for r in clamp], ["key", "layer", "effect", "preservation"])]
    if s.get("tests"):
        lines += ["## Tests (Holm-corrected across the tests listed)", "",
                  markdown_table([{"test": k, **v} for k, v in s["tests"].items()],
                                 ["test", "statistic", "p_value", "p_holm", "n", "note"])]
    lines += ["## Curves", "", "One row per (measure, positions, direction, layer, concept).", "",
              markdown_table([{**r, "r50": _ci(r, "r50"), "effect_small": _ci(r, "effect_small"),
                               "effect_matched": _ci(r, "effect_matched")} for r in s.get("curves", [])],
                             ["measure", "positions", "key", "layer", "concept", "r50", "effect_small", "effect_matched",
                              "fluency_max", "hallucination_max", "cos_oracle", "top_corr"])]
    if cfg.get("reference_faults"):
        lines += ["## Reference faults reproduced", "",
                  "Sweep images are the SAEs' training images and latents are ranked in-sample; `effect_best_alpha` is "
                  "the mean over images of each image's best effect over the strength grid (α picked per image with "
                  "the evaluation metric, as the reference does) — compare it with the sound effects above.", "",
                  markdown_table([r for r in s.get("curves", []) if r["measure"] == "steering"],
                                 ["key", "layer", "concept", "effect_best_alpha", "effect_small"])]
    if m.get("skipped"):
        lines += ["## Not run", "", *[f"- {k}: {v}" for k, v in m["skipped"].items()], ""]
    ref = m.get("reference")
    if ref is not None:
        lines += ["## Differences from the reference", "",
                  "Run with `--preset reference` (the JSAE reference code, `anonymous-lab25/anonymous-jsae`): text pooled "
                  "over every attended non-image token, steering at the image tokens and every generated token, absolute "
                  "α 0.2..3.0, 50 new tokens, the JSAE methods trained by the reference's recipe. What still differs:", "",
                  *[f"- {difference_line(d)}" for d in ref.get("differences", [])], ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class Difference:
    """One way a ``--preset reference`` run differs from the JSAE reference code: the ``setting``, the reference's
    value, ours (``None`` where one side has no such thing) and why; :func:`difference_line` words it."""

    setting: str
    reference: Any
    ours: Any
    why: str = ""


def difference_line(d: Difference | Mapping[str, Any] | str) -> str:
    """The report's sentence for one :class:`Difference` (or its ``metrics.json`` record; a run written before the
    records were kept has its sentence already)."""
    if isinstance(d, str):
        return d
    if isinstance(d, Difference):
        d = {"setting": d.setting, "reference": d.reference, "ours": d.ours, "why": d.why}
    key, ref, ours, why = d["setting"], d["reference"], d["ours"], d.get("why", "")
    if why == "overridden":
        if key == "expansion_factor":
            return f"Overridden: d_sae = {ours} · d_in (the reference: {ref} · d_in)."
        return f"Overridden: {key} = {ours!r} (the reference: {ref if key == 'd_sae' else repr(ref)})."
    if key in _DIFFERENCE_LINES:
        return _DIFFERENCE_LINES[key](ref, ours, why)
    prompt = {"capture_prompt": "Capture prompt", "caption_prompt": "Captioning prompt"}[key]
    if not isinstance(ours, Mapping):
        return f"{prompt}: {ours!r} given explicitly instead of the reference's {ref!r}."
    return (f"{prompt}: the model's own prompt kept, because its tokenizer lacks words of the reference's {ref!r} "
            f"(unknown: {ours['unknown_words']}).")


def _data_line(ref: str, ours: Any, why: str) -> str:
    if ours == "world":
        return (f"Data: the embedded toy world ({why}), not COCO captions (`{ref}`, a seeded sample of 50k unique "
                "images, one random caption each).")
    return (f"Data: {ours['dataset']} ({ours['split']}), cut into disjoint train / label / eval images"
            + (" deduplicated by image with a seeded caption" if ours["dedup_images"] else "")
            + f" ({' / '.join(str(n) for n in ours['parts'])}), not the reference's 50k seeded sample whose "
            "evaluation images come from the JSAE's training set (a reference fault not reproduced).")


def _strength_line(ref: Any, ours: Any, why: str) -> str:
    grid = "the reference grid 0.2..3.0" if ours["alphas"] == ref["alphas"] else f"the grid {ours['alphas']}"
    return (f"Strength: every absolute α of {grid} on the same images ({why}), not the reference's per-image upward "
            "walk that stops on the evaluation metric and on a sign-reversed perplexity rule"
            + (" (reproduced here as `effect_best_alpha`: each image's best α picked with the metric)."
               if ours["best_alpha_per_image"] else " (`--reference-faults` reproduces the per-image pick)."))


def _faults_line(ref: Any, ours: bool, why: str) -> str:
    if ours:
        return ("Reference faults reproduced (`--reference-faults`): sweep images drawn from the SAE's training images; "
                "latents ranked in-sample on the training pairs; a per-image best α chosen with the evaluation metric "
                "(`effect_best_alpha`, beside the sound r50 and effects).")
    return ("Reference faults not reproduced (pass `--reference-faults` to): evaluation images disjoint from training "
            "images, latents chosen out of sample, no α chosen with the evaluation metric, no perplexity stopping rule.")


_DIFFERENCE_LINES = {
    "model": lambda ref, ours, why: f"Model: the shipped toy `{ours}` ({why}), not {ref}.",
    "data": _data_line,
    "n_train": lambda ref, ours, why: f"Training pairs: {ours} (the reference: {ref:,}).",
    "concepts": lambda ref, ours, why: (
        "Concepts: one word each (" + ("an object type, category or colour of the world" if ours["words"] == "world"
                                       else "a caption word") + ", "
        + ("given" if ours["given"] else "every one present in 5-95% of the sweep images") + f"), not the reference's "
        f"{ref} (3-16 latent ids per layer + keywords + a target sentence each, from `experiments_config.xlsx`); {why}."),
    "latents": lambda ref, ours, why: (
        f"Latents: the top {ours['top_k']} per concept and decoder ranked by code-concept correlation on "
        + ("the *training* pairs (in-sample, the reference fault)" if ours["in_sample"] else
           "held-out labelling pairs (sound)") + f", not {ref} as in the reference."),
    "strength": _strength_line,
    "metrics": lambda ref, ours, why: (
        "Metrics: keyword hit = whole-word mention of the concept against the unsteered caption, preservation of the "
        "other objects, strict fluency and hallucinations per strength; SBERT similarity gain and GPT-2 perplexity need "
        "a target sentence per concept and are computed by `jsae run experiments` (`--similarity-model`, "
        "`--perplexity-model`), not in the demo."),
    "reference_faults": _faults_line,
    "layers": lambda ref, ours, why: (f"Layers: {ours['layers']} of {ours['of']} (the reference: "
                                      f"{', '.join(str(L) for L in ref['layers'])} of LLaVA-v1.6-Mistral-7B's {ref['of']})."),
    "training": lambda ref, ours, why: (
        "Training: `PairedTensorData` drops a last partial batch (the reference's DataLoader keeps it); fused Adam (the "
        "same update up to float rounding); the best epoch's weights are returned (the reference saves the best epoch "
        "and returns the last)."),
    "saelens-topk": lambda ref, ours, why: (
        f"Baseline not in the reference: `saelens-topk` keeps its own recipe ({ours['steps']} steps of batch "
        f"{ours['batch_size']} at lr {ours['lr']}, unit-norm scaling) at the JSAEs' width: {why}."),
    "separate": lambda ref, ours, why: (
        "Baseline not in the reference: `separate` = the no-alignment JSAE (reference recipe) with its text latents "
        "paired to the vision latents afterwards (Hungarian matching of codes)."),
}


def _pair(cell: dict[str, Any], key: str) -> str:
    """``"before → after"`` of a steering cell's text-quality metric ``key``."""
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    return f"{fmt(cell.get(key + '_before'))} → {fmt(cell.get(key))}"


def _cell(r: dict[str, Any] | None, what: str) -> str:
    if r is None:
        return "–"
    if what == "r50":
        return "n.r." if r.get("r50") is None else f"{r['r50']:.2f} ({r['reached']})"
    if what == "ratio":
        if r.get("log2_vs_oracle") is None or r["reached"].startswith("0/"):
            return f"n.r. ({r['reached']})"
        a, b = r["reached"].split("/")
        return (f"{'≥' if a != b else ''}{2 ** r['log2_vs_oracle']:.1f}× [{2 ** r['log2_vs_oracle_low']:.1f}, "
                f"{2 ** r['log2_vs_oracle_high']:.1f}]" + ("" if a == b else f" ({r['reached']})"))
    v = r.get(what)
    return "–" if v is None else f"{v:+.2f} [{r[what + '_low']:+.2f}, {r[what + '_high']:+.2f}]"


def sweep_tables(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Per model: steering r50 of the oracle and every direction's r50 relative to it per layer, the effect at
    matched preservation, clamping, and the joint SAEs' alignment diagnostics (markdown lines)."""
    lines: list[str] = []
    for model, m in runs.items():
        rows = m["summary"]["rows"]
        positions = list(m["config"].get("positions") or ["image"])
        pos = positions[0]
        layers = m["layers"]
        keys = sorted({r["key"] for r in rows}, key=lambda k: (k != "oracle", k))
        get = lambda meas, k, L, p=None: next((r for r in rows if (r["measure"], r["positions"], r["key"], r["layer"])  # noqa: E731
                                               == (meas, p or pos, k, L)), None)
        head = "| direction | " + " | ".join(f"layer {L}" for L in layers) + " |\n|---|" + "---|" * len(layers)
        for p in positions:  # each position set on its own: the reference's image+generated decomposed into its parts
            lines += [f"**{model}** — steering at `{p}`: r50 of the oracle (× per-token state norm; concepts reaching +0.5), "
                      "then each direction's r50 relative to the oracle's at the same positions [95% CI] (n.r.: no concept "
                      "reaches +0.5):", "", head]
            for k in keys:
                lines.append(f"| {k} | " + " | ".join(_cell(get("steering", k, L, p), "r50" if k == "oracle" else "ratio")
                                                      for L in layers) + " |")
            lines += ["", f"**{model}** — steering at `{p}`: effect at matched preservation (the strongest strength keeping "
                      "≥ 75% of the other objects) [95% CI]:", "", head]
            for k in keys:
                lines.append(f"| {k} | " + " | ".join(_cell(get("steering", k, L, p), "effect_matched") for L in layers) + " |")
            lines.append("")
        lines += ["", f"**{model}** — suppression by clamping (mention drop) [95% CI]:", "", head]
        for k in keys:
            lines.append(f"| {k} | " + " | ".join(_cell(get("clamp", k, L), "effect_small") for L in layers) + " |")
        lines += ["", f"**{model}** — joint SAEs (held-out pairs): paired cosine / centred / median per-latent corr / "
                  "top-latent mass / dead vision latents:", "", "| method | " + " | ".join(f"layer {L}" for L in layers)
                  + " |\n|---|" + "---|" * len(layers)]
        for meth in (m.name for m in METHOD_INFO.values() if m.joint and m.derived_from is None):
            cells = []
            for L in layers:
                r = next((x for x in m["saes"] if x["layer"] == L and x["method"] == meth), None)
                cells.append("–" if r is None or r.get("paired_cosine") is None else
                             f"{r['paired_cosine']:.2f} / {r['centred_paired_cosine']:.2f} / "
                             f"{r['median_latent_corr']:.2f} / {r['top_latent_mass']:.2f} / {r['dead_vision']}")
            lines.append(f"| {meth} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def sae_convergence_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Every SAE of every run: dead latents per branch (of ``d_sae``), FVU pooled and per token, ``converged``."""
    fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
    lines = ["## SAEs: dead latents and FVU (held-out pairs)", "",
             "Dead = latents that never fire on the held-out pairs (vision / text branch); FVU on pooled pairs (vision / "
             "text) and on per-token states (vision / text); converged = < 10% dead in every branch and a late loss "
             "plateau.", "", "| model | layer | method | dead | FVU pooled | FVU per token | converged |",
             "|---|---|---|---|---|---|---|"]
    for model, m in runs.items():
        for r in m.get("saes", []):
            of = f" of {r['d_sae']}" if r.get("d_sae") else ""
            lines.append(f"| {model} | {r['layer']} | {r['method']} | {r.get('dead_vision', '–')} / {r.get('dead_text', '–')}{of} "
                         f"| {fmt(r.get('fvu_vision'))} / {fmt(r.get('fvu_text'))} "
                         f"| {fmt(r.get('fvu_vision_tokens'))} / {fmt(r.get('fvu_text_tokens'))} | {r.get('converged')} |")
    return [*lines, ""]


def sweep_report(models: list[str], interaction: dict[str, Any], runs: dict[str, dict[str, Any]] | None = None) -> str:
    """``report.md`` of a multi-model sweep: per-model tables, the model × layer interaction of log r50 per
    direction (sign-flip test over concepts, Holm-corrected), and links."""
    lines = ["# jsae sweep", "", f"models: {models}", ""]
    if runs:
        lines += sweep_tables(runs)
        lines += sae_convergence_table(runs)
    lines += ["## Model × layer interaction of log r50 (sign flips of each concept's interaction table)", ""]
    for key, r in interaction.items():
        lines.append(f"- {key}: " + (r["note"] if r.get("p_value") is None else
                                     f"T = {r['statistic']:.2f}, p = {r['p_value']:.4f}, Holm p = {r.get('p_holm', r['p_value']):.4f} "
                                     f"({r['n_concepts']} concepts)"))
    lines += ["", *[f"- [{m}]({m}/report.md)" for m in models]]
    return "\n".join(lines) + "\n"




# ---------------------------------------------------------------------------------------------------------------
# steering experiments (jsae run experiments)
# ---------------------------------------------------------------------------------------------------------------


def _plain(x: Any, digits: int = 3) -> str:
    """A table cell: ``–`` for None, yes/no, a float to ``digits`` places, text with ``|`` escaped."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (int, float)):
        return f"{x:.{digits}f}" if isinstance(x, float) else str(x)
    return str(x).replace("|", "\\|").replace("\n", " ")


def experiments_markdown(result: Mapping[str, Any]) -> str:
    """``experiments.md`` of :func:`jsae.protocol.experiments.run_experiments`'s result: the configuration, one grid table per experiment, the walk and the faults."""
    cfg = result.get("config", {})
    intro = (f"Run `{cfg.get('run_dir')}`, method `{cfg.get('method')}`, positions `{cfg.get('positions')}`, "
             f"α grid {cfg.get('alphas')}, {cfg.get('max_new_tokens')} new tokens, prompt {cfg.get('prompt')!r}.  "
             "Every α runs on every image; no α is chosen.")
    lines = ["# Steering experiments", "", intro, ""]
    for e in result.get("experiments", []):
        what = (f"Layer {e['layer']}, latents {e['latents']}, keywords {e['keywords']}, target {e['target']!r}, "
                f"{e['n_images']} image(s).")
        lines += [f"## {e['name']}", "", what, "",
                  "| α | keyword hit | hit unsteered | hit gain | similarity gain | perplexity | distinct-3 | zlib ratio |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in e["grid"]:
            lines.append(f"| {g['alpha']:g} | {_plain(g['keyword_hit_rate_steered'])} | {_plain(g['keyword_hit_rate_unsteered'])} | "
                         f"{_plain(g['keyword_hit_gain'])} | {_plain(g.get('similarity_gain'))} | "
                         f"{_plain(g.get('perplexity_steered'), 1)} | {_plain(g.get('distinct_3_steered'))} | "
                         f"{_plain(g.get('zlib_ratio_steered'))} |")
        if "reference_walk" in e:
            lines += ["", "The reference's walk (a reference fault, replayed on the same captions):", "",
                      "| image | reported α | stopped at | rule | keyword hit | similarity gain | perplexity |",
                      "|---|---|---|---|---|---|---|"]
            for w in e["reference_walk"]:
                alpha, stop = (("–" if a is None else f"{a:g}") for a in (w["alpha"], w["stopped_at"]))
                lines.append(f"| {_plain(w['image_id'])} | {alpha} | {stop} | "
                             f"{_plain(w['rule_text'])} | {_plain(w.get('keyword_hit'))} | {_plain(w.get('similarity_gain'))} | "
                             f"{_plain(w.get('perplexity'), 1)} |")
        lines.append("")
    if "faults" in result:
        lines += ["## Reference faults reproduced", "", "| fault | active | images where it fired | what |",
                  "|---|---|---|---|"]
        for f in result["faults"]:
            lines.append(f"| `{f['name']}` | {_plain(f['active'])} | {f['fired']} | {_plain(f['fault'])} |")
        lines += ["", "The walk's reported metrics (α per image) against the sound grid at one α for all images "
                      "(the grid α nearest the walk's median):", ""]
        for e in result.get("experiments", []):
            summ = e.get("reference_walk_summary") or {}
            g = summ.get("grid_at_fixed_alpha") or {}
            fixed = "–" if g.get("alpha") is None else f"{g['alpha']:g}"
            lines.append(f"- {e['name']}: walk keyword hit {_plain(summ.get('keyword_hit_rate'))}, similarity gain "
                         f"{_plain(summ.get('similarity_gain'))}, perplexity {_plain(summ.get('perplexity'), 1)}; grid at "
                         f"α={fixed}: keyword hit {_plain(g.get('keyword_hit_rate'))}, similarity gain "
                         f"{_plain(g.get('similarity_gain'))}, perplexity {_plain(g.get('perplexity'), 1)}")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# VISTA in the embedded world
# ---------------------------------------------------------------------------------------------------------------


def _interval(iv: dict[str, float]) -> str:
    """``mean [low, high] (n=N)`` of an interval record (:func:`jsae.vista.metrics.interval`)."""
    return f"{iv['mean']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}] (n={iv['n']})"


def vista_world_report(m: dict[str, Any], figure: bool) -> str:
    """``report.md`` of VISTA in the embedded world (:func:`jsae.vista.experiment.eval_world`'s metrics; ``figure``:
    link ``edit_example.png``)."""
    c = m["train"]["config"]
    model = {"toy-composed": "the toy LLaVA's vision tower and language model recomposed with a new projector "
                             "(jsae.vista.compose_toy('vlm'))",
             "toy-text-lm": "the toy text-only LM + the pre-VLM toy vision tower + a new projector (jsae.vista.compose_toy('text-only'))",
             "toy-dino-text-lm": "the toy text-only LM + the DINOv2-style toy tower (self-distillation, no labels) + a new "
                                 "projector (jsae.vista.compose_toy('text-only', tower='dino'))",
             }.get(c["model"], f"the shipped toy {c['model']}")
    lines = ["# VISTA in the embedded world", "",
             f"Model: {model}. Text SAEs (SAELens TopK, d_sae {c['d_sae']}, k {c['k']}) at layers {c['text_layers']}, trained on "
             f"the LM's per-token states of plain-text captions. Projectors {'from scratch' if c['reinit'] else 'from the model’s own'} "
             f"(seed {c['seed']}), {c['proj_steps']} steps × batch {c['batch_size']} each, lr {c['lr']}.", "",
             "## Text SAEs and their labels (from text only: the words of each latent's top-"
             f"{c.get('top_n', 20)} tokens)", "",
             markdown_table(m["train"]["text_saes"], ["layer", "fvu_text", "l0", "labelled", "labelled_fraction", "mean_purity",
                                                      "concepts_covered"]),
             f"## Matching rate (top-{m['eval_config']['k']} text-SAE latents of the mean image-token code whose label is present; 95% CI)", ""]
    rows = []
    for name, st in m["settings"].items():
        for layer, r in st["per_layer"].items():
            ratio = m["matching_ratio"][layer].get(name)
            rows.append({"setting": name, "λ": st["lam"], "constrained": st["layers"], "layer": layer,
                         "matching_rate": _interval(r["matching_rate"]), "localisation": _interval(r["localisation"]),
                         "recon_err": round(r["recon_err"], 3),
                         "ratio_vs_baseline": "" if ratio is None else f"{ratio['ratio']:.2f} [{ratio['low']:.2f}, {ratio['high']:.2f}]"})
    lines += [markdown_table(rows, ["setting", "λ", "constrained", "layer", "matching_rate", "ratio_vs_baseline", "localisation", "recon_err"]),
              "## Task performance per setting (greedy captions of held-out images: the performance–interpretability trade-off)", ""]
    rows = [{"setting": n, "object_recall": _interval(st["captions"]["object_recall"]), "object_precision": _interval(st["captions"]["object_precision"]),
             "final_train_ce": round(m["train"]["final"][n]["ce"], 4)} for n, st in m["settings"].items()]
    lines += [markdown_table(rows, ["setting", "object_recall", "object_precision", "final_train_ce"]),
              f"## Vision-only SAE (baseline projector's image tokens, layer {m['edit_layer']})", ""]
    rows = [{"labelling": k, **{f: v[f] for f in ("labelled", "labelled_fraction", "mean_purity", "concepts_covered")},
             "matching_rate (label split)": _interval(v["matching_rate_on_label_split"])} for k, v in m["vision_only_sae"].items()]
    lines += [markdown_table(rows, ["labelling", "labelled", "labelled_fraction", "mean_purity", "concepts_covered", "matching_rate (label split)"]),
              "`vision-only`: labelled like the text SAE, from its max-activating examples and words (the captions of its top "
              "images) — the fair baseline. `vision-only-masks`: labelled from ground-truth patch masks — stronger supervision "
              "than VISTA gets, an upper reference.", "",
              f"## Patch-local edits at layer {m['edit_layer']}", "",
              f"{m['edits']['n_eligible']} eligible images (≥ 2 objects of distinct types, every object named by both projectors' "
              f"unedited captions); the first {m['edits']['n_calibration']} choose the replacement gain per method, "
              f"{m['edits']['n_scored']} are scored.", ""]
    if not m["edits"]["n_scored"]:
        lines += ["No image was scored, so removal and replacement are not measured for this model (an image is eligible "
                  "only when both projectors' unedited captions name every object).", ""]
        lines += ["Definitions: see `jsae.vista.metrics` (matching rate, localisation, removal, replacement, labels).", ""]
        return "\n".join(lines)
    rows = []
    for method in ("vista", "vision-only", "vision-only-masks"):
        e = m["edits"][method]
        rows.append({"method": method, "projector": e["projector"], "labelled": e["labelled_latents"],
                     "removal": _interval(e["removal"]), "replacement": _interval(e["replacement"]),
                     "replacement_in_place": _interval(e["replacement_in_place"]), "gain": e["gain"]})
    lines += [markdown_table(rows, ["method", "projector", "labelled", "removal", "replacement", "replacement_in_place", "gain"])]
    for ref, g in m["edit_gains"].items():
        for measure, paper in (("removal", "+35%/+38%"), ("replacement", "+47%/+58%")):
            x = g[measure]
            iv = x["absolute_gain_interval"]
            rel = "n/a" if not math.isfinite(x["relative_gain"]) else f"{x['relative_gain']:+.0%}"
            lines += [f"{measure.capitalize()} vs {ref}: VISTA {x['vista']:.3f} vs {x['reference']:.3f} ({x['absolute_gain']:+.3f} "
                      f"absolute [{iv['low']:+.3f}, {iv['high']:+.3f}] paired, {rel} relative; paper {paper}).", ""]
    if figure:
        lines += ["![edit example](edit_example.png)", ""]
    lines += ["Definitions: see `jsae.vista.metrics` (matching rate, localisation, removal, replacement, labels).", ""]
    return "\n".join(lines)



# ---------------------------------------------------------------------------------------------------------------
# world fidelity (jsae world fidelity)
# ---------------------------------------------------------------------------------------------------------------


def _median_r50(recs: dict[str, Any]) -> str:
    rs = [r.get("r50") for r in recs.values()]
    reached = sorted(r for r in rs if r is not None)
    if not rs:
        return "–"
    med = float(np.median([r if r is not None else math.inf for r in rs]))
    return f"{len(reached)}/{len(rs)}; {'∞' if not math.isfinite(med) else f'{med:.2g}'}"


def fidelity_table(result: dict[str, Any]) -> str:
    """The per-layer fidelity table (markdown): logit lens at single-object image tokens (and at caption tokens),
    the oracles' mean cosine, and each oracle's steering at image and generated tokens as "types reaching +0.5;
    median r50" (∞: the median type never reaches it); where measured, the same cosine and image-token steering
    for the oracles taken within scenes of equal object count ("count-matched")."""
    lens, cap = result["logit_lens"]["image_tokens"], result["logit_lens"]["caption_tokens"]
    orc = result.get("oracles", {})
    head = ("| layer | lens top-5 (image tokens) | right of six | median rank | lens top-5 (caption) | oracle cosine "
            "| image oracle @image | text oracle @image | image oracle @generated | text oracle @generated |")
    matched = any(o.get("cosine_matched") for o in orc.values())
    if matched:
        head += " oracle cosine, count-matched | image oracle @image, count-matched | text oracle @image, count-matched |"
    lines = [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for L in sorted(lens, key=int):
        li, lc = lens[L], cap.get(L, {})
        fmt = lambda d, k: "–" if not d.get("n_tokens") else (  # noqa: E731
            f"{d[k]['value']:.2f} [{d[k]['ci'][0]:.2f}, {d[k]['ci'][1]:.2f}]")
        o = orc.get(L, {})
        cos = o.get("cosine", {})
        cells = [L, fmt(li, "top5"), fmt(li, "right_of_six"), f"{li.get('median_rank', float('nan')):.0f}",
                 fmt(lc, "top5"), f"{np.mean(list(cos.values())):.2f}" if cos else "–"]
        for pos in ("image", "generated"):
            for m in ("oracle", "text-oracle"):
                rec = o.get(pos, {})
                cells.append(_median_r50(rec[m]) if m in rec else ("n/a" if "reason" in rec else "–"))
        if matched:
            cm = o.get("cosine_matched", {})
            cells.append(f"{np.mean(list(cm.values())):.2f}" if cm else "–")
            rec = o.get("image", {})
            for m in ("oracle-matched", "text-oracle-matched"):
                cells.append(_median_r50(rec[m]) if m in rec else ("n/a" if "reason" in rec else "–"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


__all__ = ["experiments_markdown", "fidelity_table", "markdown_table", "protocol_report", "sae_convergence_table", "sweep_report", "sweep_tables",
           "vista_world_report", "what_this_shows"]
