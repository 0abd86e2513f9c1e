"""World fidelity: can this world answer the JSAE paper's question? (``jsae world fidelity``)

Gauges of a VLM on the embedded world's scenes, defined where the papers' claims depend on them (see the
design card's "world fidelity" and ``shared/notes/world-fidelity.md``):

* **logit lens** at single-object image tokens (a patch covered by exactly one object), per decoder layer: the
  final norm + ``lm_head`` on the hidden state; the object's type word top-1 / in the top 5, its median rank,
  and *right of six* (the right type word ranks highest of the six); beside chance, and beside the same lens at
  the caption's own tokens (the position before a type word should predict it) as the reference;
* **image oracle vs text oracle** per layer: the difference of mean image-token pools of images with / without a
  type, and of mean caption-token pools of pairs whose caption names it / does not; their cosine; each one's
  steering **r50** (the strength, in units of the layer's mean per-token state norm, where half the captions
  newly name the type) added at the image tokens (prefill; the image-state norm) and at the generated tokens
  (every step; the caption-token norm): the double-dissociation table;
* **caption quality** (:func:`jsae.world.evaluate.evaluate`): type recall, type + colour, hallucination,
  cross-entropy per caption template, QA.

Intervals are 95% percentile bootstraps over images.  Every gauge runs on any VLM jsae loads (a toy name or a
model directory); captions and prompts are the world's.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from jsae.adapters import padding_side
from jsae.adapters.base import GRID_COL, GRID_ROW

#: targets of the world issue (a faithful world meets them all)
TARGETS = {"lens_top5": 0.25, "lens_right_of_six": 0.5, "text_oracle_types": 5, "r50_factor": 2.0,
           "oracle_cosine": 0.6, "type_recall": 0.98, "type_colour": 0.95, "hallucination": 0.01}


def _boot(num: np.ndarray, den: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict[str, float]:
    """Ratio of sums over images (``num``/``den`` per image) with a 95% bootstrap interval over images."""
    point = float(num.sum() / max(den.sum(), 1e-12))
    rng = np.random.default_rng(seed)
    idx = rng.integers(len(num), size=(n_boot, len(num)))
    draws = num[idx].sum(1) / np.maximum(den[idx].sum(1), 1e-12)
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return {"value": round(point, 4), "ci": [round(float(lo), 4), round(float(hi), 4)]}


def _word_ids(tokenizer: Any, words: list[str]) -> list[int]:
    """The token id of each word as it appears inside a caption (the first piece of `` word``)."""
    out = []
    for w in words:
        ids = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"the tokenizer gives no token for {w!r}")
        out.append(int(ids[0]))
    return out


def _inputs(vlm: Any, images: list[Any], texts: list[str]) -> dict[str, Any]:
    model, processor, adapter = vlm
    with padding_side(processor, "right"):
        enc = processor(images=images, text=texts, return_tensors="pt", padding=True)
    return dict(adapter.complete_inputs(enc))


def pair_text(vlm: Any, caption: str, prompt: str) -> str:
    """The model's captioning prompt (chat template, generation prompt added) followed by ``caption``."""
    _, processor, adapter = vlm
    return adapter.render_prompt(processor, prompt, 1, add_generation_prompt=True) + " " + caption


