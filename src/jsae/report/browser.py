"""The feature browser: a self-contained HTML page of an SAE's labelled features, each with its top
images (the per-patch activation map laid over them), its top captions and, from a protocol run, its
steering result.

:func:`token_codes` runs the VLM on (image, caption) pairs (through :func:`jsae.activations.read_layers`)
and encodes every token with the JSAE's vision and text branches; the browser and the Neuronpedia export
both read features from it (:func:`top_examples`, :func:`heat_map`).
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from jsae.adapters import sae_layer
from jsae.adapters.base import GRID_COL, GRID_REGION, GRID_ROW
from jsae.files import write_atomic
from jsae.labels import FeatureLabels


# ---- per-token codes ------------------------------------------------------------------------------


@dataclass
class TokenCodes:
    """Per-token JSAE codes of a set of pairs at one layer (rows left-padded to one length)."""

    images: list[Any]
    captions: list[str]
    zv_tok: Tensor  # [B, S, d_sae] vision-branch codes of every token
    zt_tok: Tensor  # [B, S, d_sae] text-branch codes of every token
    image_mask: Tensor  # [B, S]
    caption_mask: Tensor  # [B, S]
    grid: Tensor  # [B, S, 4] adapter.patch_grid

    @property
    def zv(self) -> Tensor:
        """[B, d_sae] vision codes mean-pooled over each image's tokens."""
        w = self.image_mask.float()
        return (self.zv_tok * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)

    @property
    def zt(self) -> Tensor:
        """[B, d_sae] text codes mean-pooled over each caption's tokens."""
        w = self.caption_mask.float()
        return (self.zt_tok * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)


@dataclass
class TokenStates:
    """Per-token states of a set of pairs at some layers (rows left-padded to one length), read in one pass."""

    images: list[Any]
    captions: list[str]
    states: dict[int, Tensor]  # layer -> [B, S, d_in]
    image_mask: Tensor  # [B, S]
    caption_mask: Tensor  # [B, S]
    grid: Tensor  # [B, S, 4] adapter.patch_grid

    @torch.no_grad()
    def codes(self, sae: Any, layer: int) -> TokenCodes:
        """Both branches of the JSAE ``sae`` on every token of ``layer``."""
        x = self.states[layer]
        return TokenCodes(self.images, self.captions, sae.encode(x, "vision"), sae.encode(x, "text"), self.image_mask,
                          self.caption_mask, self.grid)


@torch.no_grad()
def token_states(vlm: Any, pairs: Sequence[tuple[Any, str]], layers: Sequence[int], batch_size: int = 50) -> TokenStates:
    """Run ``vlm`` (``jsae.load_vlm``) once on ``pairs`` and keep every token's state at ``layers``."""
    from jsae.activations import read_layers

    model, processor, adapter = vlm
    images, captions = [p[0] for p in pairs], [p[1] for p in pairs]
    outs = []
    for i in range(0, len(images), batch_size):
        enc = adapter.build_inputs(processor, images[i:i + batch_size], captions[i:i + batch_size])
        states = read_layers(model, adapter, enc, list(layers))
        outs.append(({L: states[L].float().cpu() for L in layers}, adapter.image_token_mask(enc), adapter.patch_grid(enc),
                     enc["caption_mask"]))
    width = max(o[1].shape[1] for o in outs)

    def pad(x: Tensor, value: float) -> Tensor:  # left padding, as the processor pads
        return torch.nn.functional.pad(x, (0, 0, width - x.shape[1], 0) if x.dim() == 3 else (width - x.shape[1], 0), value=value)

    return TokenStates(images, captions, {L: torch.cat([pad(o[0][L], 0.0) for o in outs]) for L in layers},
                       torch.cat([pad(o[1], False) for o in outs]), torch.cat([pad(o[3], False) for o in outs]),
                       torch.cat([pad(o[2], -1) for o in outs]))


def token_codes(vlm: Any, sae: Any, pairs: Sequence[tuple[Any, str]], layer: int | None = None,
                batch_size: int = 50) -> TokenCodes:
    """Run ``vlm`` (``jsae.load_vlm``) on ``pairs`` and encode every token of decoder layer ``layer``
    (default: the SAE's) with both branches of the JSAE ``sae``."""
    layer = sae_layer(sae) if layer is None else layer
    return token_states(vlm, pairs, [layer], batch_size).codes(sae, layer)


