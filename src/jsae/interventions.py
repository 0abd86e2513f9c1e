"""Interventions on a VLM's residual stream at decoder layer ``L``, during a forward or ``generate``.

An intervention is a value object: ``layer``, ``positions``, the operation (its class: :class:`Steer`
adds ``strength · direction``; :class:`Clamp` sets SAE features to ``strength``; :class:`Ablate` sets
them to 0), and ``timing`` (``"prefill"``: only the forward over the prompt; ``"every_step"``: the
prompt and every generated token).  Positions:

* ``"image"``: the image tokens; ``"text"``: the caption / user-text tokens (``adapter.caption_token_mask``);
  both exist only in the prompt, so they are edited at the prefill step;
* ``"generated"``: the generated tokens (the decode steps; nothing at prefill);
* ``"all"``: every non-padding prompt token and every generated token;
* :class:`Patches`: a subset of the image tokens by patch-grid cell (``adapter.patch_grid``).

SAE edits replace the state ``x`` by ``decode(z') + (x - decode(z))`` with ``z = encode(x)`` and ``z'``
the edited codes, computed as ``x + (decode(z') - decode(z))`` so positions whose codes do not change
keep ``x`` bit for bit.  A JSAE is applied through its ``"vision"`` branch on image/patch positions and
its ``"text"`` branch otherwise (override with ``modality=``).

One mechanism applies them all: :func:`intervene` registers one plain torch forward hook per edited
decoder layer (the hook returns a new tensor; nothing is edited in place) and removes the hooks in a
``finally``, so after an exception the model computes exactly what it computed before.  Plain hooks
rather than an nnsight ``edit``: both give identical results (checked in the tests), but a hook adds
no per-step tracing cost to ``generate`` (measured in ``benchmarks/steer_overhead.py``).  Inside your
own nnsight trace, use :meth:`Intervention.apply` on ``layers[L].output`` directly.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from beartype import beartype
from jaxtyping import Bool, Float, jaxtyped
from torch import Tensor

from jsae.adapters import VLMAdapter, for_model, unwrap
from jsae.adapters.base import GRID_COL, GRID_IMAGE, GRID_REGION, GRID_ROW

POSITION_NAMES = ("image", "text", "generated", "all")
TIMINGS = ("prefill", "every_step")
Timing = Literal["prefill", "every_step"]


@dataclass(frozen=True)
class Patches:
    """Image tokens at grid cells ``cells`` (``(row, col)`` pairs) of image ``image`` of each prompt
    (``None``: every image) in ``region`` (0: the base grid; LLaVA-NeXT's high-resolution grid is 1)."""

    cells: tuple[tuple[int, int], ...]
    image: int | None = 0
    region: int = 0

    def __post_init__(self) -> None:
        cells = tuple((int(r), int(c)) for r, c in self.cells)
        if not cells:
            raise ValueError("Patches needs at least one (row, col) cell")
        object.__setattr__(self, "cells", cells)

    def mask(self, grid: Tensor) -> Tensor:
        """``[B, S]`` mask of the selected cells; raises when a cell lies outside an image's grid."""
        sel = (grid[..., GRID_IMAGE] >= 0) & (grid[..., GRID_REGION] == self.region)
        if self.image is not None:
            sel &= grid[..., GRID_IMAGE] == self.image
        for b in range(grid.shape[0]):
            g = grid[b][sel[b]]
            if g.numel() == 0:
                raise ValueError(f"prompt {b} has no image {self.image} with grid region {self.region}; "
                                 "check Patches(image=..., region=...) against adapter.patch_grid(inputs)")
            rows, cols = int(g[:, GRID_ROW].max()) + 1, int(g[:, GRID_COL].max()) + 1
            for r, c in self.cells:
                if not (0 <= r < rows and 0 <= c < cols):
                    raise ValueError(f"patch ({r}, {c}) is outside the {rows}×{cols} grid of prompt {b}'s image; "
                                     f"use rows 0..{rows - 1} and cols 0..{cols - 1}")
        want = torch.zeros_like(sel)
        for r, c in self.cells:
            want |= (grid[..., GRID_ROW] == r) & (grid[..., GRID_COL] == c)
        return sel & want


Positions = Literal["image", "text", "generated", "all"] | Patches


@dataclass(frozen=True, eq=False)
class Intervention:
    """Base value object: ``layer``, ``positions``, ``timing``; subclasses define :meth:`edit`."""

    layer: int
    positions: Any = "all"
    timing: Timing = "every_step"

    def __post_init__(self) -> None:
        if not isinstance(self.positions, Patches) and self.positions not in POSITION_NAMES:
            raise ValueError(f"unknown positions {self.positions!r}; use one of {list(POSITION_NAMES)} or jsae.Patches(...)")
        if self.timing not in TIMINGS:
            raise ValueError(f"unknown timing {self.timing!r}; use 'prefill' or 'every_step'")
        if self.positions == "generated" and self.timing == "prefill":
            raise ValueError("positions='generated' has nothing to edit at the prefill step; use timing='every_step'")

    @property
    def operation(self) -> str:
        return type(self).__name__.lower()

    @property
    def modality(self) -> str:
        return "vision" if self.positions == "image" or isinstance(self.positions, Patches) else "text"

    def validate(self, adapter: VLMAdapter) -> None:
        """One-line errors for an intervention that does not fit ``adapter``'s model."""
        adapter.check_layer(self.layer)

    def edit(self, x: Tensor) -> Tensor:
        """The edited states of the selected positions ``x`` (``[n, d_in]``)."""
        raise NotImplementedError

    @jaxtyped(typechecker=beartype)
    def apply(self, hidden: Float[Tensor, "batch seq d"], mask: Bool[Tensor, "batch seq"]) -> Float[Tensor, "batch seq d"]:
        """``hidden`` with :meth:`edit` applied at ``mask`` (out of place; other positions untouched)."""
        mask = mask.to(hidden.device)
        if not bool(mask.any()):
            return hidden
        return hidden.index_put((mask,), self.edit(hidden[mask]).to(hidden.dtype))


@dataclass(frozen=True, eq=False)
class Steer(Intervention):
    """Add ``strength · direction`` (``[d_in]``) at the positions."""

    direction: Tensor = field(default=None)  # type: ignore[assignment]
    strength: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.direction, Tensor) or self.direction.dim() != 1:
            raise ValueError("Steer needs direction=, a 1-D tensor of size d_in")

    def validate(self, adapter: VLMAdapter) -> None:
        super().validate(adapter)
        if self.direction.shape[0] != adapter.d_in:
            raise ValueError(f"direction has size {self.direction.shape[0]} but the model's hidden size is {adapter.d_in}; "
                             "pass a d_in-sized direction (e.g. a row of the SAE's W_dec)")

    def edit(self, x: Tensor) -> Tensor:
        return x + self.strength * self.direction.to(x.device, x.dtype)


