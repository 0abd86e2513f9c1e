"""Markdown: tables and the ``report.md`` of a protocol run and of a multi-model sweep."""

from __future__ import annotations

import json
from typing import Any


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return head + "".join("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)


def protocol_report(m: dict[str, Any]) -> str:
    """``report.md`` of a protocol run from its ``metrics.json``."""
    lines = [f"# jsae demo: {m['model']}", "",
             f"{m['n_layers']} decoder layers; swept layers {m['layers']}; concepts {m['concepts']}; methods {m['methods']}.", "",
             "## SAEs (held-out pairs)", "",
             markdown_table(m["saes"], ["layer", "method", "fvu_vision", "fvu_text", "l0_vision", "l0_text", "paired_cosine",
                                        "shared", "vision-only", "text-only"]),
             "## Steering and suppression per layer (mean over concepts, 95% CI)", ""]
    rows = []
    for measure, by_method in m["summary"].items():
        for method, by_layer in by_method.items():
            for layer, s in sorted(by_layer.items(), key=lambda kv: int(kv[0])):
                rows.append({"measure": measure, "method": method, "layer": int(layer), "effect": s["mean"],
                             "ci": f"[{s['low']:.3f}, {s['high']:.3f}]", "cohens_h": s["cohens_h"], "images": s["n_images"]})
    lines += [markdown_table(rows, ["measure", "method", "layer", "effect", "ci", "cohens_h", "images"]),
              "## Cells", "", markdown_table(m["cells"], ["measure", "method", "layer", "concept", "n", "mean", "low", "high",
                                                          "alpha", "rate_before", "rate_after", "preservation"]),
              "![layer sweep](layer_sweep.png)", "", "Feature browser: [features.html](features.html)", ""]
    steering = [c for c in m["cells"] if c["measure"] == "steering" and c.get("distinct_3_before") is not None]
    if steering:
        lines += ["## Text quality of the steered captions (the reference's distinct-3 and zlib ratio)", "",
                  "Mean over each cell's captions, unsteered → steered (distinct-3: distinct word trigrams / trigrams, "
                  "1 = no repetition; zlib ratio: bytes / compressed bytes, higher = more repetitive).", "",
                  markdown_table([{**c, "distinct_3": _pair(c, "distinct_3"), "zlib_ratio": _pair(c, "zlib_ratio")}
                                  for c in steering], ["method", "layer", "concept", "alpha", "distinct_3", "zlib_ratio"])]
    ref = m.get("reference")
    if ref is not None:
        lines += ["## Differences from the reference", "",
                  "Run with `--preset reference` (the JSAE reference code, `anonymous-lab25/anonymous-jsae`): text pooled "
                  "over every attended non-image token, steering at the image tokens and every generated token, absolute "
                  "α 0.2..3.0, 50 new tokens, the JSAE methods trained by the reference's recipe. What still differs:", "",
                  *[f"- {d}" for d in ref.get("differences", [])], ""]
    if "interaction" in m:
        lines += ["## Model × layer interaction", "", f"```\n{json.dumps(m['interaction'], indent=1)}\n```", ""]
    return "\n".join(lines)


def _pair(cell: dict[str, Any], key: str) -> str:
    """``"before → after"`` of a steering cell's text-quality metric ``key``."""
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    return f"{fmt(cell.get(key + '_before'))} → {fmt(cell.get(key))}"


def sweep_report(models: list[str], interaction: dict[str, Any]) -> str:
    """``report.md`` of a multi-model sweep: the model × layer interaction test per measure, and links."""
    lines = ["# jsae sweep", "", f"models: {models}", "", "## Model × layer interaction (jsae, per-image scores)", ""]
    for measure, r in interaction.items():
        lines.append(f"- {measure}: " + ("not testable (needs both models with cells at >= 2 layers)" if r is None else
                                         f"F = {r['f_statistic']:.2f}, permutation p = {r['p_value']:.4f} "
                                         f"(df {r['df_interaction']}, {r['df_residual']})"))
    lines += ["", *[f"- [{m}]({m}/report.md)" for m in models]]
    return "\n".join(lines) + "\n"


__all__ = ["markdown_table", "protocol_report", "sweep_report"]