def heat_map(codes: TokenCodes, b: int, feature: int) -> np.ndarray:
    """[rows, cols] activation of ``feature`` on the base patch grid of image ``b`` (max over duplicates)."""
    g = codes.grid[b]
    sel = codes.image_mask[b] & (g[:, GRID_ROW] >= 0) & (g[:, GRID_REGION] == 0)
    cells = g[sel]
    heat = np.zeros((int(cells[:, GRID_ROW].max()) + 1, int(cells[:, GRID_COL].max()) + 1))
    for r, c, a in zip(cells[:, GRID_ROW].tolist(), cells[:, GRID_COL].tolist(), codes.zv_tok[b][sel][:, feature].tolist()):
        heat[r, c] = max(heat[r, c], a)
    return heat


def top_examples(codes: TokenCodes, feature: int, n: int) -> tuple[list[int], list[int]]:
    """Indices of the ``n`` images and ``n`` captions on which ``feature`` fires most (pooled codes)."""
    return (codes.zv[:, feature].argsort(descending=True)[:n].tolist(),
            codes.zt[:, feature].argsort(descending=True)[:n].tolist())


def strongest_labelled(labels: FeatureLabels, n: int | None = None) -> list[Any]:
    """The labelled features, strongest (vision + text correlation) first."""
    chosen = sorted((lab for lab in labels.labels if lab.label), key=lambda lab: -(lab.vision_corr + lab.text_corr))
    return chosen[:n] if n else chosen


def browser_features(codes: TokenCodes, labels: FeatureLabels, layer: int, cells: Sequence[Any] = (),
                     n_features: int = 24, n_images: int = 4, method: str = "jsae") -> list[dict[str, Any]]:
    """Per labelled feature: top images with their heat maps, top captions and the steering curve of ``method``
    that used it (``cells``: the curve summaries of a protocol run, :meth:`RunDir.curves`)."""
    steer = [c for c in cells if c["measure"] == "steering" and c["key"].startswith(f"{method}:") and c["layer"] == layer]
    feats = []
    for lab in strongest_labelled(labels, n_features):
        j = lab.feature
        top_img, top_cap = top_examples(codes, j, n_images)
        # only the steering of the concept the feature is labelled with (a feature can be among another concept's top 3)
        st = [c for c in steer if j in c.get("features", []) and c["concept"] == lab.label]
        feats.append({"feature": j, "layer": layer, "label": lab.label, "kind": lab.kind, "purity": lab.purity,
                      "top_images": [(codes.images[b], heat_map(codes, b, j)) for b in top_img],
                      "image_holds": [names(codes.captions[b], lab.label) for b in top_img],
                      "top_captions": [codes.captions[b] for b in top_cap],
                      "caption_holds": [names(codes.captions[b], lab.label) for b in top_cap],
                      "steering": "; ".join(steering_line(c) for c in st) or None})
    return feats


def names(caption: str, concept: str) -> bool:
    """Does ``caption`` name ``concept`` (the world's grammar: a type, category or colour; else a caption word)?"""
    from jsae.data.judges import caption_words
    from jsae.world.concepts import mentions

    try:
        return bool(mentions(caption, concept))
    except (ValueError, KeyError, IndexError):  # not a world caption
        return concept in caption_words(caption)


def steering_line(c: dict[str, Any]) -> str:
    """One steering curve summary in the report's words (``not reached`` for an r50 beyond the grid)."""
    r50 = c.get("r50")
    r50 = "not reached" if r50 is None or r50 == float("inf") else f"{r50:.2f}"
    effect = c.get("effect_small")
    effect = "–" if effect is None else f"{effect:+.2f}"
    return (f"'{c['concept']}' via {c['key']} at {c.get('positions', 'image')}: r50 {r50} (× the mean image-token norm), "
            f"effect at r = 1 {effect}")


# ---- the page -------------------------------------------------------------------------------------


