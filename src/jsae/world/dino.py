"""A DINOv2-style vision tower for the embedded world: a ``Dinov2Model`` trained without labels.

VISTA's paper asks which vision encoder localises concepts best (CLIP, SigLIP, DINOv2).  The toy LLaVA's own
tower is pretrained on the scene generator's labels (a stand-in for language-supervised encoders); this module
trains a tower the way DINOv2 is trained — self-distillation with no labels and no text — so the question can
be asked in the world (``benchmarks/vista_world.py --model toy-dino-text-lm``):

* **image-level DINO loss**: an EMA *teacher* sees two global views of each image (a random square crop of
  35–100% of the side, resized back, flipped at random, DINOv2's colour augmentation: brightness / contrast /
  saturation / hue jitter with probability 0.8, greyscale with probability 0.2); the *student* sees those and
  ``local_crops`` small views (10–35% of the side at half the resolution); every student view's class-token
  distribution over ``prototypes`` (a DINO head: MLP → L2-normalised bottleneck → weight-normalised prototypes)
  matches the teacher's (centred, sharpened) distribution of each *other* global view;
* **patch-level iBOT loss**: the student sees each global view with a random 10–50% of its patches replaced by
  the mask token (``Dinov2Model``'s ``bool_masked_pos``) and predicts, at the masked patches, the teacher's patch
  distribution of the unmasked view (a second head);
* teacher = exponential moving average of the student (momentum cosine from ``teacher_momentum`` to 1),
  centring of the teacher's logits by a running mean (momentum ``center_momentum``).

The colour augmentation matters here as it does for DINO: without it the world's images are told apart by their
colours alone and the tower learns no shapes (measured: a patch probe of object type at chance level).  Departures
from DINOv2 for a 48-pixel world: no blur or solarisation, no KoLeo regulariser, no register tokens.  The tower
has the toy CLIP tower's size (48 px, patch 8, width 128, 3 layers, 4 heads) and DINOv2's image-processor
conventions (ImageNet mean / std).

Measured (``training.json``'s ``patch_probe``; 400 + 200 validation scenes): the shipped tower (3,000 steps, 1,646 s
on one thread at load ≈ 6) carries each patch's colour (linear read-out 0.86, chance 0.18) but not its object's type
(0.26, against 0.24 for the same ``Dinov2Model`` at its random initialisation and 0.91 for the label-pretrained
tower); without the colour augmentation (1,500 steps) it was 0.25 / 0.82.  So at this budget self-distillation on
the world learns colour and position, not shape: it is not yet a stand-in for DINOv2's semantic patch features, and
VISTA's "which encoder localises best" is not measured with it (it would lose by construction).

``train_dino_tower`` is deterministic for a seed and thread count; ``patch_probe`` gauges a tower (a linear read-out
of each patch's object type and colour, fitted on some scenes and scored on others) so the two towers can be
compared on what their patch features carry.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jsae.world.data import scene_seed
from jsae.world.models import MODELS_DIR
from jsae.world.scenes import COLORS, TYPES, generate_scene

#: directory (under ``jsae/world/models``) of the shipped DINOv2-style tower
DINO_DIR = "llava-dino-tower"
#: ImageNet normalisation, as DINOv2's image processor uses it
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DinoConfig:
    """Training of the DINOv2-style tower (defaults: the shipped tower)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.04
    prototypes: int = 256
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9
    teacher_momentum: float = 0.994
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    crop_scale: tuple[float, float] = (0.35, 1.0)
    local_crops: int = 4
    local_scale: tuple[float, float] = (0.1, 0.35)
    colour_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    greyscale_p: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "prototypes"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DinoConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.teacher_momentum <= 1 or not 0 <= self.center_momentum < 1:
            raise ValueError("DinoConfig: teacher_momentum must be in (0, 1] and center_momentum in [0, 1)")
        lo, hi = self.mask_ratio
        if not 0 <= lo <= hi < 1:
            raise ValueError(f"DinoConfig.mask_ratio must be 0 <= low <= high < 1, got {self.mask_ratio}")
        for name in ("crop_scale", "local_scale"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"DinoConfig.{name} must be 0 < low <= high <= 1, got {getattr(self, name)}")
        if self.local_crops < 0 or not 0 <= self.jitter_p <= 1 or not 0 <= self.greyscale_p <= 1:
            raise ValueError("DinoConfig: local_crops must be >= 0 and jitter_p, greyscale_p in [0, 1]")


