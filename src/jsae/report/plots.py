"""The dose–response plot (PNG) of a protocol run.  Takes plain data and writes the file atomically."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from jsae.files import write_atomic
from jsae.report.rundir import METHOD_INFO


# ---- plots --------------------------------------------------------------------------------------


#: One colour per method (Okabe–Ito, readable with colour-blindness), one line style per decoder: text directions
#: dashed with square markers, vision directions solid with round ones, so ``jsae:text`` and ``jsae:vision`` share a
#: colour and differ in style, and ``jsae`` and ``jsae-none`` differ in colour.
METHOD_COLOURS = {"oracle": "#000000", "text-oracle": "#777777", **{m.name: m.colour for m in METHOD_INFO.values()}}
_EXTRA_COLOURS = ("#D55E00", "#56B4E9", "#F0E442", "#882255")


def direction_style(key: str) -> dict[str, Any]:
    """Matplotlib style of a direction ``method[:decoder]`` in :func:`plot_dose_response`."""
    method, _, decoder = key.partition(":")
    colour = METHOD_COLOURS.get(method) or _EXTRA_COLOURS[sum(map(ord, method)) % len(_EXTRA_COLOURS)]
    text = decoder == "text" or method == "text-oracle"
    return {"color": colour, "ls": "--" if text else "-", "marker": "s" if text else "o", "ms": 3.5,
            "lw": 2.0 if method in ("oracle", "text-oracle") else 1.4}


def plot_dose_response(bands: dict[str, dict[str, dict[str, float | list]]], n_layers: int, path: str | Path,
                       title: str = "", xlabel: str = "strength (× mean per-token image-state norm)",
                       suppression: dict[str, dict[str, dict[str, float | list]]] | None = None) -> Path:
    """The dose–response figure: a column per swept layer and a row per measure — steering effect (share of
    captions newly mentioning the concept), preservation while steering (share of the other objects still
    named), and, given ``suppression`` bands, the suppression effect (share of captions that stop mentioning it,
    under negative steering) — a line per direction (colour = method, dashed = text decoder, solid = vision
    decoder), 95% image-bootstrap intervals of the effects as error bars (shaded bands of seven directions
    overlap into grey), the legend outside the panels.  ``bands[key][layer]`` holds ``strengths``, ``effect``,
    ``low``, ``high`` and ``preservation`` (means over concepts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    layers = sorted({int(L) for by_layer in bands.values() for L in by_layer})
    if not layers:
        raise ValueError("nothing to plot: no dose-response bands")
    rows = [("steering: effect", bands, "effect"), ("steering: preservation", bands, "preservation")]
    if suppression:
        rows.append(("suppression: effect", suppression, "effect"))
    family = {"oracle": 0, "text-oracle": 1}
    keys = sorted({*bands, *(suppression or {})}, key=lambda k: (family.get(k.partition(":")[0], 2), k.partition(":")[0],
                                                                 k.partition(":")[2] != "text"))
    fig, axes = plt.subplots(len(rows), len(layers), figsize=(min(3.3 * len(layers), 16) + 2.2, 2.5 * len(rows) + 0.9),
                             squeeze=False, sharey=True)
    for r, (row_name, data, field) in enumerate(rows):
        for c, L in enumerate(layers):
            ax = axes[r][c]
            missing, ticks = [], set()
            present = [k for k in keys if (data.get(k) or {}).get(str(L)) or (data.get(k) or {}).get(L)]
            for i, key in enumerate(present):
                b = data[key].get(str(L)) or data[key].get(L)
                values = b.get(field)
                if values is None:
                    continue
                ticks.update(float(v) for v in b["strengths"])
                x = np.asarray(b["strengths"], float)
                y = np.array([np.nan if v is None else v for v in values], float)
                st = direction_style(key)
                if field == "effect" and b.get("low") is not None:  # dodged error bars: one per direction, no mud
                    dodge = x * 1.045 ** (i - (len(present) - 1) / 2)
                    lo = np.array([np.nan if v is None else v for v in b["low"]], float)
                    hi = np.array([np.nan if v is None else v for v in b["high"]], float)
                    ax.errorbar(dodge, y, yerr=[np.clip(y - lo, 0, None), np.clip(hi - y, 0, None)], fmt="none",
                                ecolor=st["color"], elinewidth=0.7, alpha=0.55)
                    ax.plot(dodge, y, label=key, **st)
                else:
                    ax.plot(x, y, label=key, **st)
            missing = [k for k in (bands if field != "effect" or data is bands else suppression or {}) if k not in present]
            ax.set_xscale("log")
            if ticks:  # the grid's own strengths as plain numbers (log-scale minor labels overlap)
                ax.set_xticks(sorted(ticks), [f"{v:g}" for v in sorted(ticks)], fontsize=7)
                ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            if missing:  # a direction without a curve here is said so, not just absent
                ax.text(0.02, 0.97, "no curve: " + ", ".join(missing), transform=ax.transAxes, va="top", fontsize=6,
                        color="dimgrey", wrap=True)
            if field == "effect":
                ax.axhline(0.5, color="grey", lw=0.7, ls=":")
            ax.axhline(0, color="grey", lw=0.6)
            ax.set_ylim(-0.08, 1.05)
            ax.grid(True, axis="y", lw=0.3, alpha=0.5)
            if r == 0:
                ax.set_title(f"layer {L} of {n_layers}", fontsize=10)
            if r == len(rows) - 1:
                ax.set_xlabel(xlabel if data is bands else "strength (× norm), negative direction", fontsize=8)
            if c == 0:
                ax.set_ylabel(row_name, fontsize=9)
    handles: dict[str, Any] = {}
    for ax in axes.flat:  # every direction in the legend, also one without a curve in some panel
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    order = [k for k in keys if k in handles]
    fig.legend([handles[k] for k in order], order, loc="center right", fontsize=8, frameon=False,
               title="direction\n(colour: method;\n- - text decoder,\n— vision decoder)", title_fontsize=8)
    fig.suptitle((title + "\n" if title else "") + "dotted line: +0.5 (r50 is where the effect crosses it); "
                 "error bars: 95% intervals over images and concepts", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / fig.get_figwidth(), 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def plot_fidelity(results: dict[str, dict[str, Any]], path: str | Path) -> Path:
    """World fidelity of several VLMs (``results[label]`` from :func:`jsae.protocol.fidelity.world_fidelity`), one
    line each over decoder layers: the logit lens at single-object image tokens (type word in the top 5; right
    type of six, chance dotted), the image and text oracles' cosine, and the types the text oracle steers to +0.5
    at the image tokens within 2× the image oracle's r50 (dotted: both oracles taken within scenes of equal object
    count, where measured)."""
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
        thin = style | dict(ls=":", marker="^", label=f"{label}, count-matched oracles")
        for ax, key in ((axes[2], "mean_cosine_matched"), (axes[3], "text_oracle_within_2x_matched")):
            lm = [L for L in ls if per[str(L)].get(key) is not None]
            if lm:  # the oracles taken within scenes of equal object count
                ax.plot(lm, [per[str(L)][key] for L in lm], **thin)
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
    if any(ln.get_label().endswith("count-matched oracles") for ln in axes[2].get_lines()):
        axes[2].legend(handles=[ln for ln in axes[2].get_lines() if ln.get_label().endswith("count-matched oracles")],
                       fontsize=6, loc="lower left")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


__all__ = ["METHOD_COLOURS", "direction_style", "plot_dose_response", "plot_fidelity"]