@torch.no_grad()
def read_world(vlm: Any, scenes: list[Any], prompt: str, batch_size: int = 25, progress: bool = True) -> dict[str, Any]:
    """One forward pass per pair (image + its canonical caption as the answer): per layer, the logit-lens ranks
    at single-object image tokens and at caption positions before a type word, and the image / caption pools
    and per-token norms."""
    from jsae.activations import read_layers
    from jsae.world import grammar
    from jsae.world.scenes import TYPES

    model, processor, adapter = vlm
    tok = getattr(processor, "tokenizer", processor)
    type_ids = torch.tensor(_word_ids(tok, list(TYPES)))
    vocab = len(tok)
    layers = list(range(adapter.n_layers))
    lens_img = {L: [] for L in layers}  # (image index, rank, right-of-six) per token
    lens_cap = {L: [] for L in layers}
    vpool = {L: [] for L in layers}
    tpool = {L: [] for L in layers}
    vnorm = {L: [] for L in layers}
    tnorm = {L: [] for L in layers}
    n_single = 0
    for lo in tqdm(range(0, len(scenes), batch_size), desc="fidelity: read", disable=not progress, mininterval=5):
        chunk = scenes[lo:lo + batch_size]
        enc = _inputs(vlm, [s.image for s in chunk], [pair_text(vlm, grammar.caption(s.objects, 0), prompt)
                                                       for s in chunk])
        hidden = read_layers(model, adapter, enc, layers)
        img_mask = adapter.image_token_mask(enc).cpu()
        cap_mask = adapter.caption_token_mask(enc).cpu()
        grid = adapter.patch_grid(enc)
        ids = enc["input_ids"].cpu()
        # single-object image tokens: (batch, seq, true type index)
        sel_b, sel_s, sel_t = [], [], []
        for b, s in enumerate(chunk):
            pos = img_mask[b].nonzero().flatten()
            rows, cols = grid[b, pos, GRID_ROW], grid[b, pos, GRID_COL]
            side = int(max(rows.max(), cols.max())) + 1
            if s.config.image_size % side:
                raise ValueError(f"the model's patch grid ({side}×{side}) does not divide the world's "
                                 f"{s.config.image_size}-px images; gauge it at an image size it divides")
            cover = np.stack([s.patch_mask(i, side) for i in range(len(s.objects))])  # [objects, side, side]
            for p, r, c in zip(pos.tolist(), rows.tolist(), cols.tolist()):
                if r >= 0 and cover[:, r, c].sum() == 1:
                    sel_b.append(b)
                    sel_s.append(p)
                    sel_t.append(TYPES.index(s.objects[int(cover[:, r, c].argmax())].name))
        n_single += len(sel_b)
        # caption positions whose next token is a type word
        nxt = torch.zeros_like(ids, dtype=torch.bool)
        nxt[:, :-1] = torch.isin(ids[:, 1:], type_ids) & cap_mask[:, 1:]
        cb, cs = nxt.nonzero(as_tuple=True)
        ct = torch.tensor([int((type_ids == ids[b, s + 1]).nonzero()[0]) for b, s in zip(cb.tolist(), cs.tolist())],
                          dtype=torch.long)
        sb, ss, st = torch.tensor(sel_b, dtype=torch.long), torch.tensor(sel_s, dtype=torch.long), torch.tensor(sel_t, dtype=torch.long)
        for L in layers:
            h = hidden[L].float().cpu()
            for (bb, pp, tt, out) in ((sb, ss, st, lens_img[L]), (cb, cs, ct, lens_cap[L])):
                if len(bb) == 0:
                    continue
                logits = adapter.unembed(h[bb, pp]).float().cpu()[:, :vocab]
                target = logits.gather(1, type_ids[tt][:, None])
                rank = (logits > target).sum(1) + 1
                six = logits[:, type_ids].argmax(1) == tt
                out.append(np.stack([(bb + lo).numpy(), rank.numpy(), six.numpy()], 1))
            m, c = img_mask.float(), cap_mask.float()
            vpool[L].append((h * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1))
            tpool[L].append((h * c[..., None]).sum(1) / c.sum(1, keepdim=True).clamp(min=1))
            vnorm[L].append(h.norm(dim=-1)[img_mask])
            tnorm[L].append(h.norm(dim=-1)[cap_mask])
    cat = lambda d: {L: np.concatenate(v) if v else np.zeros((0, 3)) for L, v in d.items()}  # noqa: E731
    return {"lens_image": cat(lens_img), "lens_caption": cat(lens_cap),
            "vision_pools": {L: torch.cat(v) for L, v in vpool.items()},
            "text_pools": {L: torch.cat(v) for L, v in tpool.items()},
            "image_norm": {L: float(torch.cat(v).mean()) for L, v in vnorm.items()},
            "caption_norm": {L: float(torch.cat(v).mean()) for L, v in tnorm.items()},
            "n_single_object_tokens": n_single, "vocab": vocab,
            "n_objects": torch.tensor([len(s.objects) for s in scenes])}


