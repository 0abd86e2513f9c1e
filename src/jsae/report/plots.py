"""Results people look at: the layer-sweep plot (PNG), a self-contained feature browser (HTML) and
``report.md``.  Everything here takes plain data (dicts, arrays, PIL images) and writes files
atomically; nothing here knows about models.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from PIL import Image

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


# ---- images -------------------------------------------------------------------------------------


def heatmap_overlay(image: Image.Image, grid: np.ndarray, scale: int = 3) -> Image.Image:
    """The image with a per-patch activation grid ``[rows, cols]`` laid over it in red."""
    img = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    g = np.asarray(grid, dtype=float)
    g = g / g.max() if g.max() > 0 else g
    heat = Image.fromarray((g * 255).astype(np.uint8), mode="L").resize(img.size, Image.NEAREST)
    red = Image.new("RGB", img.size, (255, 0, 0))
    return Image.composite(red, img, heat.point(lambda v: int(v * 0.6)))


def png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---- feature browser ----------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
#q{font-size:1.1em;padding:.3em;width:24em}
.feature{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.8em;margin:.8em 0}
.feature h2{font-size:1.05em;margin:0 0 .4em}
.kind{font-size:.8em;padding:.1em .4em;border-radius:3px;background:#eee}
.shared{background:#d4f4d4}.vision-only{background:#d4e4f8}.text-only{background:#f8e8cc}
.imgs img{margin:2px;border:1px solid #ccc;image-rendering:pixelated}
.caps{font-size:.9em;color:#444}.steer{font-size:.9em}
"""

_JS = """
function filt(){const q=document.getElementById('q').value.toLowerCase();
for(const f of document.querySelectorAll('.feature')){f.style.display=f.dataset.search.includes(q)?'':'none';}
document.getElementById('count').textContent=[...document.querySelectorAll('.feature')].filter(f=>f.style.display!=='none').length;}
"""


def feature_browser(features: Iterable[dict[str, Any]], path: str | Path, title: str = "jsae features") -> Path:
    """A self-contained static page (no CDN, no network).  Each feature dict has ``feature``, ``label``,
    ``kind``, ``purity``, optional ``layer``, ``top_images`` (list of (PIL image, patch grid or None)),
    ``top_captions`` (list of str) and optional ``steering`` (str)."""
    cards = []
    for f in features:
        imgs = "".join(
            f'<img alt="top image" src="{png_data_uri(heatmap_overlay(im, grid) if grid is not None else im)}">'
            for im, grid in f.get("top_images", [])
        )
        caps = "".join(f"<li>{html.escape(c)}</li>" for c in f.get("top_captions", []))
        label = f.get("label") or "unlabelled"
        layer = f" · layer {f['layer']}" if "layer" in f else ""
        search = html.escape(f"{f['feature']} {label} {f.get('kind', '')}{layer}".lower())
        steer = f'<div class="steer">steering: {html.escape(str(f["steering"]))}</div>' if f.get("steering") else ""
        cards.append(
            f'<div class="feature" data-search="{search}"><h2>feature {f["feature"]}{layer}: {html.escape(label)} '
            f'<span class="kind {html.escape(f.get("kind", ""))}">{html.escape(f.get("kind", ""))}</span> '
            f'purity {f.get("purity", 0):.2f}</h2><div class="imgs">{imgs}</div><ul class="caps">{caps}</ul>{steer}</div>'
        )
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"<script>{_JS}</script></head><body><h1>{html.escape(title)}</h1>"
            f"<input id='q' placeholder='search label, kind, feature id' oninput='filt()'> "
            f"<span id='count'>{len(cards)}</span> features{''.join(cards)}</body></html>")
    return write_atomic(path, page)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return head + "".join("| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |\n" for r in rows)