def heatmap_overlay(image: Image.Image, grid: np.ndarray, scale: int = 3) -> Image.Image:
    """The image with a per-patch activation grid ``[rows, cols]`` shown in a way that stays visible on any scene
    (no colour of its own, which a red or orange object would hide): patches where the feature is weak are dimmed
    toward grey in proportion, and patches at ≥ half its maximum are framed black-and-white."""
    from PIL import ImageDraw

    img = image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST)
    g = np.asarray(grid, dtype=float)
    g = g / g.max() if g.max() > 0 else g
    keep = Image.fromarray((np.clip(0.25 + 0.75 * g, 0, 1) * 255).astype(np.uint8), mode="L").resize(img.size, Image.NEAREST)
    grey = Image.new("RGB", img.size, (40, 40, 40))
    out = Image.composite(img, grey, keep)
    draw = ImageDraw.Draw(out)
    ph, pw = img.height / g.shape[0], img.width / g.shape[1]
    for r, c in zip(*np.nonzero(g >= 0.5)):
        box = (int(c * pw), int(r * ph), int((c + 1) * pw) - 1, int((r + 1) * ph) - 1)
        draw.rectangle(box, outline=(0, 0, 0), width=3)
        draw.rectangle((box[0] + 1, box[1] + 1, box[2] - 1, box[3] - 1), outline=(255, 255, 255), width=1)
    return out


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
.imgs figure{display:inline-block;margin:2px;text-align:center}.imgs figcaption{font-size:.8em}
.imgs img{border:1px solid #ccc;image-rendering:pixelated}.tally{list-style:none;color:#666;font-size:.9em}
.caps{font-size:.9em;color:#444}.steer{font-size:.9em}
"""

_JS = """
function filt(){const q=document.getElementById('q').value.toLowerCase();
const sel=document.getElementById('sae');const sec=sel?sel.value:null;let n=0;
for(const s of document.querySelectorAll('.section')){s.style.display=(sec===null||s.dataset.section===sec)?'':'none';}
for(const f of document.querySelectorAll('.feature')){const on=f.dataset.search.includes(q)&&(sec===null||f.closest('.section').dataset.section===sec);
f.style.display=on?'':'none';n+=on;}
document.getElementById('count').textContent=n;}
"""

LEGEND = ("<p class='legend'><b>kind</b>: <span class='kind shared'>shared</span> the feature's image code and its caption "
          "code both correlate with its label (≥ the labelling threshold) over held-out image–caption pairs; "
          "<span class='kind vision-only'>vision-only</span> / <span class='kind text-only'>text-only</span>: only one "
          "branch does. <b>purity</b>: the share of the feature's activation mass that falls on pairs containing its label "
          "(1 = it fires only where the concept is; averaged over the branches where it fires), measured on the held-out "
          "labelling pairs. Top images show the feature's activation per image patch: dimmed where it is weak, framed "
          "black-and-white where it is at least half its maximum; top captions are those whose pooled text code is "
          "largest. ✓ / ✗ mark whether an example's caption names the label, so purity can be checked against what "
          "is shown. <b>steering</b>: the run's steering curve of the label's concept that used this feature "
          "(r50 as in the report; <i>not reached</i> = no +0.5 effect on the grid).</p>")


def _card(f: dict[str, Any]) -> str:
    label = f.get("label") or "unlabelled"
    image_holds, caption_holds = f.get("image_holds"), f.get("caption_holds")
    mark = lambda holds, i: "" if holds is None else ("✓ " if holds[i] else "✗ ")  # noqa: E731
    imgs = "".join(
        f'<figure><img alt="top image" src="{png_data_uri(heatmap_overlay(im, grid) if grid is not None else im)}">'
        f'<figcaption>{mark(image_holds, i)}</figcaption></figure>'
        for i, (im, grid) in enumerate(f.get("top_images", []))
    )
    caps = "".join(f"<li>{mark(caption_holds, i)}{html.escape(c)}</li>" for i, c in enumerate(f.get("top_captions", [])))
    if image_holds is not None and caption_holds is not None:
        caps += (f'<li class="tally">{sum(image_holds)}/{len(image_holds)} top images and {sum(caption_holds)}/'
                 f'{len(caption_holds)} top captions name {html.escape(label)!r}; purity {f.get("purity", 0):.2f} = its '
                 f'activation share on held-out pairs with {html.escape(label)!r}</li>')
    layer = f" · layer {f['layer']}" if "layer" in f else ""
    search = html.escape(f"{f['feature']} {label} {f.get('kind', '')}{layer}".lower())
    steer = f'<div class="steer">steering: {html.escape(str(f["steering"]))}</div>' if f.get("steering") else ""
    return (f'<div class="feature" data-search="{search}"><h2>feature {f["feature"]}{layer}: {html.escape(label)} '
            f'<span class="kind {html.escape(f.get("kind", ""))}">{html.escape(f.get("kind", ""))}</span> '
            f'purity {f.get("purity", 0):.2f}</h2><div class="imgs">{imgs}</div><ul class="caps">{caps}</ul>{steer}</div>')


def feature_browser(features: Iterable[dict[str, Any]] | Mapping[str, Iterable[dict[str, Any]]], path: str | Path,
                    title: str = "jsae features") -> Path:
    """A self-contained static page (no CDN, no network).  Each feature dict has ``feature``, ``label``,
    ``kind``, ``purity``, optional ``layer``, ``top_images`` (list of (PIL image, patch grid or None)),
    ``top_captions`` (list of str) and optional ``steering`` (str).  ``features`` may be a mapping from a section
    name (an SAE: "jsae · layer 4") to its features: the page then has a selector to switch between them."""
    sections = dict(features) if isinstance(features, Mapping) else {"": features}
    return browser_page({name: browser_section(name, feats) for name, feats in sections.items()}, path, title)


def browser_section(name: str, features: Iterable[dict[str, Any]]) -> tuple[str, int]:
    """One section of :func:`feature_browser`'s page (``name`` "" for a page of one SAE): ``(its HTML, its number
    of features)``, so that sections can be rendered apart (in other processes) and put on one page by
    :func:`browser_page`."""
    cards = [_card(f) for f in features]
    return (f'<div class="section" data-section="{html.escape(name)}">'
            f'{"<h2>" + html.escape(name) + "</h2>" if name else ""}{"".join(cards)}</div>', len(cards))


def browser_page(sections: Mapping[str, tuple[str, int]], path: str | Path, title: str = "jsae features") -> Path:
    """Write :func:`feature_browser`'s page of ``sections`` (name -> :func:`browser_section`, in page order)."""
    total = next(iter(sections.values()))[1] if sections else 0  # the first section is shown first
    select = ""
    if len(sections) > 1:
        opts = "".join(f"<option value='{html.escape(n)}'>{html.escape(n)}</option>" for n in sections)
        select = f"<label>SAE <select id='sae' onchange='filt()'>{opts}</select></label> "
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"<script>{_JS}</script></head><body onload='filt()'><h1>{html.escape(title)}</h1>{LEGEND}{select}"
            f"<input id='q' placeholder='search label, kind, feature id' oninput='filt()'> "
            f"<span id='count'>{total}</span> features{''.join(body for body, _ in sections.values())}</body></html>")
    return write_atomic(path, page)