def lens_table(rows: np.ndarray, n_images: int, vocab: int, n_boot: int = 1000) -> dict[str, Any]:
    """Top-1 / top-5 / right-of-six rates (bootstrap over images) and the median rank of one layer's lens rows
    ``[tokens, (image, rank, right_of_six)]``, with chance."""
    if len(rows) == 0:
        return {"n_tokens": 0}
    img = rows[:, 0].astype(int)
    den = np.bincount(img, minlength=n_images).astype(float)
    per = lambda v: np.bincount(img, weights=v.astype(float), minlength=n_images)  # noqa: E731
    keep = den > 0
    out = {"n_tokens": int(len(rows)),
           "top1": _boot(per(rows[:, 1] == 1)[keep], den[keep], n_boot),
           "top5": _boot(per(rows[:, 1] <= 5)[keep], den[keep], n_boot),
           "right_of_six": _boot(per(rows[:, 2] == 1)[keep], den[keep], n_boot),
           "median_rank": float(np.median(rows[:, 1]))}
    out["chance"] = {"top1": round(1 / vocab, 4), "top5": round(5 / vocab, 4), "right_of_six": round(1 / 6, 4),
                     "median_rank": (vocab + 1) / 2}
    return out


def _r50_with_ci(grid: list[float], effect: np.ndarray, n_boot: int = 400, seed: int = 0) -> dict[str, Any]:
    from jsae.protocol.stats import r_at_effect

    mean = effect.mean(1)
    point = r_at_effect(grid, mean, 0.5)
    rng = np.random.default_rng(seed)
    n = effect.shape[1]
    draws = np.array([r_at_effect(grid, effect[:, rng.integers(n, size=n)].mean(1), 0.5) for _ in range(n_boot)])
    lo, hi = np.percentile(draws, [2.5, 97.5])
    fmt = lambda x: None if not math.isfinite(x) else round(float(x), 3)  # noqa: E731
    return {"r50": fmt(point), "ci": [fmt(lo), fmt(hi)], "max_effect": round(float(mean.max()), 3),
            "effect": [round(float(x), 3) for x in mean]}


def _oracles(read: dict[str, Any], presence: torch.Tensor, names: list[str], layer: int) -> list[tuple[str, str, torch.Tensor, torch.Tensor]]:
    """(suffix, type, image oracle, text oracle) at ``layer`` for every type of the world: the plain differences
    (suffix "") and those within scenes of equal object count ("-matched"; a type no object count separates is
    left out)."""
    from jsae.protocol.sweep import oracle_direction
    from jsae.world.scenes import TYPES

    v, t = read["vision_pools"][layer], read["text_pools"][layer]
    out = []
    for c in TYPES:
        y = presence[:, names.index(c)].bool()
        if y.all() or not y.any():
            continue
        for suffix, strata in (("", None), ("-matched", read["n_objects"])):
            try:
                out.append((suffix, c, oracle_direction(v, y, strata), oracle_direction(t, y, strata)))
            except ValueError:  # no object count holds scenes both with and without the type
                continue
    return out


def oracle_cosines(read: dict[str, Any], items: list[dict], layers: list[int]) -> dict[str, dict[str, dict[str, float]]]:
    """Per layer: the cosine of the image and text oracle per type, plain (``cosine``) and count-matched
    (``cosine_matched``). Cheap: no generation."""
    from jsae.data.judges import WorldJudge

    judge = WorldJudge()
    presence = judge.presence(items)
    out = {}
    for L in layers:
        rec: dict[str, dict[str, float]] = {"cosine": {}, "cosine_matched": {}}
        for suffix, c, io, to in _oracles(read, presence, judge.concepts, L):
            rec["cosine" + suffix.replace("-", "_")][c] = round(float(torch.nn.functional.cosine_similarity(io, to, dim=0)), 4)
        out[str(L)] = rec
    return out


