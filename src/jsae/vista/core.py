"""VISTA: train a LLaVA-style model's visual projector so that image tokens land in the language model's
own (labelled) *text* SAE feature space.

Loss (vision tower and language model frozen, only ``adapter.projector`` trained)::

    L = CE(caption | image)  +  λ · Σ_{l ∈ layers} mean_{image tokens t} ‖SAE_l(h_l,t) − h_l,t‖² / ‖h_l,t‖²

(``loss_form="normalised"``) or, the paper's raw form (``loss_form="mse"``), λ · Σ_l mean over image tokens
and dimensions of (SAE_l(h_l,t) − h_l,t)².  The paper trains the projector *from scratch* (``reinit=True``,
the default) for both the baseline and VISTA; :func:`jsae.vista.compose` builds the model it trains.

where ``h_l`` is the output of decoder layer ``l`` (``adapter.layer_module(l)``, SAELens's
``blocks.l.hook_resid_post``) and ``SAE_l`` a frozen SAELens SAE trained on text.  λ = 0 is the baseline
(the same training without the SAE term).

Public API (tensors at the boundaries are jaxtyping-annotated):

* :func:`load_text_sae` — a SAELens SAE from a release (``"release"`` / ``"release:sae_id"``) or a local
  directory; :func:`check_text_sae` — one-line errors for a width or hook-name mismatch;
* :func:`sae_recon_error` — the normalised reconstruction error term;
* :func:`reinit_projector`, :func:`train_projector` (:class:`VistaConfig`), :func:`save_projector` /
  :func:`load_projector` (safetensors);
* :func:`collect_text_states`, :func:`train_text_sae` — a SAELens TopK SAE on per-token activations of
  plain-text captions, trained by SAELens's own ``SAETrainer``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from jsae.guards import typechecked
from jsae.activations import read_layers, states_at
from jsae.adapters import layer_of_hook, unwrap
from jsae.vlm import as_vlm

# ---- text SAEs ----------------------------------------------------------------------------------


def load_text_sae(spec: str, sae_id: str | None = None, device: str = "cpu") -> Any:
    """A SAELens SAE from a local directory (``cfg.json`` + ``sae_weights.safetensors``), a release name
    (``SAE.from_pretrained(release, sae_id)``; ``"release:sae_id"`` also works), e.g. a Gemma Scope /
    Llama Scope release or jsae's ``jsae-vista-toy-llava-text-sae``."""
    from sae_lens import SAE

    from jsae.releases.registry import resolve_sae_id

    path = Path(spec)
    if path.is_dir():
        if not (path / "cfg.json").exists():
            raise FileNotFoundError(f"{path} has no cfg.json; pass a SAELens SAE directory (sae.save_model(dir)) or a release name")
        return SAE.load_from_disk(str(path), device=device).eval()
    if sae_id is None and ":" in spec:
        spec, sae_id = spec.split(":", 1)
    sae_id = resolve_sae_id(spec, sae_id)
    return SAE.from_pretrained(spec, sae_id, device=device).eval()


def check_text_sae(sae: Any, adapter: Any, layer: int) -> None:
    """One-line errors when ``sae`` cannot constrain decoder layer ``layer`` of ``adapter``'s model."""
    adapter.check_layer(layer)
    d_in = int(sae.cfg.d_in)
    if d_in != adapter.d_in:
        raise ValueError(f"text SAE has d_in={d_in} but the language model's hidden size is {adapter.d_in}; "
                         f"use an SAE trained on this model's residual stream")
    hook = getattr(getattr(sae.cfg, "metadata", None), "hook_name", None)
    own = layer_of_hook(hook)
    if hook is not None and hook != adapter.hook_name(layer) and own != layer:
        raise ValueError(f"text SAE was trained on hook {hook!r} (layer {own}), not layer {layer} "
                         f"({adapter.hook_name(layer)!r}); pass the SAE of that hook or constrain layer {own}")
    from jsae.interventions import check_sae_site  # the model it was trained on: the interventions' own check

    text_cfg = getattr(adapter.hf_model.config, "text_config", None)
    lm_name = str(getattr(text_cfg, "name_or_path", "") or "")  # a text SAE of the base LM applies (Gemma Scope on PaliGemma)
    check_sae_site(sae, layer, adapter, "VISTA run", "pass the text SAEs trained on this model's language model "
                   "(--text-sae), or leave --text-sae out to train them", also_models=(lm_name,))