@dataclass(frozen=True, eq=False)
class Clamp(Intervention):
    """Set SAE features ``features`` to ``strength`` at the positions, keeping the reconstruction error."""

    sae: Any = None
    features: Sequence[int] = ()
    strength: float = 0.0
    sae_modality: str | None = None  # JSAE branch; default: "vision" on image/patch positions, else "text"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sae is None or not hasattr(self.sae, "encode") or not hasattr(self.sae, "decode"):
            raise ValueError(f"{type(self).__name__} needs sae=, an SAE with encode/decode (SAELens SAE or jsae.JointSAE)")
        feats = (self.features,) if isinstance(self.features, int) else tuple(int(f) for f in self.features)
        if not feats:
            raise ValueError(f"{type(self).__name__} needs at least one feature index")
        object.__setattr__(self, "features", feats)

    def validate(self, adapter: VLMAdapter) -> None:
        super().validate(adapter)
        d_in, d_sae = int(self.sae.cfg.d_in), int(self.sae.cfg.d_sae)
        if d_in != adapter.d_in:
            raise ValueError(f"the SAE has d_in={d_in} but the model's hidden size is {adapter.d_in}; "
                             "use an SAE trained on this model's residual stream")
        bad = [f for f in self.features if not 0 <= f < d_sae]
        if bad:
            raise ValueError(f"feature index {bad[0]} is out of range: the SAE has features 0..{d_sae - 1}")

    def _kw(self) -> dict[str, Any]:
        if hasattr(self.sae, "W_dec_of"):  # a JointSAE: pick its branch
            return {"modality": self.sae_modality or self.modality}
        return {}

    def _codes(self, z: Tensor) -> Tensor:
        z = z.clone()
        z[:, list(self.features)] = self.strength
        return z

    def edit(self, x: Tensor) -> Tensor:
        sae, kw = self.sae, self._kw()
        xs = x.to(getattr(sae, "device", x.device), getattr(sae, "dtype", x.dtype))
        z = sae.encode(xs, **kw)
        delta = sae.decode(self._codes(z), **kw) - sae.decode(z, **kw)
        return x + delta.to(x.device, x.dtype)


