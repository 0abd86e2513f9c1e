"""Deterministic training of the toy VLMs on the world (``jsae world train-models``).

The default recipe takes about 30 minutes per model on 2 CPU cores (measured with other work sharing the
cores: toy LLaVA 1815 s, toy Qwen3-VL-MoE 1885 s; see the README) and is what produced the shipped weights:

1. **Language model on captions as plain text** (every template), so that a *text* SAE on it means something.
2. **Vision pretraining**: the vision tower (its adapter's ``patch_features``: LLaVA's CLIP encoder tokens,
   Qwen's merged tokens) with small linear heads predicting, per cell of the 2×2 position grid, the object
   type (or none), colour and size, from the scene generator's labels (captioning alone teaches shape far
   too slowly).
3. **Whole VLM on captions of every template** (``vlm``; drawn at random so that no template collapses; the
   prompt is the model's chat template with ``describe the image``, text after the image; loss on the
   caption tokens + ``</s>``).
4. **Describe-then-answer** (``cqa``): 75% of the samples are ``"<caption> : <question> <answer>"`` with the
   loss on the caption *and* the answer (not on the question), the rest plain captions; at inference the model
   captions first and answers after its own caption (``jsae.world.evaluate.answer_questions``).

``qa`` (questions straight after the image) and ``tqa`` (describe-then-answer on the language model alone)
are available but off by default.  All data is drawn on the fly from step-derived seeds, so a run is a pure
function of its seed and step counts (on a given device / thread count).  The MoE model runs with
transformers' default ``grouped_mm`` experts (measured 0.65 s a captioning step against 0.77 s for ``eager``).
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
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from jaxtyping import Float
from tqdm.auto import tqdm

from jsae.adapters import for_model, padding_side
from jsae.world import grammar
from jsae.world.data import scene_seed
from jsae.world.models import (TOY_MODELS, _check_name, build_model, build_processor, caption_prompt, check_weights,
                               model_class, model_dir, save_toy_vlm)
from jsae.world.processors import build_tokenizer
from jsae.world.scenes import COLORS, POSITIONS, SIZES, TYPES, check_seed, generate_scene


@dataclass
class TrainConfig:
    seed: int = 0
    lm_steps: int = 400
    vision_steps: int = 1500
    vlm_steps: int = 2500
    qa_steps: int = 1500
    cqa_steps: int = 0
    tqa_steps: int = 0
    tqa_lr: float = 3e-4
    batch_size: int = 32
    lm_lr: float = 2e-3
    vision_lr: float = 2e-3
    vlm_lr: float = 1e-3
    qa_fraction: float = 0.4
    qa_phase_fraction: float = 0.75
    qa_lr: float = 5e-4
    cqa_fraction: float = 0.75
    cqa_lr: float = 1e-3
    size: str = "default"
    checkpoint_every: int = 400
    eval_n: int = 100

    def __post_init__(self):
        check_seed(self.seed)
        for k in ("lm_steps", "vision_steps", "vlm_steps", "qa_steps", "cqa_steps", "tqa_steps", "batch_size", "checkpoint_every", "eval_n"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{k} must be a non-negative integer, got {v!r}")


#: default step counts per model (deterministic; from ``jsae.world.models.TOY_MODELS``, where the measured
#: step rates are; see the README for measured times)
DEFAULTS: dict[str, dict] = {name: dict(spec.train_steps) for name, spec in TOY_MODELS.items()}


def default_config(name: str, **overrides) -> TrainConfig:
    _check_name(name)
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


class CellHeads(nn.Module):
    """Per cell of the 2×2 position grid: type (or none), colour, size."""

    def __init__(self, d: int):
        super().__init__()
        self.kind = nn.Linear(d, len(TYPES) + 1)
        self.color = nn.Linear(d, len(COLORS))
        self.size = nn.Linear(d, len(SIZES))

    def forward(self, tokens: Float[torch.Tensor, "batch tokens d"]):
        b, n, d = tokens.shape
        g = int(round(n ** 0.5))
        h = g // 2
        cells = tokens.view(b, 2, h, 2, h, d).mean(dim=(2, 4)).reshape(b, 4, d)
        return self.kind(cells), self.color(cells), self.size(cells)


def _cell_labels(scenes):
    b = len(scenes)
    ty = torch.zeros(b, 4, dtype=torch.long)
    co = torch.full((b, 4), -100, dtype=torch.long)
    si = torch.full((b, 4), -100, dtype=torch.long)
    cl = list(COLORS)
    for i, s in enumerate(scenes):
        for o in s.objects:
            c = POSITIONS.index(o.position)
            ty[i, c] = TYPES.index(o.name) + 1
            co[i, c] = cl.index(o.color)
            si[i, c] = SIZES.index(o.size)
    return ty, co, si


def _lm_batch(scenes, tok, rng):
    texts = [grammar.caption(s.objects, int(rng.integers(grammar.N_TEMPLATES))) + " </s>" for s in scenes]
    with padding_side(tok, "right"):
        enc = tok(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    return dict(enc), labels


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


def train_toy_vlm(name: str, out_dir: str | Path | None = None, cfg: TrainConfig | None = None,
                  device: str = "cpu", threads: int | None = 2, workers: int | None = None, log=print,
                  progress: bool = True, init_from: str | Path | None = None):
    """Train toy model ``name`` from scratch and save it to ``out_dir`` (default: the shipped directory).

    Returns ``(model, processor, summary)``; ``summary`` holds phase timings and a validation evaluation.
    """
    _check_name(name)
    cfg = cfg or default_config(name)
    if threads:
        torch.set_num_threads(int(threads))
    out_dir = Path(out_dir) if out_dir is not None else model_dir(name)
    torch.manual_seed(cfg.seed)
    tok = build_tokenizer()
    processor = build_processor(name, tok)
    if init_from is not None:  # continue from saved weights (e.g. run only the later phases)
        model = model_class(name).from_pretrained(str(check_weights(name, init_from)), local_files_only=True,
                                                  use_safetensors=True, dtype=torch.float32).to(device)
    else:
        model = build_model(name, tok, cfg.size, cfg.seed).to(device)
    model.train()
    times: dict[str, float] = {}
    history: list[dict] = []
    if workers is None:
        workers = max(0, min(4, (os.cpu_count() or 1) - 1))

    def run_phase(label, steps, params, lr, make_batch, loss_fn):
        if steps == 0:
            times[label] = 0.0
            return
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
        t0 = time.time()
        loader = _loader(make_batch, steps, workers)
        bar = tqdm(loader, total=steps, desc=f"{name}: {label}", disable=not progress, mininterval=5)
        ema = None
        for step, batch in enumerate(bar):
            for gr in opt.param_groups:
                gr["lr"] = _lr(step, steps, lr)
            ema = _adamw_step(opt, params, loss_fn(_to(batch, device)), ema)
            if step % 50 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{ema:.3f}")
                history.append({"phase": label, "step": step, "loss": round(ema, 4), "t": round(time.time() - t0, 1)})
            if step % 500 == 0 and not progress:
                log(f"[{name}] {label} step {step}/{steps} loss {ema:.3f} ({time.time() - t0:.0f}s)")
            if label in ("vlm", "qa", "cqa", "tqa") and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < steps:
                model.eval()
                save_toy_vlm(model, processor, out_dir.with_name(out_dir.name + ".checkpoint"),
                             {"name": name, "phase": label, "step": step + 1, "config": asdict(cfg)})
                model.train()
                log(f"[{name}] checkpoint at {label} step {step + 1} ({time.time() - t0:.0f}s), loss {ema:.3f}")
        times[label] = time.time() - t0
        log(f"[{name}] {label}: {steps} steps in {times[label]:.0f}s, final loss {ema:.3f}")

    # 1. language model on captions as plain text
    lm = model.model.language_model

    def lm_batch(step):
        scenes = _scenes(cfg.seed, 1, step, cfg.batch_size)
        return _lm_batch(scenes, tok, np.random.default_rng([cfg.seed, 1, step]))

    def lm_loss(batch):
        enc, labels = batch
        h = lm(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        logits = model.lm_head(h)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    run_phase("lm", cfg.lm_steps, list(lm.parameters()) + list(model.lm_head.parameters()), cfg.lm_lr, lm_batch,
              lm_loss)

    # 2. vision pretraining on the generator's labels (the adapter's patch features: one per image token)
    adapter = for_model(model)
    vt = adapter.vision_tower
    heads = CellHeads(adapter.d_vision).to(device)

    def vision_batch(step):
        scenes = _scenes(cfg.seed, 2, step, cfg.batch_size)
        enc = dict(processor.image_processor([s.image for s in scenes], return_tensors="pt"))
        return enc, _cell_labels(scenes)

    def vision_loss(batch):
        enc, (ty, co, si) = batch
        t, c, s = heads(adapter.patch_features(enc))
        return (F.cross_entropy(t.flatten(0, 1), ty.flatten()) + F.cross_entropy(c.flatten(0, 1), co.flatten())
                + F.cross_entropy(s.flatten(0, 1), si.flatten()))

    run_phase("vision", cfg.vision_steps, list(vt.parameters()) + list(heads.parameters()), cfg.vision_lr,
              vision_batch, vision_loss)

    # 3. whole VLM: captioning + QA
    def vlm_batch(step, phase=3, qa_fraction=cfg.qa_fraction, describe_first=False):
        scenes = _scenes(cfg.seed, phase, step, cfg.batch_size)
        srng = np.random.default_rng([cfg.seed, phase, step])
        targets, caption_words = [], []
        for s in scenes:  # every caption template, so that none collapses (the text SAE sees them all)
            cap = grammar.caption(s.objects, int(srng.integers(grammar.N_TEMPLATES)))
            if srng.random() < qa_fraction:
                q, a = grammar.sample_questions(s, 1, srng)[0]
                targets.append((describe_prompt(cap, q) if describe_first else q, a))
                caption_words.append(len(cap.split()) if describe_first else 0)  # the caption keeps its loss
            else:
                targets.append(("", cap))
                caption_words.append(0)
        enc, labels = build_batch(name, processor, scenes, targets, caption_words)
        return dict(enc), labels

    def vlm_loss(batch):
        enc, labels = batch
        logits = model(**enc).logits
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())

    run_phase("vlm", cfg.vlm_steps, [p for p in model.parameters() if p.requires_grad], cfg.vlm_lr, vlm_batch,
              vlm_loss)

    # 4. question-answering emphasis (binding an object word to its image tokens is learnt slower than captioning)
    run_phase("qa", cfg.qa_steps, [p for p in model.parameters() if p.requires_grad], cfg.qa_lr,
              functools.partial(vlm_batch, phase=4, qa_fraction=cfg.qa_phase_fraction), vlm_loss)

    # 5. describe-then-answer: the question follows the image's (own) caption
    run_phase("cqa", cfg.cqa_steps, [p for p in model.parameters() if p.requires_grad], cfg.cqa_lr,
              functools.partial(vlm_batch, phase=5, qa_fraction=cfg.cqa_fraction, describe_first=True), vlm_loss)

    # 6. text-only describe-then-answer on the language model (the answer copied from the caption in context)
    def tqa_batch(step):
        scenes = _scenes(cfg.seed, 6, step, cfg.batch_size)
        srng = np.random.default_rng([cfg.seed, 6, step])
        pairs = [grammar.sample_questions(s, 1, srng)[0] for s in scenes]
        prompts = [describe_prompt(grammar.caption(s.objects, 0), q) for s, (q, _) in zip(scenes, pairs)]
        with padding_side(tok, "right"):
            enc = tok([f"{p} {a} </s>" for p, (_, a) in zip(prompts, pairs)], return_tensors="pt", padding=True)
            plen = tok(prompts, return_tensors="pt", padding=True)["attention_mask"].sum(1)
        labels = enc["input_ids"].clone()
        pos = torch.arange(labels.shape[1])[None, :]
        labels[(pos < plen[:, None]) | (enc["attention_mask"] == 0)] = -100
        return dict(enc), labels

    run_phase("tqa", cfg.tqa_steps, list(lm.parameters()) + list(model.lm_head.parameters()), cfg.tqa_lr, tqa_batch,
              lm_loss)

    model.eval()
    summary = {"name": name, "config": asdict(cfg), "init_from": str(init_from) if init_from else None, "device": str(device), "threads": threads, "workers": workers,
               "seconds": {k: round(v, 1) for k, v in times.items()}, "total_seconds": round(sum(times.values()), 1),
               "history": history}
    if cfg.eval_n:
        from jsae.world.evaluate import evaluate

        summary["validation"] = evaluate(model, processor, name, n=cfg.eval_n, split="validation",
                                         seed=cfg.seed, progress=False)
        log(f"[{name}] validation: {json.dumps(summary['validation'])}")
    save_toy_vlm(model, processor, out_dir, summary)
    ck = out_dir.with_name(out_dir.name + ".checkpoint")
    if ck.exists():
        shutil.rmtree(ck, ignore_errors=True)
    log(f"[{name}] saved to {out_dir} (training {summary['total_seconds']:.0f}s)")
    return model, processor, summary


# ---- stage-only training: the toy text-only language model and the toy vision tower -------------------

#: directories (under ``jsae/world/models``) of the shipped parts of the toy LLaVA before any VLM training
PART_DIRS = {"lm": "llava-text-lm", "vision": "llava-vision-tower"}


def _context_batch(seed: int, step: int, n: int, tok):
    """Two captions of the same scene in different templates, one after the other: ``cap_a </s> cap_b </s>``
    (loss on the second caption and its ``</s>``)."""
    scenes = _scenes(seed, 7, step, n)
    rng = np.random.default_rng([seed, 7, step])
    firsts, texts = [], []
    for s in scenes:
        a, b = rng.choice(grammar.N_TEMPLATES, size=2, replace=False)
        first = grammar.caption(s.objects, int(a)) + " </s>"
        firsts.append(first)
        texts.append(f"{first} {grammar.caption(s.objects, int(b))} </s>")
    with padding_side(tok, "right"):
        enc = tok(texts, return_tensors="pt", padding=True)
        plen = tok(firsts, return_tensors="pt", padding=True)["attention_mask"].sum(1)
    labels = enc["input_ids"].clone()
    pos = torch.arange(labels.shape[1])[None, :]
    labels[(pos < plen[:, None]) | (enc["attention_mask"] == 0)] = -100
    return dict(enc), labels


def _adamw_step(opt: torch.optim.Optimizer, params: list, loss: torch.Tensor, ema: float | None) -> float:
    """One optimiser step of every toy-training stage (gradient norm clipped at 1); returns the loss's running mean."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    return loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()