def check_projector(adapter: Any) -> nn.Module:
    """The projector module, or a one-line error for an adapter without one."""
    try:
        proj = adapter.projector
    except (AttributeError, NotImplementedError) as exc:
        raise ValueError(f"{type(adapter).__name__} has no visual projector ({exc}); VISTA needs a LLaVA-style model "
                         "whose adapter exposes .projector") from None
    if proj is None:
        raise ValueError(f"{type(adapter).__name__} has no visual projector; VISTA needs a LLaVA-style model whose "
                         "adapter exposes .projector")
    module = unwrap(proj)
    if not any(True for _ in module.parameters()):
        raise ValueError(f"{type(adapter).__name__}.projector has no parameters to train")
    return module


LOSS_FORMS = ("normalised", "mse")


@typechecked
def sae_recon_error(sae: Any, h: Float[Tensor, "n d"], form: str = "normalised") -> Float[Tensor, ""]:
    """``"normalised"``: mean over rows of ‖SAE(h) − h‖² / ‖h‖²; ``"mse"``: the raw mean squared error over
    rows and dimensions (the paper's form).  Differentiable in ``h``; the SAE stays as it is."""
    recon = sae.decode(sae.encode(h))
    if form == "mse":
        return (recon - h).pow(2).mean()
    if form != "normalised":
        raise ValueError(f"loss form must be one of {list(LOSS_FORMS)}, got {form!r}")
    return ((recon - h).pow(2).sum(-1) / h.pow(2).sum(-1).clamp(min=1e-8)).mean()


# ---- projector training -------------------------------------------------------------------------


@dataclass
class VistaConfig:
    """``lam`` (λ ≥ 0; 0 = the baseline), ``layers`` (constrained decoder layers), steps, batch, lr, seed;
    ``reinit`` (projector from scratch, seeded; the paper's way), ``loss_form`` ("normalised" | "mse")."""

    lam: float = 1.0
    layers: tuple[int, ...] = (4,)
    steps: int = 400
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    reinit: bool = True
    loss_form: str = "normalised"

    def __post_init__(self) -> None:
        if self.loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form must be one of {list(LOSS_FORMS)}, got {self.loss_form!r}")
        if not isinstance(self.lam, (int, float)) or math.isnan(self.lam) or self.lam < 0:
            raise ValueError(f"lam (λ) must be >= 0, got {self.lam}; use 0 for the baseline and a positive weight for VISTA")
        self.layers = tuple(int(x) for x in self.layers)
        if self.lam > 0 and not self.layers:
            raise ValueError("lam > 0 needs at least one constrained layer; pass layers=(...) or lam=0 for the baseline")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")


def reinit_projector(adapter: Any, seed: int) -> None:
    """Re-initialise the projector's layers deterministically (same seed → same weights)."""
    module = check_projector(adapter)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()


def _batches(adapter: Any, processor: Any, images: Sequence[Any], captions: Sequence[str], batch_size: int) -> list[Any]:
    return [adapter.build_inputs(processor, list(images[i:i + batch_size]), list(captions[i:i + batch_size]))
            for i in range(0, len(images) - batch_size + 1, batch_size)] or \
           [adapter.build_inputs(processor, list(images), list(captions))]


def _caption_ce(logits: Tensor, enc: Mapping[str, Any]) -> Tensor:
    ids, cm = enc["input_ids"], enc["caption_mask"].bool()
    tgt = cm[:, 1:]
    return nn.functional.cross_entropy(logits[:, :-1][tgt].float(), ids[:, 1:][tgt])