def oracle_steering(vlm: Any, read: dict[str, Any], scenes: list[Any], items: list[dict], layers: list[int],
                    prompt: str, ratios: tuple[float, ...], n_images: int, positions: tuple[str, ...] = ("image", "generated"),
                    batch_size: int = 64, max_new_tokens: int = 28, progress: bool = True) -> dict[str, Any]:
    """Per layer and type: the cosine of the image and text oracles, and each one's r50 at each position set —
    for the oracles as defined (``oracle``, ``text-oracle``) and for the same differences taken within scenes of
    equal object count (``oracle-matched``, ``text-oracle-matched``: a scene with a cube holds more objects on
    average, and that difference — more object tokens, a longer caption — is not the concept)."""
    from jsae.data.judges import WorldJudge
    from jsae.interventions import Captioner
    from jsae.protocol.sweep import Direction, SweepConfig, SweepImages, curves_from, run_rows, steer_rows, unit_vector
    from jsae.world.scenes import TYPES

    model, processor, adapter = vlm
    judge = WorldJudge()
    presence = judge.presence(items)
    concepts = list(TYPES)
    caption = Captioner(model, processor, adapter, prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens)
    cfg = SweepConfig(layers=layers, concepts=concepts, methods=(), ratios=tuple(ratios), n_images=n_images,
                      positions=tuple(positions))
    sweep = SweepImages(caption, [s.image for s in scenes], items, judge, cfg)
    sweep.base(sweep.used())
    grid = list(ratios)
    out: dict[str, Any] = {}
    for L in layers:
        dirs = []
        for suffix, c, io, to in _oracles(read, presence, judge.concepts, L):
            dirs.append(Direction("oracle" + suffix, "image", L, c, unit_vector(io), unit_vector(io)))
            dirs.append(Direction("text-oracle" + suffix, "text", L, c, unit_vector(to), unit_vector(to)))
        layer_out: dict[str, Any] = oracle_cosines(read, items, [L])[str(L)]
        for pos in positions:
            if pos == "image" and L == adapter.n_layers - 1:
                layer_out[pos] = {"reason": "null by construction: nothing reads the prompt's last-layer states"}
                continue
            norm = read["image_norm"][L] if pos.startswith("image") else read["caption_norm"][L]
            rows, vecs = [], []
            for di, d in enumerate(dirs):
                for si, g in enumerate(grid):
                    for i in sweep.split(d.concept)[0]:
                        rows.append((i, di, si))
                        vecs.append(g * norm * d.vector)
            D = torch.stack(vecs)
            with tqdm(total=len(rows), desc=f"fidelity: layer {L} steering at {pos}", disable=not progress,
                      mininterval=5) as bar:
                caps = run_rows(sweep, rows, steer_rows(L, pos, D, torch.ones(len(rows))), bar)
            curves = curves_from(sweep, rows, caps, dirs, grid, False, "steering", pos, 1, norm)
            res: dict[str, dict[str, Any]] = {d.method: {} for d in dirs}
            for cv in curves:
                res[cv.method][cv.concept] = _r50_with_ci(grid, cv.effect)
            layer_out[pos] = res
        out[str(L)] = layer_out
    return out