def train_lm_context(lm, tok, seed: int = 0, steps: int = 300, batch_size: int = 32, lr: float = 1e-3, log=print) -> float:
    """A text-only stage for a causal LM (``*ForCausalLM``): describe a scene again after a description of it in
    context (:func:`_context_batch`), so that the LM reads what comes before a caption — the in-context use a real
    LLM has and a projector into a frozen LM relies on.  Never sees an image.  Returns the final loss."""
    torch.manual_seed(seed)
    lm.train()
    params = [p for p in lm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    t0, ema = time.time(), None
    for step in range(steps):
        for gr in opt.param_groups:
            gr["lr"] = _lr(step, steps, lr, warmup=min(100, steps // 5))
        enc, labels = _context_batch(seed, step, batch_size, tok)
        logits = lm(**enc).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
        ema = _adamw_step(opt, params, loss, ema)
        if step % 100 == 0 or step == steps - 1:
            log(f"[context] step {step}/{steps} loss {ema:.3f} ({time.time() - t0:.0f}s)")
    lm.eval()
    return float(ema or 0.0)


def train_parts(name: str = "llava", out_dir: str | Path | None = None, stages: tuple[str, ...] = ("lm", "vision"),
                seed: int = 0, threads: int | None = 1, workers: int | None = None, log=print,
                progress: bool = True, context_steps: int = 500) -> dict[str, Path]:
    """Run only the first stages of toy model ``name``'s recipe (``"lm"``: the language model on captions as
    plain text; ``"vision"``: vision pretraining on the generator's labels) — the same code, seeds and step
    counts as :func:`train_toy_vlm`, every later stage skipped — and save the parts on their own:

    * ``out_dir/llava-text-lm``: the text-only language model (``LlamaForCausalLM`` + the world tokenizer),
      never trained with images;
    * ``out_dir/llava-vision-tower``: the vision tower (``CLIPVisionModel`` + the image processor).

    ``"context"`` (optional, after ``"lm"``; not in the shipped part) continues the LM, still text-only, on a scene's
    caption after another caption of it (:func:`train_lm_context`, ``context_steps``) so that it reads its context.

    ``out_dir`` defaults to the package's ``jsae/world/models``.  Returns ``{stage: directory}``.  A stage
    not in ``stages`` runs for 0 steps (so ``stages=("lm",)`` leaves the tower at its seeded initialisation)."""
    if name != "llava":
        raise ValueError(f"parts are defined for the toy LLaVA only (a CLIP tower + a Llama LM), got {name!r}")
    bad = [s for s in stages if s not in (*PART_DIRS, "context")]
    if bad or not stages or "context" in stages and "lm" not in stages:
        raise ValueError(f"stages must be a non-empty subset of {[*PART_DIRS, 'context']} (context needs lm), got {list(stages)}")
    base = default_config(name, seed=seed)
    cfg = TrainConfig(**{**asdict(base), "lm_steps": base.lm_steps if "lm" in stages else 0,
                         "vision_steps": base.vision_steps if "vision" in stages else 0, "vlm_steps": 0, "qa_steps": 0,
                         "cqa_steps": 0, "tqa_steps": 0, "eval_n": 0})
    out_dir = Path(out_dir) if out_dir is not None else model_dir(name).parent
    tmp = Path(tempfile.mkdtemp(prefix=".parts", dir=out_dir if out_dir.exists() else None))
    try:
        model, processor, summary = train_toy_vlm(name, tmp / "vlm", cfg, threads=threads, workers=workers, log=log,
                                                  progress=progress)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if "context" in stages:  # text-only, on a causal-LM view sharing the VLM's LM weights
        from transformers import AutoModelForCausalLM

        view = AutoModelForCausalLM.from_config(model.config.text_config)
        view.model = model.model.language_model
        view.lm_head = model.lm_head
        summary["context_loss"] = train_lm_context(view, processor.tokenizer, seed, steps=context_steps, log=log)
    return save_parts(model, processor, out_dir, {"stages": list(stages), **summary},
                      tuple(x for x in stages if x in PART_DIRS))


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