def vista_losses(model: Any, adapter: Any, saes: Mapping[int, Any], enc: Mapping[str, Any],
                 form: str = "normalised") -> tuple[Tensor, dict[int, Tensor]]:
    """(caption CE, {layer: normalised SAE error on image tokens}) for one batch (differentiable when
    gradients are enabled)."""
    img = adapter.image_token_mask(enc)
    got = read_layers(model, adapter, enc, list(saes), logits=True, grad=torch.is_grad_enabled())
    ce = _caption_ce(got["logits"], enc)
    errs = {layer: sae_recon_error(saes[layer], got[layer][img].float(), form) for layer in saes}
    return ce, errs


def train_projector(model: Any, processor: Any, adapter: Any, saes: Mapping[int, Any], images: Sequence[Any],
                    captions: Sequence[str], cfg: VistaConfig, progress: bool = True,
                    eval_every: int = 50) -> dict[str, Any]:
    """Train ``adapter.projector`` (everything else frozen) with caption CE + λ·Σ_l SAE error.

    ``saes`` maps constrained layers to frozen text SAEs (only ``cfg.layers`` enter the loss; others are
    monitored).  Returns the history (per logged step: ce, per-layer error)."""
    model, processor, adapter = as_vlm(model, processor, adapter)
    module = check_projector(adapter)
    for layer in cfg.layers:
        if layer not in saes:
            raise ValueError(f"no text SAE given for constrained layer {layer}; pass saes={{{layer}: sae, ...}}")
    for layer, sae in saes.items():
        check_text_sae(sae, adapter, layer)
    hf = unwrap(model)
    states = {n: p.requires_grad for n, p in hf.named_parameters()}
    for sae in saes.values():
        for p in sae.parameters():
            p.requires_grad_(False)
    if cfg.reinit:
        reinit_projector(adapter, cfg.seed)
    batches = _batches(adapter, processor, images, captions, cfg.batch_size)
    history: list[dict[str, Any]] = []
    t0 = time.time()
    try:
        for p in hf.parameters():
            p.requires_grad_(False)
        params = list(module.parameters())
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=cfg.lr)
        g = torch.Generator().manual_seed(cfg.seed)
        order: list[int] = []
        hf.train(False)
        for step in tqdm(range(cfg.steps), desc=f"projector λ={cfg.lam} layers={list(cfg.layers)}", disable=not progress):
            if not order:
                order = torch.randperm(len(batches), generator=g).tolist()
            enc = batches[order.pop()]
            ce, errs = vista_losses(model, adapter, saes, enc, cfg.loss_form)
            loss = ce
            if cfg.lam > 0:
                loss = loss + cfg.lam * sum(errs[layer] for layer in cfg.layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % eval_every == 0 or step == cfg.steps - 1:
                history.append({"step": step, "ce": float(ce.detach()), "loss": float(loss.detach()), "t": round(time.time() - t0, 1),
                                **{f"err_{layer}": float(e.detach()) for layer, e in errs.items()}})
    finally:
        for n, p in hf.named_parameters():
            p.requires_grad_(states[n])
    return {"config": asdict(cfg), "history": history, "seconds": time.time() - t0}


def save_projector(adapter: Any, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """The projector's weights as safetensors (atomic), with ``metadata`` as JSON in the header."""
    from safetensors.torch import save_file

    from jsae.files import apply_umask, writing

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().contiguous().cpu() for k, v in check_projector(adapter).state_dict().items()}
    try:
        with writing(path):
            save_file(state, str(tmp), metadata={"vista": json.dumps(dict(metadata or {}), default=str)})
            apply_umask(tmp).replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_projector(adapter: Any, path: str | Path) -> dict[str, Any]:
    """Load projector weights saved by :func:`save_projector` into ``adapter``'s model; returns the metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no projector at {path}; run `jsae vista train` first")
    module = check_projector(adapter)
    module.load_state_dict(load_file(str(path)))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta.get("vista", "{}"))


@torch.no_grad()
def recon_error_on_images(model: Any, adapter: Any, saes: Mapping[int, Any], batches: Sequence[Any],
                          form: str = "normalised") -> dict[int, float]:
    """Mean SAE error on image tokens, per layer, over ``batches`` (no grad): normalised (‖e‖²/‖h‖²) or, with
    ``form="mse"``, the raw MSE the paper's loss minimises."""
    tot: dict[int, float] = {layer: 0.0 for layer in saes}
    ce_tot, n = 0.0, 0
    for enc in batches:
        ce, errs = vista_losses(model, adapter, saes, enc, form)
        for layer, e in errs.items():
            tot[layer] += float(e)
        ce_tot += float(ce)
        n += 1
    out = {layer: v / max(n, 1) for layer, v in tot.items()}
    out["ce"] = ce_tot / max(n, 1)  # type: ignore[index]
    return out


# ---- text SAE from plain-text captions ----------------------------------------------------------


@torch.no_grad()
def collect_text_states(model: Any, processor: Any, adapter: Any, captions: Sequence[str], layers: Sequence[int],
                        batch_size: int = 128, progress: bool = True) -> tuple[dict[int, Tensor], Tensor, list[int]]:
    """Per-token states of plain-text captions (no image) at ``layers``: ({layer: [n_tokens, d]},
    caption index of each token [n_tokens], token ids).  BOS and padding are left out."""
    from jsae.adapters import padding_side

    model, processor, adapter = as_vlm(model, processor, adapter)
    tok = getattr(processor, "tokenizer", processor)
    special = set(getattr(tok, "all_special_ids", []))
    out: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    owners, ids_all = [], []
    for i in tqdm(range(0, len(captions), batch_size), desc="text states", disable=not progress):
        chunk = list(captions[i:i + batch_size])
        with padding_side(processor, "right"):
            enc = tok(chunk, return_tensors="pt", padding=True)
        keep = enc["attention_mask"].bool()
        for t in special:
            keep &= enc["input_ids"] != t
        got = states_at(model, adapter, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, layers, keep)
        for layer in layers:
            out[layer].append(got[layer])
        owners.append((torch.arange(len(chunk))[:, None].expand_as(keep)[keep] + i))
        ids_all += enc["input_ids"][keep].tolist()
    return {layer: torch.cat(v) for layer, v in out.items()}, torch.cat(owners), ids_all


def train_text_sae(states: Float[Tensor, "n d"], *, hook_name: str, model_name: str, d_sae: int = 256, k: int = 16,
                   steps: int = 3000, batch_size: int = 512, lr: float = 3e-4, seed: int = 0,
                   progress: bool = True) -> Any:
    """A SAELens TopK SAE on per-token text states, by SAELens's own ``SAETrainer`` (normalised to mean
    norm √d_in during training and folded back, so it applies to raw states)."""
    from jsae.training.recipes import train_saelens_topk

    trained = train_saelens_topk(states, d_sae, k, steps, batch_size, lr, seed)
    trained.cfg.metadata.hook_name = hook_name
    trained.cfg.metadata.model_name = model_name
    trained.cfg.metadata.prepend_bos = True
    trained.cfg.metadata.dataset_path = "jsae.world captions (plain text)"
    return trained.eval()


def save_sae(sae: Any, directory: str | Path) -> Path:
    """An inference SAE folder (``cfg.json`` + ``sae_weights.safetensors``) written atomically via a temp dir."""
    import shutil

    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if hasattr(sae, "save_inference_model"):
        sae.save_inference_model(str(tmp))
    else:
        sae.save_model(str(tmp))
    if directory.exists():
        shutil.rmtree(directory)
    tmp.replace(directory)
    return directory


__all__ = [
    "LOSS_FORMS", "VistaConfig", "check_projector", "check_text_sae", "collect_text_states", "load_projector",
    "load_text_sae", "recon_error_on_images", "reinit_projector", "sae_recon_error", "save_projector", "save_sae",
    "train_projector", "train_text_sae", "vista_losses",
]
