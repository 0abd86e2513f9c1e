"""The layer-sweep plot (PNG) of a protocol run.  Takes plain data and writes the file atomically."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from jsae.files import write_atomic


# ---- plots --------------------------------------------------------------------------------------


def plot_layer_sweep(summary: dict[str, dict[str, dict[str, dict[str, float]]]], n_layers: int, path: str | Path,
                     title: str = "") -> Path:
    """``summary[measure][method][layer] = {"mean", "low", "high"}`` for measure in steering/suppression."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measures = [m for m in ("steering", "suppression") if m in summary]
    fig, axes = plt.subplots(1, len(measures), figsize=(5.5 * len(measures), 4), squeeze=False)
    for ax, measure in zip(axes[0], measures):
        for i, (method, by_layer) in enumerate(sorted(summary[measure].items())):
            layers = sorted(by_layer, key=int)
            x = np.array([int(l) for l in layers]) + (i - 1) * 0.08
            mean = np.array([by_layer[l]["mean"] for l in layers])
            err = np.array([[by_layer[l]["mean"] - by_layer[l]["low"], by_layer[l]["high"] - by_layer[l]["mean"]]
                            for l in layers]).T
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=method)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.set_xlabel(f"decoder layer (of {n_layers})")
        ax.set_ylabel("mention rate change" if measure == "steering" else "mention rate drop")
        ax.set_title(f"{measure} (95% bootstrap CI)")
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


__all__ = ["plot_layer_sweep"]