class DinoHead(nn.Module):
    """DINO's projection head: MLP → L2-normalised bottleneck → weight-normalised prototype logits."""

    def __init__(self, d: int, prototypes: int, hidden: int = 256, bottleneck: int = 64):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.last = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, prototypes, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


def tower_config(image_size: int = 48, patch_size: int = 8, hidden_size: int = 128, layers: int = 3, heads: int = 4):
    """``Dinov2Config`` of the toy tower (the toy CLIP tower's size)."""
    from transformers import Dinov2Config

    return Dinov2Config(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size, num_hidden_layers=layers,
                        num_attention_heads=heads, mlp_ratio=4, layerscale_value=1.0, drop_path_rate=0.0)


def image_processor(image_size: int = 48):
    """DINOv2's image-processor conventions at the world's image size."""
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    return BitImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                             do_center_crop=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD),
                             do_convert_rgb=True, resample=3)


def _u(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def _colour(rgb: torch.Tensor, cfg: DinoConfig, gen: torch.Generator) -> torch.Tensor:
    """DINOv2's colour augmentation on RGB in [0, 1], per image: with probability ``jitter_p`` brightness,
    contrast, saturation and hue jitter (hue as a rotation of the YIQ chroma plane), then greyscale with
    probability ``greyscale_p``."""
    b = rgb.shape[0]
    br, co, sa, hu = cfg.colour_jitter
    on = (torch.rand(b, generator=gen) < cfg.jitter_p).float().view(b, 1, 1, 1)
    lum = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    x = rgb * (1 + on * (_u(b, -br, br, gen).view(b, 1, 1, 1)))
    grey = (x * lum).sum(1, keepdim=True)
    x = (x - grey.mean((2, 3), keepdim=True)) * (1 + on * _u(b, -co, co, gen).view(b, 1, 1, 1)) + grey.mean((2, 3), keepdim=True)
    grey = (x * lum).sum(1, keepdim=True)
    x = grey + (x - grey) * (1 + on * _u(b, -sa, sa, gen).view(b, 1, 1, 1))
    theta = on.view(b) * _u(b, -hu, hu, gen) * 2 * math.pi
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s_ = torch.cos(theta), torch.sin(theta)
    rot = torch.zeros(b, 3, 3)
    rot[:, 0, 0], rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = 1, c, -s_, s_, c
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq  # [b, 3, 3]
    x = torch.einsum("bij,bjhw->bihw", m, x)
    g = (torch.rand(b, generator=gen) < cfg.greyscale_p).float().view(b, 1, 1, 1)
    x = g * (x * lum).sum(1, keepdim=True).expand_as(x) + (1 - g) * x
    return x.clamp(0, 1)


def _views(x: torch.Tensor, cfg: DinoConfig, gen: torch.Generator, scale: tuple[float, float] | None = None,
           size: int | None = None) -> torch.Tensor:
    """A random view of each image of ``x`` [B, 3, H, W] (normalised pixels): a square crop of ``scale`` of the side
    (default ``crop_scale``), flipped at random, resized to ``size`` (default: H), DINOv2's colour augmentation."""
    b, _, h, _ = x.shape
    lo, hi = scale or cfg.crop_scale
    s = _u(b, lo, hi, gen)
    tx = (torch.rand(b, generator=gen) * 2 - 1) * (1 - s)
    ty = (torch.rand(b, generator=gen) * 2 - 1) * (1 - s)
    flip = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = s * flip, tx, s, ty
    n = size or h
    grid = F.affine_grid(theta, [b, 3, n, n], align_corners=False)
    v = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (_colour(v * std + mean, cfg, gen) - mean) / std


def _masks(b: int, n: int, cfg: DinoConfig, gen: torch.Generator) -> torch.Tensor:
    lo, hi = cfg.mask_ratio
    ratio = lo + (hi - lo) * torch.rand(b, 1, generator=gen)
    return torch.rand(b, n, generator=gen) < ratio


def _pixels(processor: Any, seeds: list[int]) -> torch.Tensor:
    return processor([generate_scene(s).image for s in seeds], return_tensors="pt")["pixel_values"]


def train_dino_tower(out_dir: str | Path | None = None, cfg: DinoConfig | None = None, threads: int | None = 1,
                     log=print, progress: bool = True, probe: tuple[int, int] = (400, 200)) -> Path:
    """Train the DINOv2-style tower on the world's training scenes (no labels) and save it (``Dinov2Model`` +
    image processor + ``training.json`` with the loss history and the :func:`patch_probe` gauge) to
    ``out_dir/llava-dino-tower`` (default: the package's models directory, i.e. rebuild the shipped tower);
    atomic.  ``probe``: scenes the patch probe fits on and scores on.  Returns the directory."""
    from tqdm.auto import tqdm
    from transformers import Dinov2Model

    cfg = cfg or DinoConfig()
    if len(probe) != 2 or min(probe) < 1:
        raise ValueError(f"probe must be (scenes to fit, scenes to score), both >= 1, got {probe}")
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    student = Dinov2Model(tower_config())
    processor = image_processor(student.config.image_size)
    d, n_patch = student.config.hidden_size, (student.config.image_size // student.config.patch_size) ** 2
    heads = nn.ModuleDict({"cls": DinoHead(d, cfg.prototypes), "patch": DinoHead(d, cfg.prototypes)})
    teacher, teacher_heads = copy.deepcopy(student), copy.deepcopy(heads)
    for p in list(teacher.parameters()) + list(teacher_heads.parameters()):
        p.requires_grad_(False)
    params = list(student.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    warm = max(1, cfg.steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, i / cfg.steps))))
    centre = {"cls": torch.zeros(cfg.prototypes), "patch": torch.zeros(cfg.prototypes)}
    history, t0, ema = [], time.time(), None
    for step in tqdm(range(cfg.steps), desc="dino tower", disable=not progress, mininterval=5):
        x = _pixels(processor, [scene_seed(cfg.seed, "train", 30_000_000 + step * cfg.batch_size + i)
                                for i in range(cfg.batch_size)])
        views = [_views(x, cfg, gen), _views(x, cfg, gen)]
        side = student.config.image_size // 2 // student.config.patch_size * student.config.patch_size
        local = [_views(x, cfg, gen, cfg.local_scale, side) for _ in range(cfg.local_crops)]
        masks = [_masks(len(x), n_patch, cfg, gen) for _ in views]
        with torch.no_grad():
            t_out = [teacher(v).last_hidden_state for v in views]
            t_cls = [teacher_heads["cls"](h[:, 0]) for h in t_out]
            t_patch = [teacher_heads["patch"](h[:, 1:]) for h in t_out]
            p_cls = [F.softmax((z - centre["cls"]) / cfg.teacher_temp, -1) for z in t_cls]
            p_patch = [F.softmax((z - centre["patch"]) / cfg.teacher_temp, -1) for z in t_patch]
        s_out = [student(v, bool_masked_pos=m).last_hidden_state for v, m in zip(views, masks)]
        s_loc = [student(v).last_hidden_state for v in local]
        s_cls = [F.log_softmax(heads["cls"](h[:, 0]) / cfg.student_temp, -1) for h in s_out + s_loc]
        s_patch = [F.log_softmax(heads["patch"](h[:, 1:]) / cfg.student_temp, -1) for h in s_out]
        # every student view against every *other* teacher (global) view, averaged over the pairs
        pairs = [(ti, si) for ti in range(2) for si in range(len(s_cls)) if si != ti]
        dino = -sum((p_cls[ti] * s_cls[si]).sum(-1).mean() for ti, si in pairs) / len(pairs)
        ibot = -0.5 * sum((p * s).sum(-1)[m].mean() for p, s, m in zip(p_patch, s_patch, masks))
        loss = dino + ibot
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            mom = 1 - (1 - cfg.teacher_momentum) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
            for ps, pt in zip(params, list(teacher.parameters()) + list(teacher_heads.parameters())):
                pt.mul_(mom).add_(ps.detach(), alpha=1 - mom)
            centre["cls"].mul_(cfg.center_momentum).add_(torch.cat(t_cls).mean(0), alpha=1 - cfg.center_momentum)
            centre["patch"].mul_(cfg.center_momentum).add_(torch.cat(t_patch).flatten(0, 1).mean(0),
                                                           alpha=1 - cfg.center_momentum)
            # collapse watch: the entropy of the teacher's mean class-token distribution (log K when spread)
            spread = float(-(torch.cat(p_cls).mean(0).clamp_min(1e-12).log() * torch.cat(p_cls).mean(0)).sum())
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0 or step == cfg.steps - 1:
            history.append({"step": step, "loss": round(ema, 4), "dino": round(dino.item(), 4), "ibot": round(ibot.item(), 4),
                            "teacher_entropy": round(spread, 3)})
            if step % 250 == 0:
                log(f"dino tower: step {step} loss {ema:.3f} (dino {dino.item():.3f}, ibot {ibot.item():.3f}), "
                    f"teacher entropy {spread:.2f} of {math.log(cfg.prototypes):.2f}")
    seconds = time.time() - t0
    teacher.eval()  # the teacher is the tower DINO keeps
    probe = patch_probe(teacher, processor, n_fit=probe[0], n_test=probe[1])
    log(f"dino tower: {seconds:.0f} s; patch probe {json.dumps(probe)}")
    out_dir = Path(out_dir) if out_dir is not None else MODELS_DIR
    return _save(teacher, processor, out_dir / DINO_DIR,
                 {"part": "dino", "config": asdict(cfg), "seconds": round(seconds, 1), "history": history,
                  "patch_probe": probe, "threads": torch.get_num_threads(), "load_average": os.getloadavg()})