@dataclass(frozen=True, eq=False)
class Ablate(Clamp):
    """Set SAE features ``features`` to 0 at the positions, keeping the reconstruction error."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "strength", 0.0)
        super().__post_init__()


# ================================================================================================
# The mechanism
# ================================================================================================


def _prefill_mask(iv: Intervention, adapter: VLMAdapter, inputs: Mapping[str, Any], cache: dict[str, Tensor]) -> Tensor:
    pos = iv.positions
    key = pos if isinstance(pos, str) else repr(pos)
    if key in cache:
        return cache[key]
    ids = adapter._ids(inputs)
    if pos == "image":
        m = adapter.image_token_mask(inputs)
    elif pos == "text":
        m = adapter.caption_token_mask(inputs)
    elif pos == "all":
        m = adapter._attention(inputs)
    elif pos == "generated":
        m = torch.zeros_like(ids, dtype=torch.bool)
    else:
        m = pos.mask(adapter.patch_grid(inputs))
    if pos in ("image", "text") or isinstance(pos, Patches):
        empty = (~m.any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"prompt {empty[0]} has no {pos if isinstance(pos, str) else 'selected patch'} tokens "
                             f"to intervene on; check the prompt (adapter.build_inputs puts image and caption tokens in)")
    cache[key] = m
    return m


def _check_interventions(interventions: Any) -> list[Intervention]:
    ivs = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    for iv in ivs:
        if not isinstance(iv, Intervention):
            raise TypeError(f"interventions must be jsae Intervention objects (Steer, Clamp, Ablate), got {type(iv).__name__}")
    return ivs


@contextlib.contextmanager
def intervene(model: Any, interventions: Intervention | Sequence[Intervention], inputs: Mapping[str, Any],
              adapter: VLMAdapter | None = None) -> Iterator[dict[int, int]]:
    """Apply ``interventions`` to every forward of ``model`` inside the block, for prompts ``inputs``.

    The first forward of each edited layer is the prefill (prompt) step; each later forward is one
    generated token (``[B, 1, d]`` with the KV cache, as ``generate`` runs).  Yields the per-layer step
    counters.  Hooks are removed on exit, whatever happens inside.
    """
    adapter = adapter or for_model(model)
    ivs = _check_interventions(interventions)
    if adapter.remote and ivs:
        raise NotImplementedError("jsae interventions run as local forward hooks; on a remote (NDIF) model write the "
                                  "edit inside your own model.trace(..., remote=True) with Intervention.apply")
    adapter.check_inputs(inputs)
    cache: dict[str, Tensor] = {}
    masks = []
    for iv in ivs:
        iv.validate(adapter)
        masks.append(_prefill_mask(iv, adapter, inputs, cache))
    by_layer: dict[int, list[tuple[Intervention, Tensor]]] = {}
    for iv, m in zip(ivs, masks):
        by_layer.setdefault(iv.layer, []).append((iv, m))
    steps = {L: 0 for L in by_layer}
    handles = []

    def make_hook(layer: int, items: list[tuple[Intervention, Tensor]]) -> Any:
        def hook(module: Any, args: Any, output: Any) -> Any:
            hidden = output[0] if isinstance(output, tuple) else output  # tuple: transformers < 4.54 layers
            step = steps[layer]
            steps[layer] = step + 1
            for iv, prefill_mask in items:
                if step == 0:
                    mask = prefill_mask
                elif iv.timing == "prefill" or iv.positions not in ("generated", "all"):
                    continue
                else:
                    mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
                if mask.shape != hidden.shape[:2]:
                    raise RuntimeError(f"layer {layer} output has shape {tuple(hidden.shape)} but the prompt mask is "
                                       f"{tuple(mask.shape)}; run the model on the inputs given to intervene()")
                hidden = iv.apply(hidden, mask)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    try:
        for layer, items in by_layer.items():
            handles.append(adapter.layer_module(layer).register_forward_hook(make_hook(layer, items)))
        yield steps
    finally:
        for h in handles:
            h.remove()


# ================================================================================================
# generate
# ================================================================================================


def _tokenizer(model: Any, processor: Any) -> Any:
    for src in (processor, getattr(model, "processor", None), getattr(model, "tokenizer", None)):
        if src is not None:
            return getattr(src, "tokenizer", src)
    raise ValueError("generate needs a tokenizer to decode: pass processor= (jsae.load_vlm returns it)")


def generate(model: Any, inputs: Mapping[str, Any], interventions: Intervention | Sequence[Intervention] = (), *,
             max_new_tokens: int = 20, do_sample: bool = False, processor: Any = None,
             adapter: VLMAdapter | None = None, return_ids: bool = False, **generate_kwargs: Any) -> Any:
    """Generate from ``inputs`` (``adapter.build_inputs(..., add_generation_prompt=True)`` or a processor
    encoding) with ``interventions`` applied; returns the decoded new text of each prompt (or the new
    token ids ``[B, n]`` with ``return_ids=True``)."""
    adapter = adapter or for_model(model)
    if adapter.remote:
        raise NotImplementedError("jsae.generate runs locally; on a remote (NDIF) model use model.generate(..., remote=True) "
                                  "and write edits with Intervention.apply inside it")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    hf = unwrap(model)
    kwargs = adapter.model_kwargs(inputs)
    device = next(hf.parameters()).device
    kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
    tok = None if return_ids else _tokenizer(model, processor)
    pad = getattr(tok, "pad_token_id", None)
    if pad is not None:
        generate_kwargs.setdefault("pad_token_id", pad)
    with torch.no_grad(), intervene(model, interventions, inputs, adapter):
        out = hf.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
    new = out[:, kwargs["input_ids"].shape[1]:]
    return new if return_ids else tok.batch_decode(new, skip_special_tokens=True)