def caption_quality(vlm: Any, name: str | None, n: int, seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Greedy captions and QA on held-out scenes (:func:`jsae.world.evaluate.evaluate`)."""
    from jsae.world.evaluate import evaluate

    from jsae.adapters.base import unwrap
    from jsae.world.models import TOY_MODELS

    model, processor, adapter = vlm
    hf = unwrap(model)
    if name is None:  # a model directory: the world's prompts of the toy model of the same class
        name = next((k for k, spec in TOY_MODELS.items() if spec.model_class == type(hf).__name__), None)
        if name is None:
            return {"reason": f"no world captioning prompt for {type(hf).__name__}"}
    return evaluate(hf, processor, name, n=n, split="test", seed=seed, progress=progress)


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Which targets hold (:data:`TARGETS`), from a fidelity result."""
    lens = result["logit_lens"]["image_tokens"]
    best5 = max((v["top5"]["value"] for v in lens.values() if v.get("n_tokens")), default=0.0)
    best6 = max((v["right_of_six"]["value"] for v in lens.values() if v.get("n_tokens")), default=0.0)
    steer = result.get("oracles", {})
    n_layers = result["n_layers"]
    per_layer: dict[str, dict[str, Any]] = {}
    for L, lay in steer.items():
        img = lay.get("image", {})
        if "oracle" not in img:
            continue
        per_layer[L] = {"mean_cosine": None, "min_cosine": None}
        for suffix, cos_key in (("", "cosine"), ("-matched", "cosine_matched")):
            cos = list(lay.get(cos_key, {}).values())
            key = suffix.replace("-", "_")
            if cos:
                per_layer[L].update({f"min_cosine{key}": round(min(cos), 3), f"mean_cosine{key}": round(float(np.mean(cos)), 3)})
            if "text-oracle" + suffix not in img:  # count-matched oracles not steered (results of an earlier version)
                continue
            ok = 0
            for c, rec in img["text-oracle" + suffix].items():
                r_img = img["oracle" + suffix].get(c, {}).get("r50")
                r_txt = rec.get("r50")
                ok += r_img is not None and r_txt is not None and r_txt <= TARGETS["r50_factor"] * r_img
            per_layer[L].update({f"text_oracle_within_2x{key}": ok, f"n_types{key}": len(img["text-oracle" + suffix])})
    middle = [L for L in per_layer if int(L) >= n_layers // 4]

    def holds(key: str) -> list[str]:
        return [L for L in middle if per_layer[L].get(f"text_oracle_within_2x{key}", 0) >= TARGETS["text_oracle_types"]
                and (per_layer[L].get(f"mean_cosine{key}") or 0) >= TARGETS["oracle_cosine"]]

    steer_ok, steer_ok_matched = holds(""), holds("_matched")
    q = result.get("captions") or {}
    out = {"lens_best_top5": best5, "lens_best_right_of_six": best6,
           "lens_top5_target": best5 >= TARGETS["lens_top5"], "lens_right_of_six_target": best6 >= TARGETS["lens_right_of_six"],
           "steering_per_layer": per_layer, "steering_target_layers": steer_ok, "steering_target": bool(steer_ok),
           "steering_target_layers_matched": steer_ok_matched, "steering_target_matched": bool(steer_ok_matched)}
    if q:
        nats = q.get("caption_nats_per_template", {})
        out.update({"type_recall": q.get("type_recall"), "type_colour": q.get("object_accuracy"),
                    "hallucination": round(1 - q.get("no_hallucination", 0.0), 4),
                    "templates_alive": all(v < 1.0 for v in nats.values()) if nats else None})
        out["captions_target"] = bool((q.get("type_recall") or 0) >= TARGETS["type_recall"]
                                      and q.get("object_accuracy", 0) >= TARGETS["type_colour"]
                                      and out["hallucination"] <= TARGETS["hallucination"] and out["templates_alive"])
    return out


def world_fidelity(model: str, n_images: int = 300, n_steer: int = 8, n_captions: int = 300,
                   ratios: tuple[float, ...] | None = None, layers: list[int] | None = None, seed: int = 0,
                   steering: bool = True, progress: bool = True) -> dict[str, Any]:
    """Every gauge of VLM ``model`` (a toy name or a model directory) on the world's validation scenes."""
    from jsae.protocol.sweep import RATIOS
    from jsae.vlm import load_vlm
    from jsae.world.data import iter_world
    from jsae.world.models import toy_name
    from jsae.world.processors import CAPTION_PROMPT

    t0 = time.time()
    vlm = load_vlm(model)
    adapter = vlm.adapter
    layers = list(range(adapter.n_layers)) if layers is None else [adapter.check_layer(L) for L in layers]
    pairs = list(iter_world("validation", n_images, seed))
    scenes = [s for s, _ in pairs]
    read = read_world(vlm, scenes, CAPTION_PROMPT, progress=progress)
    result: dict[str, Any] = {"model": str(model), "model_class": type(adapter.hf_model).__name__,
                              "n_layers": adapter.n_layers, "n_images": n_images,
                              "n_single_object_tokens": read["n_single_object_tokens"], "vocab": read["vocab"]}
    result["logit_lens"] = {
        "image_tokens": {str(L): lens_table(read["lens_image"][L], n_images, read["vocab"]) for L in layers},
        "caption_tokens": {str(L): lens_table(read["lens_caption"][L], n_images, read["vocab"]) for L in layers}}
    result["norms"] = {"image": {str(L): round(read["image_norm"][L], 3) for L in layers},
                       "caption": {str(L): round(read["caption_norm"][L], 3) for L in layers}}
    if steering:
        ratios = tuple(ratios or RATIOS)
        result["oracles"] = oracle_steering(vlm, read, scenes, [r for _, r in pairs], layers, CAPTION_PROMPT, ratios,
                                            n_steer, progress=progress)
        result["steering_config"] = {"ratios": list(ratios), "n_images_per_type": n_steer,
                                     "positions": ["image", "generated"]}
    name = toy_name(model)
    if n_captions:
        result["captions"] = caption_quality(vlm, name, n_captions, seed, progress)
    result["summary"] = summarise(result)
    result["seconds"] = round(time.time() - t0, 1)
    return result