def _save(model: nn.Module, processor: Any, target: Path, extra: dict) -> Path:
    from jsae.files import write_dir_atomic

    def fill(tmp: Path) -> None:
        sd = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous()
              for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        processor.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(extra, indent=2, default=str))

    return write_dir_atomic(target, fill)


def dino_dir() -> Path:
    """Directory of the shipped DINOv2-style tower, checked."""
    d = MODELS_DIR / DINO_DIR
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"the toy DINOv2-style tower is missing at {d}; rebuild it with "
                                "`jsae vista toy-parts --stages dino`")
    return d


@torch.no_grad()
def _patch_features(tower: nn.Module, processor: Any, scenes: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per patch (row-major over the tower's grid): its final hidden state, and the type / colour index of the
    object covering it (-1: background or more than one object)."""
    cfg = tower.config
    side = cfg.image_size // cfg.patch_size
    feats, types, colours = [], [], []
    colour_names = list(COLORS)
    for lo in range(0, len(scenes), 50):
        chunk = scenes[lo:lo + 50]
        x = processor([s.image for s in chunk], return_tensors="pt")["pixel_values"]
        h = tower(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        h = h[:, -side * side:]  # patch tokens (after a CLS when the tower has one)
        feats.append(h.float().reshape(-1, h.shape[-1]).numpy())
        for s in chunk:
            cover = np.stack([s.patch_mask(i, side) for i in range(len(s.objects))]).reshape(len(s.objects), -1)
            one = cover.sum(0) == 1
            owner = cover.argmax(0)
            types.append(np.where(one, [TYPES.index(s.objects[o].name) for o in owner], -1))
            colours.append(np.where(one, [colour_names.index(s.objects[o].color) for o in owner], -1))
    return np.concatenate(feats), np.concatenate(types), np.concatenate(colours)


def patch_probe(tower: nn.Module, processor: Any, n_fit: int = 400, n_test: int = 200, seed: int = 0) -> dict[str, Any]:
    """How much of each patch's object a tower's patch features carry: ridge read-outs of the type and the colour
    of the object covering a patch (patches covered by exactly one object), fitted on ``n_fit`` validation scenes
    and scored on ``n_test`` others; chance beside each."""
    if int(n_fit) < 1 or int(n_test) < 1:
        raise ValueError(f"patch_probe needs n_fit >= 1 and n_test >= 1 scenes, got {n_fit} and {n_test}")
    scenes = [generate_scene(scene_seed(seed, "validation", i)) for i in range(n_fit + n_test)]
    X, yt, yc = _patch_features(tower, processor, scenes)
    per = X.shape[0] // len(scenes)
    fit = np.arange(X.shape[0]) < n_fit * per
    mu, sd = X[fit].mean(0), X[fit].std(0) + 1e-6
    Z = np.concatenate([(X - mu) / sd, np.ones((len(X), 1))], 1)
    out: dict[str, Any] = {"n_fit_scenes": n_fit, "n_test_scenes": n_test}
    for name, y, k in (("type", yt, len(TYPES)), ("colour", yc, len(COLORS))):
        keep = y >= 0
        a, b = fit & keep, ~fit & keep
        Y = np.eye(k)[y[a]]
        W = np.linalg.solve(Z[a].T @ Z[a] + 1.0 * np.eye(Z.shape[1]), Z[a].T @ Y)
        acc = float(((Z[b] @ W).argmax(1) == y[b]).mean())
        chance = float(np.bincount(y[b], minlength=k).max() / b.sum())
        out[name] = {"accuracy": round(acc, 4), "majority_chance": round(chance, 4), "n_test_patches": int(b.sum())}
    return out


__all__ = ["DINO_DIR", "DinoConfig", "DinoHead", "dino_dir", "image_processor", "patch_probe", "tower_config",
           "train_dino_tower"]