# ---- the page of one SAE folder or release ----------------------------------------------------------


def world_model_for(sae: Any, model: str | None = None) -> tuple[Any, str]:
    """(VLM, name) of the toy model an SAE was trained on (``model`` overrides ``metadata.model_name``)."""
    from jsae.world import models as world

    name = model or sae.cfg.metadata.get("model_name")
    if name is None:
        raise ValueError("the SAE's cfg.json names no model (metadata.model_name); pass model=")
    name = world.toy_name(name) or name  # a capture of load_vlm("llava") records the shipped weights' directory
    if name not in world.MODEL_NAMES:
        raise NotImplementedError(f"feature pages and exports are built on the embedded world's images; {name!r} is a real "
                                  "VLM: pass the toy model, or build the page from your own pairs with jsae.report.browser (token_codes, browser_features)")
    from jsae.vlm import load_vlm

    return load_vlm(name), name


def feature_page(sae: str | Path, out: str | Path | None = None, *, model: str | None = None, n_pairs: int = 200,
                 n_features: int = 24, n_images: int = 4, seed: int = 0) -> Path:
    """Write ``features.html`` (default: into the SAE folder; for a release name ``./<release>-features.html``)
    for a labelled JSAE folder or shipped release:
    per labelled feature its label, purity, kind, top images with the patch heat map, top captions and,
    when the SAE comes from a ``jsae demo`` run, its steering result."""
    from jsae.interventions import check_sae_site
    from jsae.report.rundir import RunDir, load_labelled_sae
    from jsae.world import world_dataset

    sae_model, labels, path = load_labelled_sae(sae)
    if not any(lab.label for lab in labels.labels):
        raise ValueError(f"{path}/labels.json labels no feature (all unlabelled); train longer or lower min_corr in `jsae sae label`")
    vlm, name = world_model_for(sae_model, model)
    layer = sae_layer(sae_model)
    check_sae_site(sae_model, layer, vlm.adapter, f"feature page ({path})",
                   f"pass the --model it was trained on ({sae_model.cfg.metadata.get('model_name')}), or leave --model out")
    ds = world_dataset("validation", n_pairs, seed)
    run = RunDir.of_sae(path)
    cells = run.curves(layer=layer) if run is not None else []
    codes = token_codes(vlm, sae_model, [(ex["image"], ex["caption"]) for ex in ds], layer)
    feats = browser_features(codes, labels, layer, cells, n_features=n_features, n_images=n_images)
    if out is None:  # next to the SAE; for a shipped release (inside the package), in the current directory
        out = path / "features.html" if Path(sae).is_dir() else Path(f"{sae}-features.html")
    return feature_browser(feats, out, title=f"{name}, layer {layer}: features of the JSAE in {path}")


__all__ = ["TokenCodes", "TokenStates", "browser_features", "browser_page", "browser_section", "feature_browser", "feature_page", "heat_map", "heatmap_overlay",
           "names", "png_data_uri", "steering_line", "strongest_labelled", "token_codes", "token_states", "top_examples", "world_model_for"]
