"""Deterministic training of the toy VLMs on the world, the way LLaVA is trained (``jsae world train-models``).

Real VLMs start from a language model pretrained on text only; LLaVA then trains the projector alone against the
frozen LM and the frozen vision encoder ("pretraining for feature alignment"), and only then fine-tunes projector
+ LM ("visual instruction tuning").  The projector so first learns to write into an input space a text-trained LM
already reads — which is why image tokens of real VLMs decode to words under the logit lens (Neo et al. 2024).
The toy recipe has the same four stages (:data:`STAGES`):

1. **Text pretraining** of the language model (:func:`text_batch`; the loss on every token) on the world's text:
   *word pictures* — the captioning prompt with the image written out in words, one word per image token in
   reading order (:func:`jsae.world.grammar.word_picture`: each patch's object type or colour, ``nothing``
   elsewhere) — followed by a caption of any template or by describe-then-answer QA; plain captions of every
   template; captions then a question and its answer.  Gauged by :func:`read_pictures`: the LM alone captions a
   picture in its context.
2. **Vision pretraining** of the tower (the adapter's ``patch_features``) with linear heads predicting, per image
   token, the type (or none) and colour of the object its patch shows, and per cell of the 2×2 position grid,
   type, colour and size, from the scene generator's labels (captioning alone teaches shape far too slowly).
3. **Feature alignment**: the projector(s) alone (``adapter.projector_modules``), LM and tower frozen, on captions
   of every template after the model's chat template (text after the image).
4. **Fine-tuning**: projector + LM (tower frozen) on captions and describe-then-answer QA (the caption and the
   answer carry the loss), every ``finetune_text_every``-th step a text-pretraining batch (as LLaVA-1.5 mixes in
   text-only conversations).

All data is drawn on the fly from step-derived seeds, so a run is a pure function of its seed and step counts (on
a given device / thread count).  The text-only LM and the pre-VLM tower of the toy LLaVA are saved as parts of
their own after stage 2 (``parts_dir``; what VISTA composes).
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from tqdm.auto import tqdm

from jsae.adapters import for_model
from jsae.hf import padding_side
from jsae.world import grammar
from jsae.world.data import scene_seed
from jsae.world.models import (TOY_MODELS, check_name, build_model, build_processor, caption_prompt, check_weights,
                               model_class, model_dir, save_toy_vlm, toy_spec)
from jsae.world.processors import build_tokenizer
from jsae.world.scenes import COLORS, POSITIONS, SIZES, TYPES, check_seed, generate_scene


#: the recipe's stages, in order, named as the LLaVA papers name them
STAGES = ("text_pretraining", "vision_pretraining", "feature_alignment", "finetuning")

#: text pretraining's corpus: the share of each kind of text (drawn per sample)
TEXT_MIX = {"picture_caption": 0.45, "picture_qa": 0.2, "caption": 0.2, "caption_qa": 0.15}


@dataclass
class TrainConfig:
    """Step counts and learning rates of the four stages (:data:`STAGES`); a stage with 0 steps is skipped."""

    seed: int = 0
    text_steps: int = 3000
    vision_steps: int = 1200
    align_steps: int = 800
    finetune_steps: int = 1200
    batch_size: int = 32
    text_lr: float = 2e-3
    vision_lr: float = 2e-3
    align_lr: float = 2e-3
    finetune_lr: float = 5e-4
    #: fine-tuning: share of describe-then-answer samples (the rest are captions of every template)
    finetune_qa_fraction: float = 0.5
    #: fine-tuning: every n-th step is a text-only batch of the pretraining corpus (as LLaVA-1.5 mixes in
    #: text-only conversations); 0 = never
    finetune_text_every: int = 4
    size: str = "default"
    eval_n: int = 100

    def __post_init__(self):
        check_seed(self.seed)
        for k in ("text_steps", "vision_steps", "align_steps", "finetune_steps", "batch_size",
                  "eval_n", "finetune_text_every"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} must be a non-negative integer, got {v!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.finetune_qa_fraction <= 1.0:
            raise ValueError(f"finetune_qa_fraction must be in [0, 1], got {self.finetune_qa_fraction}")


#: default step counts per model (deterministic; from ``jsae.world.models.TOY_MODELS``, where the measured
#: step rates are; see the README for measured times)
DEFAULTS: dict[str, dict] = {name: dict(spec.train_steps) for name, spec in TOY_MODELS.items()}


def default_config(name: str, **overrides) -> TrainConfig:
    check_name(name)
    kw = dict(DEFAULTS[name])
    kw.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**kw)


def _lr(step: int, total: int, base: float, warmup: int = 100) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _scenes(seed: int, phase: int, step: int, n: int):
    return [generate_scene(scene_seed(seed, "train", (phase * 10_000_000) + step * n + i)) for i in range(n)]


def describe_prompt(caption: str, question: str) -> str:
    """Prompt of a describe-then-answer question: the caption, ``:``, then the question."""
    return f"{caption} : {question}"


def build_batch(name: str, processor, scenes, targets: list[tuple[str, str]], prompt_loss_words: list[int] | None = None):
    """Model inputs + labels for (prompt, target) pairs: loss on the target tokens and ``</s>``, and on the
    first ``prompt_loss_words[i]`` words of prompt ``i`` (the caption of a describe-then-answer prompt)."""
    tok = processor.tokenizer
    prefix = caption_prompt(name, processor)
    prompts = [f"{prefix} {p}".rstrip() for p, _ in targets]
    full = [f"{prefix} {p} {t} </s>".replace("  ", " ") for p, t in targets]
    images = [s.image for s in scenes]
    with padding_side(tok, "right"):
        enc = processor(images=images, text=full, return_tensors="pt", padding=True)
        plen = processor(images=images, text=prompts, return_tensors="pt", padding=True)["attention_mask"].sum(1)
    labels = enc["input_ids"].clone()
    pos = torch.arange(labels.shape[1])[None, :]
    keep = (pos >= plen[:, None]) & (enc["attention_mask"] == 1)
    if prompt_loss_words is not None:  # word-level tokenizer: one token per word of the prompt text
        start = plen - torch.tensor([len(p.split()) for p, _ in targets])
        n = torch.tensor(prompt_loss_words)
        keep |= (pos >= start[:, None]) & (pos < (start + n)[:, None])
    labels[~keep] = -100
    return dict(enc), labels


class VisionHeads(nn.Module):
    """Linear heads on the vision tower's tokens: per patch, the type (or none) and colour of the object it shows
    (:meth:`~jsae.world.scenes.Scene.patch_owner`); per cell of the 2×2 position grid, type, colour and size."""

    def __init__(self, d: int):
        super().__init__()
        self.kind = nn.Linear(d, len(TYPES) + 1)
        self.color = nn.Linear(d, len(COLORS))
        self.size = nn.Linear(d, len(SIZES))
        self.patch_kind = nn.Linear(d, len(TYPES) + 1)
        self.patch_color = nn.Linear(d, len(COLORS))

    def forward(self, tokens: Float[torch.Tensor, "batch tokens d"]):
        b, n, d = tokens.shape
        g = int(round(n ** 0.5))
        h = g // 2
        cells = tokens.view(b, 2, h, 2, h, d).mean(dim=(2, 4)).reshape(b, 4, d)
        return (self.kind(cells), self.color(cells), self.size(cells), self.patch_kind(tokens),
                self.patch_color(tokens))


def _vision_labels(scenes, grid: int):
    b = len(scenes)
    ty = torch.zeros(b, 4, dtype=torch.long)
    co = torch.full((b, 4), -100, dtype=torch.long)
    si = torch.full((b, 4), -100, dtype=torch.long)
    pty = torch.zeros(b, grid * grid, dtype=torch.long)
    pco = torch.full((b, grid * grid), -100, dtype=torch.long)
    cl = list(COLORS)
    for i, s in enumerate(scenes):
        for o in s.objects:
            c = POSITIONS.index(o.position)
            ty[i, c] = TYPES.index(o.name) + 1
            co[i, c] = cl.index(o.color)
            si[i, c] = SIZES.index(o.size)
        owner = s.patch_owner(grid, PICTURE_MIN_FRACTION)
        for k, o in enumerate(s.objects):
            pty[i, torch.from_numpy(owner == k)] = TYPES.index(o.name) + 1
            pco[i, torch.from_numpy(owner == k)] = cl.index(o.color)
    return ty, co, si, pty, pco


#: a patch shows an object in a word picture (and for the vision tower's patch heads) when the object covers at
#: least this share of it (every object then covers two patches or more)
PICTURE_MIN_FRACTION = 0.1
#: the side of the image-token grid of both toy models (48 px: LLaVA's 8-px patches; Qwen's 4-px patches merged 2×2)
PICTURE_GRID = 6


def picture_prompt(name: str, processor, words: list[str]) -> str:
    """The captioning prompt of toy model ``name`` with its image written out in words (one word per image
    token) where the image placeholder stands: what the text-only language model reads in pretraining."""
    return caption_prompt(name, processor).replace(processor.image_token, " ".join(words), 1)


def _text_sample(name: str, processor, scene, rng: np.random.Generator) -> str:
    kinds = list(TEXT_MIX)
    kind = kinds[int(rng.choice(len(kinds), p=np.array(list(TEXT_MIX.values())) / sum(TEXT_MIX.values())))]
    cap = grammar.caption(scene.objects, int(rng.integers(grammar.N_TEMPLATES)))
    if kind.endswith("_qa"):
        q, a = grammar.sample_questions(scene, 1, rng)[0]
        body = f"{describe_prompt(cap, q)} {a}"
    else:
        body = cap
    if kind.startswith("picture"):
        words = grammar.word_picture(scene, rng, PICTURE_GRID, min_fraction=PICTURE_MIN_FRACTION)
        return f"{picture_prompt(name, processor, words)} {body} </s>"
    return f"{body} </s>"


def text_batch(name: str, processor, scenes, rng: np.random.Generator):
    """A batch of the text pretraining corpus (:data:`TEXT_MIX`): pictures written in words then their caption
    (or caption, question and answer), plain captions of every template, captions then a question and its
    answer. Loss on every token, as a language model is pretrained."""
    tok = processor.tokenizer
    texts = [_text_sample(name, processor, s, rng) for s in scenes]
    with padding_side(tok, "right"):
        enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return dict(enc), labels


@torch.no_grad()
def read_pictures(model, processor, name: str, n: int = 100, split: str = "validation", seed: int = 0,
                  batch_size: int = 50) -> dict:
    """How well the language model alone (no image) captions a picture written in words in its context: greedy
    captions after :func:`picture_prompt` of ``n`` held-out scenes, scored like image captions (object accuracy:
    type and colour (and position when given) of every object; exact captions; hallucination)."""
    from jsae.world.data import iter_world
    from jsae.world.evaluate import score_caption

    tok = processor.tokenizer
    scenes = [s for s, _ in iter_world(split, n, seed)]
    rng = np.random.default_rng([seed, 99])
    dev = next(model.parameters()).device
    ok = tot = exact = halluc = 0
    for i in range(0, n, batch_size):
        chunk = scenes[i:i + batch_size]
        prompts = [picture_prompt(name, processor, grammar.word_picture(s, rng, PICTURE_GRID, noise=0.0,
                                                                        min_fraction=PICTURE_MIN_FRACTION))
                   for s in chunk]
        with padding_side(tok, "left"):
            enc = tok(prompts, return_tensors="pt", padding=True)
        out = model.generate(input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
                             max_new_tokens=48, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
        for s, text in zip(chunk, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            r = score_caption(text, s.objects)
            ok += r["correct"]
            tot += r["total"]
            exact += r["exact_all_attributes"]
            halluc += r["hallucinated"]
    return {"n_scenes": n, "object_accuracy": round(ok / tot, 4), "captions_exact": round(exact / n, 4),
            "hallucinated": round(halluc / n, 4)}


class _StepBatches(torch.utils.data.Dataset):
    """Batch ``i`` is a pure function of ``i`` (so worker processes keep runs deterministic)."""

    def __init__(self, make, steps):
        self.make, self.steps = make, steps

    def __len__(self):
        return self.steps

    def __getitem__(self, i):
        return self.make(i)


def _loader(make, steps, workers):
    ds = _StepBatches(make, steps)
    if workers <= 0:
        return (ds[i] for i in range(steps))
    return torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                       multiprocessing_context="fork", prefetch_factor=4, persistent_workers=False)


def _to(x, device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    return x


def stage_parameters(model, stage: str) -> list[nn.Parameter]:
    """The parameters a stage trains (every other parameter is frozen in it): the language model and ``lm_head``
    in text pretraining, the vision tower in vision pretraining, the projector(s) alone in feature alignment,
    projector(s) + language model in fine-tuning (the tower stays frozen, as in LLaVA)."""
    adapter = for_model(model)
    lm = list(adapter.language_model.parameters()) + list(model.lm_head.parameters())
    proj = [p for m in adapter.projector_modules for p in m.parameters()]
    if stage == "text_pretraining":
        return lm
    if stage == "vision_pretraining":  # (Qwen's merger is on the path of its patch features)
        return list(adapter.vision_tower.parameters())
    if stage == "feature_alignment":
        return proj
    if stage == "finetuning":
        return proj + lm
    raise ValueError(f"unknown stage {stage!r}; choose one of {list(STAGES)}")


def _freeze_all_but(model, params) -> None:
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


class _ToyTraining:
    """One run of :func:`train_toy_vlm`: the model being trained and what its stages record (per-stage seconds, the
    loss history, the validation gauges).  Each stage of :data:`STAGES` is one method; :meth:`run_stage` is the
    loop they share (AdamW, warm-up and cosine decay, gradient clip 1, the stage's end state saved in fp32)."""

    def __init__(self, name: str, cfg: TrainConfig, model: Any, processor: Any, out_dir: Path, device: str,
                 workers: int, log: Any, progress: bool) -> None:
        self.name, self.cfg, self.model, self.processor = name, cfg, model, processor
        self.out_dir, self.device, self.workers, self.log, self.progress = out_dir, device, workers, log, progress
        self.adapter = for_model(model)
        self.times: dict[str, float] = {}
        self.history: list[dict] = []
        self.gauges: dict[str, dict] = {}

    def run_stage(self, stage: str, steps: int, lr: float, make_batch: Any, loss_fn: Any, extra: Any = ()) -> None:
        """Train the parameters of ``stage`` (:func:`stage_parameters`, plus ``extra``) for ``steps`` steps, all
        others frozen; a stage of 0 steps is skipped."""
        model, name = self.model, self.name
        if steps == 0:
            self.times[stage] = 0.0
            return
        params = stage_parameters(model, stage) + list(extra)
        _freeze_all_but(model, params)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        t0 = time.time()
        bar = tqdm(_loader(make_batch, steps, self.workers), total=steps, desc=f"{name}: {stage}",
                   disable=not self.progress, mininterval=5)
        ema = None
        for step, batch in enumerate(bar):
            for gr in opt.param_groups:
                gr["lr"] = _lr(step, steps, lr)
            ema = _adamw_step(opt, params, loss_fn(_to(batch, self.device)), ema)
            if step % 50 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{ema:.3f}")
                self.history.append({"stage": stage, "step": step, "loss": round(ema, 4), "t": round(time.time() - t0, 1)})
            if step % 500 == 0 and not self.progress:
                self.log(f"[{name}] {stage} step {step}/{steps} loss {ema:.3f} ({time.time() - t0:.0f}s)")
        self.times[stage] = time.time() - t0
        for p in model.parameters():
            p.requires_grad_(True)
        model.eval()
        save_toy_vlm(model, self.processor, self.out_dir.with_name(f"{self.out_dir.name}.stage-{stage}"),
                     {"name": name, "stage": stage, "config": asdict(self.cfg)}, dtype=torch.float32)
        model.train()
        self.log(f"[{name}] {stage}: {steps} steps in {self.times[stage]:.0f}s, final loss {ema:.3f}")

    def lm_loss(self, batch: Any) -> torch.Tensor:
        enc, labels = batch
        h = self.adapter.language_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        logits = self.model.lm_head(h)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    def text_make(self, step: int, stage_id: int = 1) -> Any:
        scenes = _scenes(self.cfg.seed, stage_id, step, self.cfg.batch_size)
        return text_batch(self.name, self.processor, scenes, np.random.default_rng([self.cfg.seed, stage_id, step]))

    def text_pretraining(self) -> None:
        """Stage 1: the language model on the world's text, gauged by :func:`read_pictures`."""
        cfg = self.cfg
        self.run_stage("text_pretraining", cfg.text_steps, cfg.text_lr, self.text_make, self.lm_loss)
        if cfg.text_steps and cfg.eval_n:
            self.model.eval()
            self.gauges["text_pretraining"] = read_pictures(self.model, self.processor, self.name, n=cfg.eval_n, seed=cfg.seed)
            self.model.train()
            self.log(f"[{self.name}] text pretraining: the LM reads pictures in words: "
                     f"{json.dumps(self.gauges['text_pretraining'])}")

    def vision_pretraining(self, parts_dir: str | Path | None) -> None:
        """Stage 2: the tower on the generator's labels (the adapter's patch features: one per image token); with
        ``parts_dir`` the text-only LM and the pre-VLM tower are saved there (:func:`save_parts`)."""
        cfg, adapter, processor = self.cfg, self.adapter, self.processor
        heads = VisionHeads(adapter.d_vision).to(self.device)

        def vision_batch(step: int) -> Any:
            scenes = _scenes(cfg.seed, 2, step, cfg.batch_size)
            enc = dict(processor.image_processor([s.image for s in scenes], return_tensors="pt"))
            return enc, _vision_labels(scenes, PICTURE_GRID)

        def vision_loss(batch: Any) -> torch.Tensor:
            enc, labels = batch
            outs = heads(adapter.patch_features(enc))
            return sum(F.cross_entropy(o.flatten(0, 1), y.flatten()) for o, y in zip(outs, labels))

        self.run_stage("vision_pretraining", cfg.vision_steps, cfg.vision_lr, vision_batch, vision_loss,
                       extra=list(heads.parameters()))
        if parts_dir is not None and toy_spec(self.name).ships_parts:
            save_parts(self.model, processor, parts_dir, {"stages": list(STAGES[:2]), "config": asdict(cfg),
                                                          "seconds": {k: round(v, 1) for k, v in self.times.items()},
                                                          "text_pretraining_gauge": self.gauges.get("text_pretraining")})

    def vlm_batch(self, step: int, stage_id: int, qa_fraction: float) -> Any:
        """Captions of every template (so that none collapses: the text SAE sees them all) and, with probability
        ``qa_fraction``, describe-then-answer QA whose caption keeps its loss."""
        cfg = self.cfg
        scenes = _scenes(cfg.seed, stage_id, step, cfg.batch_size)
        srng = np.random.default_rng([cfg.seed, stage_id, step])
        targets, caption_words = [], []
        for s in scenes:
            cap = grammar.caption(s.objects, int(srng.integers(grammar.N_TEMPLATES)))
            if qa_fraction and srng.random() < qa_fraction:
                q, a = grammar.sample_questions(s, 1, srng)[0]
                targets.append((describe_prompt(cap, q), a))
                caption_words.append(len(cap.split()))
            else:
                targets.append(("", cap))
                caption_words.append(0)
        enc, labels = build_batch(self.name, self.processor, scenes, targets, caption_words)
        return "vlm", dict(enc), labels

    def vlm_loss(self, batch: Any) -> torch.Tensor:
        kind, enc, labels = batch
        if kind == "text":
            return self.lm_loss((enc, labels))
        logits = self.model(**enc).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    def feature_alignment(self) -> None:
        """Stage 3: the projector alone, LM and tower frozen, on captions of every template."""
        cfg = self.cfg
        self.run_stage("feature_alignment", cfg.align_steps, cfg.align_lr,
                       functools.partial(self.vlm_batch, stage_id=3, qa_fraction=0.0), self.vlm_loss)

    def finetuning(self) -> None:
        """Stage 4: projector + LM (tower frozen) on captions and QA, every ``finetune_text_every``-th step a
        text-pretraining batch."""
        cfg = self.cfg

        def finetune_batch(step: int) -> Any:
            if cfg.finetune_text_every and step % cfg.finetune_text_every == cfg.finetune_text_every - 1:
                return ("text", *self.text_make(step, stage_id=6))
            return self.vlm_batch(step, 4, cfg.finetune_qa_fraction)

        self.run_stage("finetuning", cfg.finetune_steps, cfg.finetune_lr, finetune_batch, self.vlm_loss)


def train_toy_vlm(name: str, out_dir: str | Path | None = None, cfg: TrainConfig | None = None,
                  device: str = "cpu", threads: int | None = 2, workers: int | None = None, log=print,
                  progress: bool = True, init_from: str | Path | None = None, parts_dir: str | Path | None = None,
                  keep_stages: bool = False):
    """Train toy model ``name`` with the LLaVA recipe and save it to ``out_dir`` (default: the shipped directory).

    Stages (:data:`STAGES`; one with 0 steps is skipped, so ``init_from`` + zero steps resumes a later stage), each a
    method of :class:`_ToyTraining`:

    1. **text pretraining** of the language model on the world's text (:func:`text_batch`): pictures written in
       words then captions and describe-then-answer QA, plain captions of every template, captions then QA;
       gauged by :func:`read_pictures` (the LM captions a picture in its context).
    2. **vision pretraining** of the tower on the generator's labels (per patch and per cell).
    3. **feature alignment**: the projector alone, LM and tower frozen, on captions of every template.
    4. **fine-tuning**: projector + LM (tower frozen) on captions and describe-then-answer QA, every
       ``finetune_text_every``-th step a text-pretraining batch.

    With ``parts_dir`` the text-only LM and the pre-VLM tower (after stages 1–2) are saved there as well
    (:func:`save_parts`, the parts VISTA composes; the toy LLaVA only).  Every stage's end state is kept (fp32)
    in ``<out_dir>.stage-<stage>`` until the run completes (``keep_stages``: kept after it).  Returns ``(model, processor, summary)``;
    ``summary`` holds per-stage timings, losses and validation gauges.
    """
    check_name(name)
    cfg = cfg or default_config(name)
    if threads:
        torch.set_num_threads(int(threads))
    out_dir = Path(out_dir) if out_dir is not None else model_dir(name)
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    processor = build_processor(name, tok)
    if init_from is not None:  # continue from saved weights (e.g. run only the later stages)
        model = model_class(name).from_pretrained(str(check_weights(name, init_from)), local_files_only=True,
                                                  use_safetensors=True, dtype=torch.float32).to(device)
    else:
        model = build_model(name, tok, cfg.size, cfg.seed).to(device)
    model.train()
    if workers is None:
        workers = max(0, min(4, (os.cpu_count() or 1) - 1))
    run = _ToyTraining(name, cfg, model, processor, out_dir, device, workers, log, progress)
    run.text_pretraining()
    run.vision_pretraining(parts_dir)
    run.feature_alignment()
    run.finetuning()

    model.eval()
    summary = {"name": name, "recipe": "llava", "stages": list(STAGES), "config": asdict(cfg),
               "init_from": str(init_from) if init_from else None, "device": str(device), "threads": threads,
               "workers": workers, "seconds": {k: round(v, 1) for k, v in run.times.items()},
               "total_seconds": round(sum(run.times.values()), 1), "gauges": run.gauges, "history": run.history}
    if cfg.eval_n:
        from jsae.world.evaluate import evaluate

        summary["validation"] = evaluate(model, processor, name, n=cfg.eval_n, split="validation",
                                         seed=cfg.seed, progress=False)
        log(f"[{name}] validation: {json.dumps(summary['validation'])}")
    save_toy_vlm(model, processor, out_dir, summary)
    for stage in STAGES if not keep_stages else ():
        shutil.rmtree(out_dir.with_name(f"{out_dir.name}.stage-{stage}"), ignore_errors=True)
    log(f"[{name}] saved to {out_dir} (training {summary['total_seconds']:.0f}s)")
    return model, processor, summary


# ---- stage-only training: the toy text-only language model and the toy vision tower -------------------

#: directories (under ``jsae/world/models``) of the shipped parts of the toy LLaVA before any VLM training
PART_DIRS = {"lm": "llava-text-lm", "vision": "llava-vision-tower"}


def _adamw_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor, ema: float | None) -> float:
    """One optimiser step of every toy-training stage (gradient norm clipped at 1); returns the loss's running mean."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()


def train_parts(name: str = "llava", out_dir: str | Path | None = None, stages: tuple[str, ...] = ("lm", "vision"),
                seed: int = 0, threads: int | None = 1, workers: int | None = None, log=print,
                progress: bool = True) -> dict[str, Path]:
    """Run only the first stages of toy model ``name``'s recipe (``"lm"``: text pretraining; ``"vision"``: vision
    pretraining) — the same code, seeds and step counts as :func:`train_toy_vlm`, the later stages skipped — and
    save the parts on their own:

    * ``out_dir/llava-text-lm``: the text-only language model (``LlamaForCausalLM`` + the world tokenizer),
      never trained with images;
    * ``out_dir/llava-vision-tower``: the vision tower (``CLIPVisionModel`` + the image processor).

    ``out_dir`` defaults to the package's ``jsae/world/models``.  Returns ``{stage: directory}``.  A stage
    not in ``stages`` runs for 0 steps (so ``stages=("lm",)`` leaves the tower at its seeded initialisation)."""
    if not toy_spec(name).ships_parts:
        raise ValueError(f"parts are defined for the toy LLaVA only (a CLIP tower + a Llama LM), got {name!r}")
    bad = [s for s in stages if s not in PART_DIRS]
    if bad or not stages:
        raise ValueError(f"stages must be a non-empty subset of {list(PART_DIRS)}, got {list(stages)}")
    base = default_config(name, seed=seed)
    cfg = TrainConfig(**{**asdict(base), "text_steps": base.text_steps if "lm" in stages else 0,
                         "vision_steps": base.vision_steps if "vision" in stages else 0, "align_steps": 0,
                         "finetune_steps": 0, "eval_n": base.eval_n if "lm" in stages else 0})
    out_dir = Path(out_dir) if out_dir is not None else model_dir(name).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".parts", dir=out_dir))
    try:
        model, processor, summary = train_toy_vlm(name, tmp / "vlm", replace(cfg, eval_n=0), threads=threads,
                                                  workers=workers, log=log, progress=progress)
        if "lm" in stages and cfg.eval_n:
            summary["gauges"]["text_pretraining"] = read_pictures(model, processor, name, n=cfg.eval_n, seed=seed)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return save_parts(model, processor, out_dir, {"stages": list(stages), **summary}, tuple(stages))


def save_parts(model, processor, out_dir: str | Path, extra: dict, stages: tuple[str, ...] = ("lm", "vision"),
               dtype: torch.dtype = torch.float16) -> dict[str, Path]:
    """Save a LLaVA's language model (as ``*ForCausalLM`` with its tokenizer) and vision tower (with its image
    processor) as separate transformers directories (fp16 safetensors; atomic)."""
    from transformers import AutoModel, AutoModelForCausalLM

    out_dir = Path(out_dir)
    written = {}
    for stage in stages:
        target = out_dir / PART_DIRS[stage]
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=out_dir))
        try:
            if stage == "lm":
                part = AutoModelForCausalLM.from_config(model.config.text_config)
                part.model.load_state_dict(model.model.language_model.state_dict())
                part.lm_head.load_state_dict(model.lm_head.state_dict())
                g = part.generation_config
                g.bos_token_id, g.eos_token_id, g.pad_token_id, g.do_sample = 1, 2, 0, False
                side = processor.tokenizer
            else:
                part = AutoModel.from_config(model.config.vision_config)
                part.load_state_dict(model.model.vision_tower.state_dict())
                side = processor.image_processor
            sd = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
                  for k, v in part.state_dict().items()}
            part.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
            side.save_pretrained(tmp)
            (tmp / "training.json").write_text(json.dumps({"part": stage, **extra}, indent=2, default=str))
            from jsae.files import apply_umask

            apply_umask(tmp)
            os.chmod(tmp, 0o777 & ~_umask())
            if target.exists():
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        written[stage] = target
    return written


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def part_dir(stage: str) -> Path:
    """Directory of a shipped part of the toy LLaVA (``"lm"`` or ``"vision"``), checked."""
    if stage not in PART_DIRS:
        raise ValueError(f"unknown part {stage!r}; choose one of {list(PART_DIRS)}")
    d = model_dir("llava").parent / PART_DIRS[stage]
    if not (d / "config.json").is_file() or not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"the toy {stage} part is missing at {d}; rebuild it with `jsae vista toy-parts`")
    return d
