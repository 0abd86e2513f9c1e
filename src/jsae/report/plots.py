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


__all__ = ["plot_dose_response"]
