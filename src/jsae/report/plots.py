"""The dose–response plot (PNG) of a protocol run.  Takes plain data and writes the file atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from jsae.files import write_atomic


# ---- plots --------------------------------------------------------------------------------------


def plot_dose_response(bands: dict[str, dict[str, dict[str, dict[str, float | list]]]], n_layers: int,
                       path: str | Path, title: str = "", xlabel: str = "strength (× mean per-token image-state norm)") -> Path:
    """Effect (solid) and preservation (dashed) against strength, a panel per layer, a line per direction,
    95% image-bootstrap intervals of the effect shaded.  ``bands[key][layer]`` holds ``strengths``,
    ``effect``, ``low``, ``high`` and ``preservation`` (means over concepts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    layers = sorted({int(L) for by_layer in bands.values() for L in by_layer})
    if not layers:
        raise ValueError("nothing to plot: no dose-response bands")
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 3.8), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, L in zip(axes[0], layers):
        missing, ticks = [], set()
        for i, key in enumerate(sorted(bands, key=lambda k: (k != "oracle", k))):
            b = bands[key].get(str(L)) or bands[key].get(L)
            if not b:
                missing.append(key)
                continue
            ticks.update(float(v) for v in b["strengths"])
            x = np.asarray(b["strengths"], float)
            col = "black" if key == "oracle" else colours[i % len(colours)]
            ax.plot(x, b["effect"], marker="o", ms=3, color=col, label=key, lw=2 if key == "oracle" else 1.2)
            ax.fill_between(x, b["low"], b["high"], color=col, alpha=0.15)
            if b.get("preservation") is not None:
                pres = np.array([np.nan if v is None else v for v in b["preservation"]], float)
                ax.plot(x, pres, ls="--", color=col, lw=0.8)
        ax.set_xscale("log")
        if ticks:  # the grid's own strengths as plain numbers (log-scale minor labels overlap)
            ax.set_xticks(sorted(ticks), [f"{v:g}" for v in sorted(ticks)], fontsize=7)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        if missing:  # a direction without a curve here is said so, not just absent
            ax.text(0.02, 0.98, "no curve: " + ", ".join(missing), transform=ax.transAxes, va="top", fontsize=6,
                    color="grey", wrap=True)
        ax.axhline(0.5, color="grey", lw=0.6, ls=":")
        ax.axhline(0, color="grey", lw=0.6)
        ax.set_title(f"layer {L} of {n_layers}")
        ax.set_xlabel(xlabel)
    axes[0][0].set_ylabel("effect (solid), preservation (dashed)")
    handles: dict[str, Any] = {}
    for ax in axes[0]:  # every direction in the legend, also one without a curve in the last panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    axes[0][-1].legend(list(handles.values()), list(handles), fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def plot_fidelity(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """World fidelity of several VLMs (``results[label]`` from :func:`jsae.protocol.fidelity.world_fidelity`), one
    line each over decoder layers: the logit lens at single-object image tokens (type word in the top 5; right
    type of six, chance dotted), the image and text oracles' cosine, and the types the text oracle steers to +0.5
    at the image tokens within 2× the image oracle's r50."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("nothing to plot: no fidelity results")
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    panels = [("logit lens: type word in top 5\n(single-object image tokens)", "top5"),
              ("logit lens: right type of six", "right_of_six"),
              ("cosine of image and text oracle\n(mean over types)", "cosine"),
              ("types the text oracle steers at image tokens\n(within 2× the image oracle's r50)", "within")]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    models = sorted({label.split("-", 1)[-1] for label in results})  # "old-llava" and "new-llava": one colour
    for label, r in results.items():
        lens = r["logit_lens"]["image_tokens"]
        layers = sorted(int(L) for L in lens if lens[L].get("n_tokens"))
        style = dict(color=colours[models.index(label.split("-", 1)[-1]) % len(colours)], marker="o", ms=4, label=label,
                     ls="--" if label.startswith("old") else "-")
        for ax, key in zip(axes[:2], ("top5", "right_of_six")):
            v = [lens[str(L)][key]["value"] for L in layers]
            lo = [lens[str(L)][key]["ci"][0] for L in layers]
            hi = [lens[str(L)][key]["ci"][1] for L in layers]
            ax.plot(layers, v, **style)
            ax.fill_between(layers, lo, hi, color=style["color"], alpha=0.15)
        per = (r.get("summary") or {}).get("steering_per_layer", {})
        ls = sorted(int(L) for L in per)
        axes[2].plot(ls, [per[str(L)]["mean_cosine"] for L in ls], **style)
        axes[3].plot(ls, [per[str(L)]["text_oracle_within_2x"] for L in ls], **style)
    first = next(iter(results.values()))
    chance = first["logit_lens"]["image_tokens"]["0"].get("chance", {})
    for ax, key in zip(axes[:2], ("top5", "right_of_six")):
        if key in chance:
            ax.axhline(chance[key], color="grey", ls=":", lw=1, label="chance")
        ax.set_ylim(0, 1)
    axes[0].axhline(0.25, color="red", lw=0.6, ls="-.", label="target")
    axes[1].axhline(0.5, color="red", lw=0.6, ls="-.")
    axes[2].axhline(0.6, color="red", lw=0.6, ls="-.")
    axes[2].set_ylim(-0.2, 1)
    axes[3].axhline(5, color="red", lw=0.6, ls="-.")
    axes[3].set_ylim(-0.3, 6.3)
    for ax, (title, _) in zip(axes, panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("decoder layer")
    axes[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


__all__ = ["plot_dose_response", "plot_fidelity"]
