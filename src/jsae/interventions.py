"""Interventions on a VLM's residual stream at decoder layer ``L``, during a forward or ``generate``.

An intervention is a value object: ``layer``, ``positions``, the operation (its class: :class:`Steer`
adds ``strength · direction``; :class:`Clamp` sets SAE features to ``strength``; :class:`Ablate` sets
them to 0), and ``timing`` (``"prefill"``: only the forward over the prompt; ``"every_step"``: the
prompt and every generated token).  Positions:

* ``"image"``: the image tokens; ``"text"``: the caption / user-text tokens (``adapter.caption_token_mask``);
  ``"image_but_last"``: the image tokens except the last one of each prompt; ``"last"``: the last prompt
  token (the one that predicts the first generated token); all exist only in the prompt, so they are
  edited at the prefill step;
* ``"generated"``: the generated tokens (the decode steps; nothing at prefill);
* ``"all"``: every non-padding prompt token and every generated token;
* :class:`Patches`: a subset of the image tokens by patch-grid cell (``adapter.patch_grid``), the same
  cells in every prompt or each prompt its own (:meth:`Patches.per_prompt`).

:class:`Clamp` and :class:`Ablate` take one feature list for every prompt, or one list per prompt
(with one strength per feature), so a batch of images can each get their own patch-local edit.
:class:`Splice` replaces the states by the SAE's reconstruction (SAELens's splice, no error term).

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
import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from jsae.activations import last_position_mask, layer_output, model_device, to_model_kwargs, with_layer_output
from jsae.adapters import VLMAdapter, for_model, padding_side, unwrap
from jsae.adapters.base import GRID_COL, GRID_IMAGE, GRID_REGION, GRID_ROW
from jsae.guards import shape_checked

POSITION_NAMES = ("image", "text", "generated", "all", "image_but_last", "last")
TIMINGS = ("prefill", "every_step")
Timing = Literal["prefill", "every_step"]


@dataclass(frozen=True)
class Patches:
    """Image tokens at grid cells ``cells`` (``(row, col)`` pairs) of image ``image`` of each prompt
    (``None``: every image) in ``region`` (0: the base grid; LLaVA-NeXT's high-resolution grid is 1)."""

    cells: tuple[tuple[int, int], ...]
    image: int | None = 0
    region: int = 0
    prompt_cells: tuple[tuple[tuple[int, int], ...], ...] | None = None  # per prompt (see per_prompt)

    def __post_init__(self) -> None:
        cells = tuple((int(r), int(c)) for r, c in self.cells)
        if not cells and self.prompt_cells is None:
            raise ValueError("Patches needs at least one (row, col) cell")
        object.__setattr__(self, "cells", cells)
        if self.prompt_cells is not None:
            per = tuple(tuple((int(r), int(c)) for r, c in cs) for cs in self.prompt_cells)
            if not per or any(not cs for cs in per):
                raise ValueError("Patches.per_prompt needs at least one (row, col) cell for every prompt")
            object.__setattr__(self, "prompt_cells", per)

    @classmethod
    def per_prompt(cls, cells: Sequence[Sequence[tuple[int, int]]], image: int | None = 0, region: int = 0) -> "Patches":
        """Each prompt ``b`` of the batch edited at its own cells ``cells[b]``."""
        return cls((), image, region, tuple(tuple(c) for c in cells))

    def cells_of(self, b: int) -> tuple[tuple[int, int], ...]:
        return self.cells if self.prompt_cells is None else self.prompt_cells[b]

    def mask(self, grid: Tensor) -> Tensor:
        """``[B, S]`` mask of the selected cells; raises when a cell lies outside an image's grid."""
        sel = (grid[..., GRID_IMAGE] >= 0) & (grid[..., GRID_REGION] == self.region)
        if self.image is not None:
            sel &= grid[..., GRID_IMAGE] == self.image
        if self.prompt_cells is not None and len(self.prompt_cells) != grid.shape[0]:
            raise ValueError(f"Patches.per_prompt has cells for {len(self.prompt_cells)} prompts but the batch has {grid.shape[0]}")
        for b in range(grid.shape[0]):
            g = grid[b][sel[b]]
            if g.numel() == 0:
                raise ValueError(f"prompt {b} has no image {self.image} with grid region {self.region}; "
                                 "check Patches(image=..., region=...) against adapter.patch_grid(inputs)")
            rows, cols = int(g[:, GRID_ROW].max()) + 1, int(g[:, GRID_COL].max()) + 1
            for r, c in self.cells_of(b):
                if not (0 <= r < rows and 0 <= c < cols):
                    raise ValueError(f"patch ({r}, {c}) is outside the {rows}×{cols} grid of prompt {b}'s image; "
                                     f"use rows 0..{rows - 1} and cols 0..{cols - 1}")
        want = torch.zeros_like(sel)
        for b in range(grid.shape[0]):
            for r, c in self.cells_of(b):
                want[b] |= (grid[b, :, GRID_ROW] == r) & (grid[b, :, GRID_COL] == c)
        return sel & want


Positions = Literal["image", "text", "generated", "all", "image_but_last", "last"] | Patches


@dataclass(frozen=True, eq=False)
class Intervention:
    """Base value object: ``layer``, ``positions``, ``timing``; subclasses define :meth:`edit`."""

    layer: int
    positions: Positions = "all"
    timing: Timing = "every_step"

    def __post_init__(self) -> None:
        if not isinstance(self.positions, Patches) and self.positions not in POSITION_NAMES:
            raise ValueError(f"unknown positions {self.positions!r}; use one of {list(POSITION_NAMES)} or jsae.Patches(...)")
        if self.timing not in TIMINGS:
            raise ValueError(f"unknown timing {self.timing!r}; use 'prefill' or 'every_step'")
        if self.positions == "generated" and self.timing == "prefill":
            raise ValueError("positions='generated' has nothing to edit at the prefill step; use timing='every_step'")

    @property
    def modality(self) -> str:
        return "vision" if self.positions in ("image", "image_but_last") or isinstance(self.positions, Patches) else "text"

    def validate(self, adapter: VLMAdapter) -> None:
        """One-line errors for an intervention that does not fit ``adapter``'s model."""
        adapter.check_layer(self.layer)

    def edit(self, x: Tensor, rows: Tensor) -> Tensor:
        """The edited states of the selected positions ``x`` (``[n, d_in]``); ``rows[i]`` is the prompt of
        position ``i`` (for per-prompt edits)."""
        raise NotImplementedError

    @property
    def edits_prompt(self) -> bool:
        """Whether it edits the prompt's states (every position set but ``"generated"``)."""
        return self.positions != "generated"

    def prompt_key(self, b: int) -> Any:
        """A value equal for two prompts of a batch exactly when this edits their prompts' states alike (then, the
        prompts being the same, their prefills are the same and :func:`generate` runs it once); ``None``: unknown."""
        return None

    @shape_checked
    def apply(self, hidden: Float[Tensor, "batch seq d"], mask: Bool[Tensor, "batch seq"],
              prompts: Tensor | None = None) -> Float[Tensor, "batch seq d"]:
        """``hidden`` with :meth:`edit` applied at ``mask`` (out of place; other positions untouched).  ``prompts[b]``:
        the prompt that row ``b`` of ``hidden`` continues, where a generation has dropped the prompts whose
        captions ended (per-prompt values are those prompts'); default: row ``b`` is prompt ``b``."""
        mask = mask.to(hidden.device)
        if not bool(mask.any()):
            return hidden
        rows = mask.nonzero()[:, 0]
        if prompts is not None:
            rows = prompts.to(rows.device)[rows]
        return hidden.index_put((mask,), self.edit(hidden[mask], rows).to(hidden.dtype))


def _per_row(value: Tensor, rows: Tensor, x: Tensor) -> Tensor:
    """``value`` (one row per prompt) gathered for the selected positions' prompts ``rows``."""
    if rows.numel() and int(rows.max()) >= value.shape[0]:
        raise ValueError(f"per-prompt values are given for {value.shape[0]} prompts but the batch has more")
    return value.to(x.device, x.dtype)[rows.to(x.device)]


@dataclass(frozen=True, eq=False)
class Steer(Intervention):
    """Add ``strength · direction`` at the positions.  ``direction`` is ``[d_in]`` (every prompt) or
    ``[batch, d_in]`` (one per prompt); ``strength`` is a number or one per prompt (a sequence or 1-D
    tensor), so one batch can hold many (direction, strength) cells of a dose–response grid."""

    direction: Tensor = field(default=None)  # type: ignore[assignment]
    strength: Any = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.direction, Tensor) or self.direction.dim() not in (1, 2):
            raise ValueError("Steer needs direction=, a tensor of size d_in (or [batch, d_in], one per prompt)")
        if not bool(torch.isfinite(self.direction).all()) or not bool(torch.isfinite(torch.as_tensor(self.strength)).all()):
            raise ValueError("Steer's direction and strength must be finite numbers (got NaN or inf)")
        if not isinstance(self.strength, (int, float)):
            st = torch.as_tensor(self.strength, dtype=torch.float32).flatten()
            if self.direction.dim() == 2 and st.numel() != self.direction.shape[0]:
                raise ValueError(f"{st.numel()} strengths for {self.direction.shape[0]} per-prompt directions; give one each")
            object.__setattr__(self, "strength", st)

    def validate(self, adapter: VLMAdapter) -> None:
        super().validate(adapter)
        if self.direction.shape[-1] != adapter.d_in:
            raise ValueError(f"direction has size {self.direction.shape[-1]} but the model's hidden size is {adapter.d_in}; "
                             "pass a d_in-sized direction (e.g. a row of the SAE's W_dec)")

    def edit(self, x: Tensor, rows: Tensor) -> Tensor:
        d = self.direction.to(x.device, x.dtype) if self.direction.dim() == 1 else _per_row(self.direction, rows, x)
        if isinstance(self.strength, Tensor):
            return x + _per_row(self.strength, rows, x)[:, None] * d
        return x + self.strength * d

    def prompt_key(self, b: int) -> Any:
        strength = float(self.strength[b]) if isinstance(self.strength, Tensor) else float(self.strength)
        if strength == 0.0:
            return "unchanged"  # x + 0 · d is x
        d = self.direction if self.direction.dim() == 1 else self.direction[b]
        return strength, d.detach().cpu().numpy().tobytes()


@dataclass(frozen=True, eq=False)
class ProjectOut(Intervention):
    """Remove the component along ``direction`` (``[d_in]`` or one per prompt ``[batch, d_in]``) at the
    positions: ``x − (x·u) u`` with ``u`` the unit direction (directional ablation)."""

    direction: Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.direction, Tensor) or self.direction.dim() not in (1, 2):
            raise ValueError("ProjectOut needs direction=, a tensor of size d_in (or [batch, d_in], one per prompt)")
        if not bool(torch.isfinite(self.direction).all()):
            raise ValueError("ProjectOut's direction must be finite numbers (got NaN or inf)")
        if not bool((self.direction.norm(dim=-1) > 0).all()):
            raise ValueError("ProjectOut needs a non-zero direction")

    def validate(self, adapter: VLMAdapter) -> None:
        super().validate(adapter)
        if self.direction.shape[-1] != adapter.d_in:
            raise ValueError(f"direction has size {self.direction.shape[-1]} but the model's hidden size is {adapter.d_in}")

    def edit(self, x: Tensor, rows: Tensor) -> Tensor:
        d = self.direction.to(x.device, x.dtype) if self.direction.dim() == 1 else _per_row(self.direction, rows, x)
        u = d / d.norm(dim=-1, keepdim=True)
        return x - (x * u).sum(-1, keepdim=True) * u


def check_sae_site(sae: Any, layer: int, adapter: VLMAdapter, what: str = "the intervention", fix: str | None = None,
                   also_models: Sequence[str] = ()) -> None:
    """One-line :class:`~jsae.provenance.ProvenanceError` when ``sae`` was trained at another layer, hook or model
    than ``adapter``'s layer ``layer``, or for another width (judged from its ``cfg.metadata`` and ``d_in``; unknown
    fields are not checked).  The one check of every path that applies an SAE to a model: the interventions, ``jsae
    sae steer``, ``jsae look``, the demo's reuse of a run and VISTA's text SAEs; ``fix`` replaces the default advice;
    ``also_models`` are other names of the same weights (VISTA: the VLM's language model, whose text SAEs apply)."""
    from jsae.vlm import model_name
    from jsae.provenance import check_same, sae_record

    from jsae.adapters import layer_of_hook

    found = {k: v for k, v in sae_record(sae).items() if k in ("model", "model_class", "layer", "hook_name", "d_in")}
    here = {"model": model_name(adapter), "model_class": type(adapter.hf_model).__name__, "layer": layer,
            "hook_name": adapter.hook_name(layer), "d_in": adapter.d_in}
    if found.get("hook_name") not in (None, here["hook_name"]) and layer_of_hook(found["hook_name"]) == layer:
        found.pop("hook_name")  # another naming of the same residual stream (blocks.L.hook_resid_post, ...)
    from jsae.provenance import same_model

    if "model" in found and any(n and same_model(found["model"], n) for n in also_models):
        found.pop("model")
    check_same(found, here, f"the SAE of this {what}", f"layer {layer} of {here['model']}",
               fix or f"use the SAE trained there (metadata: layer {found.get('layer')}, model {found.get('model')}), "
               "or pass allow_other_site=True")


@dataclass(frozen=True, eq=False)
class Clamp(Intervention):
    """Set SAE features ``features`` to ``strength`` at the positions, keeping the reconstruction error."""

    sae: Any = None
    features: Any = ()  # feature indices, or one list per prompt
    strength: Any = 0.0  # one value, one per feature, or (per-prompt features) one list per prompt
    sae_modality: str | None = None  # JSAE branch; default: "vision" on image/patch positions, else "text"
    allow_other_site: bool = False  # apply an SAE trained at another layer / hook / model anyway

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sae is None or not hasattr(self.sae, "encode") or not hasattr(self.sae, "decode"):
            raise ValueError(f"{type(self).__name__} needs sae=, an SAE with encode/decode (SAELens SAE or jsae.JointSAE)")
        flat = [self.strength] if isinstance(self.strength, (int, float)) else \
            [v for vs in self.strength for v in (vs if isinstance(vs, (list, tuple)) else [vs])]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in flat):
            raise ValueError(f"{type(self).__name__}'s strength must be finite numbers, got {self.strength!r}")
        per_prompt = not isinstance(self.features, int) and any(not isinstance(f, int) for f in self.features)
        if per_prompt:
            feats: Any = tuple(tuple(int(f) for f in fs) for fs in self.features)
            strength = self.strength if not isinstance(self.strength, (int, float)) else [[self.strength] * len(fs) for fs in feats]
            strength = tuple(tuple(float(v) for v in vs) for vs in strength)
            if len(strength) != len(feats) or any(len(v) != len(f) for v, f in zip(strength, feats)):
                raise ValueError("per-prompt features need one strength per feature of each prompt")
            if not feats:
                raise ValueError(f"{type(self).__name__} needs at least one prompt's features")
        else:
            feats = (self.features,) if isinstance(self.features, int) else tuple(int(f) for f in self.features)
            if not feats:
                raise ValueError(f"{type(self).__name__} needs at least one feature index")
            strength = float(self.strength) if isinstance(self.strength, (int, float)) else tuple(float(v) for v in self.strength)
            if isinstance(strength, tuple) and len(strength) != len(feats):
                raise ValueError(f"{len(strength)} strengths for {len(feats)} features; give one value or one per feature")
        object.__setattr__(self, "features", feats)
        object.__setattr__(self, "strength", strength)

    @property
    def per_prompt(self) -> bool:
        return bool(self.features) and isinstance(self.features[0], tuple)

    def _all_features(self) -> list[int]:
        return [f for fs in self.features for f in fs] if self.per_prompt else list(self.features)

    def validate(self, adapter: VLMAdapter) -> None:
        super().validate(adapter)
        d_in, d_sae = int(self.sae.cfg.d_in), int(self.sae.cfg.d_sae)
        if d_in != adapter.d_in:
            raise ValueError(f"the SAE has d_in={d_in} but the model's hidden size is {adapter.d_in}; "
                             "use an SAE trained on this model's residual stream")
        bad = [f for f in self._all_features() if not 0 <= f < d_sae]
        if bad:
            raise ValueError(f"feature index {bad[0]} is out of range: the SAE has features 0..{d_sae - 1}")
        if not self.allow_other_site:
            check_sae_site(self.sae, self.layer, adapter, type(self).__name__)

    def _kw(self) -> dict[str, Any]:
        if hasattr(self.sae, "W_dec_of"):  # a JointSAE: pick its branch
            return {"modality": self.sae_modality or self.modality}
        return {}

    def _codes(self, z: Tensor, rows: Tensor) -> Tensor:
        if not self.per_prompt:
            z = z.clone()
            z[:, list(self.features)] = torch.as_tensor(self.strength, dtype=z.dtype, device=z.device)
            return z
        n_prompts = len(self.features)
        if rows.numel() and int(rows.max()) >= n_prompts:
            raise ValueError(f"per-prompt features are given for {n_prompts} prompts but the batch has more")
        sel = torch.zeros(n_prompts, z.shape[-1], dtype=torch.bool)
        val = torch.zeros(n_prompts, z.shape[-1], dtype=z.dtype)
        for b, (fs, vs) in enumerate(zip(self.features, self.strength)):
            sel[b, list(fs)] = True
            val[b, list(fs)] = torch.tensor(vs, dtype=z.dtype)
        r = rows.cpu()
        return torch.where(sel[r].to(z.device), val[r].to(z.device), z)

    def edit(self, x: Tensor, rows: Tensor) -> Tensor:
        sae, kw = self.sae, self._kw()
        xs = x.to(getattr(sae, "device", x.device), getattr(sae, "dtype", x.dtype))
        z = sae.encode(xs, **kw)
        delta = sae.decode(self._codes(z, rows), **kw) - sae.decode(z, **kw)
        return x + delta.to(x.device, x.dtype)


@dataclass(frozen=True, eq=False)
class Ablate(Clamp):
    """Set SAE features ``features`` to 0 at the positions, keeping the reconstruction error."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "strength", 0.0)
        super().__post_init__()


@dataclass(frozen=True, eq=False)
class ZeroAblate(Intervention):
    """Set the states at the positions to zero (zero ablation of the residual stream)."""

    def edit(self, x: Tensor, rows: Tensor) -> Tensor:
        return torch.zeros_like(x)


@dataclass(frozen=True, eq=False)
class Splice(Intervention):
    """Replace the states at the positions by the SAE's reconstruction ``decode(encode(x))`` (SAELens's
    splice without the error term: what the model computes through the SAE alone)."""

    sae: Any = None
    sae_modality: str | None = None
    allow_other_site: bool = False  # apply an SAE trained at another layer / hook / model anyway

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sae is None or not hasattr(self.sae, "encode") or not hasattr(self.sae, "decode"):
            raise ValueError("Splice needs sae=, an SAE with encode/decode (SAELens SAE or jsae.JointSAE)")

    def validate(self, adapter: VLMAdapter) -> None:
        super().validate(adapter)
        if int(self.sae.cfg.d_in) != adapter.d_in:
            raise ValueError(f"the SAE has d_in={self.sae.cfg.d_in} but the model's hidden size is {adapter.d_in}; "
                             "use an SAE trained on this model's residual stream")
        if not self.allow_other_site:
            check_sae_site(self.sae, self.layer, adapter, "Splice")

    def edit(self, x: Tensor, rows: Tensor) -> Tensor:
        sae = self.sae
        kw = {"modality": self.sae_modality or self.modality} if hasattr(sae, "W_dec_of") else {}
        xs = x.to(getattr(sae, "device", x.device), getattr(sae, "dtype", x.dtype))
        return sae.decode(sae.encode(xs, **kw), **kw).to(x.device, x.dtype)


# ================================================================================================
# The mechanism
# ================================================================================================


def _prefill_mask(iv: Intervention, adapter: VLMAdapter, inputs: Mapping[str, Any], cache: dict[str, Tensor]) -> Tensor:
    pos = iv.positions
    key = pos if isinstance(pos, str) else repr(pos)
    if key in cache:
        return cache[key]
    ids = adapter.input_ids(inputs)
    if pos == "image":
        m = adapter.image_token_mask(inputs)
    elif pos == "text":
        m = adapter.caption_token_mask(inputs)
    elif pos == "all":
        m = adapter.attention_mask(inputs)
    elif pos == "generated":
        m = torch.zeros_like(ids, dtype=torch.bool)
    elif pos == "image_but_last":
        m = adapter.image_token_mask(inputs)
        m = m & ~last_position_mask(m)
    elif pos == "last":
        m = last_position_mask(adapter.attention_mask(inputs))
    else:
        m = pos.mask(adapter.patch_grid(inputs))
    if pos in ("image", "text", "image_but_last") or isinstance(pos, Patches):
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


@dataclass
class LivePrompts:
    """Which prompts the rows of a decode step continue (``None``: all of them, in order); set by a generation
    loop that drops the prompts whose captions have ended."""

    prompts: Tensor | None = None
    #: set by :func:`intervene`: its hook of each edited layer, and whether the hooks pass outputs through untouched
    #: (a forward over states that the loop then edits itself by calling the hook)
    hooks: dict[int, Any] = field(default_factory=dict)
    paused: bool = False


@contextlib.contextmanager
def intervene(model: Any, interventions: Intervention | Sequence[Intervention], inputs: Mapping[str, Any],
              adapter: VLMAdapter | None = None, live: LivePrompts | None = None) -> Iterator[dict[int, int]]:
    """Apply ``interventions`` to every forward of ``model`` inside the block, for prompts ``inputs``.

    The first forward of each edited layer is the prefill (prompt) step; each later forward is one
    generated token (``[B, 1, d]`` with the KV cache, as ``generate`` runs; with ``live``, the rows of a
    decode step are the prompts ``live.prompts``).  Yields the per-layer step counters.  Hooks are removed
    on exit, whatever happens inside.
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
            if live is not None and live.paused:
                return output
            hidden = layer_output(output)
            step = steps[layer]
            steps[layer] = step + 1
            # a forward over the whole prompt (the first, or another plain forward inside the block) has the
            # prompt's shape; a decode step (KV cache) has one position per prompt
            prefill = step == 0 or tuple(hidden.shape[:2]) == tuple(items[0][1].shape)
            prompts = None if live is None else live.prompts
            for iv, prefill_mask in items:
                if prefill:
                    mask = prefill_mask if prompts is None else prefill_mask[prompts.to(prefill_mask.device)]
                elif iv.timing == "prefill" or iv.positions not in ("generated", "all"):
                    continue
                else:
                    mask = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
                if mask.shape != hidden.shape[:2]:
                    raise RuntimeError(f"layer {layer} output has shape {tuple(hidden.shape)} but the prompt mask is "
                                       f"{tuple(mask.shape)}; run the model on the inputs given to intervene()")
                hidden = iv.apply(hidden, mask, prompts)
            return with_layer_output(output, hidden)

        return hook

    try:
        for layer, items in by_layer.items():
            fn = make_hook(layer, items)
            if live is not None:
                live.hooks[layer] = fn
            handles.append(adapter.layer_module(layer).register_forward_hook(fn))
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
             adapter: VLMAdapter | None = None, return_ids: bool = False, same_prompt: Sequence[Any] | None = None,
             **generate_kwargs: Any) -> Any:
    """Generate from ``inputs`` (``adapter.build_inputs(..., add_generation_prompt=True)`` or a processor
    encoding) with ``interventions`` applied; returns the decoded new text of each prompt (or the new
    token ids ``[B, n]`` with ``return_ids=True``).  ``same_prompt``: one key per prompt, equal keys for
    identical prompts (the same image and text), so that prompts whose edits of the prompt are alike too
    share one prefill (a dose-response batch: the same image unsteered, or steered only at generated
    tokens, in many rows)."""
    adapter = adapter or for_model(model)
    if adapter.remote:
        raise NotImplementedError("jsae.generate runs locally; on a remote (NDIF) model use model.generate(..., remote=True) "
                                  "and write edits with Intervention.apply inside it")
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    hf = unwrap(model)
    kwargs = to_model_kwargs(adapter, inputs, model_device(model))
    tok = None if return_ids else _tokenizer(model, processor)
    pad = getattr(tok, "pad_token_id", None)
    if pad is not None:
        generate_kwargs.setdefault("pad_token_id", pad)
    live = LivePrompts()
    with torch.no_grad(), intervene(model, interventions, inputs, adapter, live):
        positions = None if do_sample or set(generate_kwargs) - {"pad_token_id"} else \
            adapter.generation_position_ids(kwargs.get("attention_mask", torch.ones_like(kwargs["input_ids"])))
        if positions is not None and _plain_greedy(hf):
            ivs = _check_interventions(interventions)
            below = _shared_below(adapter, ivs, same_prompt, kwargs)
            new = _greedy(hf, kwargs, positions, max_new_tokens, generate_kwargs.get("pad_token_id"), live,
                          _shared_prefills(ivs, same_prompt, kwargs), below)
        else:
            new = hf.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=do_sample,
                              **generate_kwargs)[:, kwargs["input_ids"].shape[1]:]
    return new if return_ids else tok.batch_decode(new, skip_special_tokens=True)


#: the generation settings that would change greedy decoding (a logits processor, a constraint, beams), each with
#: its neutral values: where the model's generation config holds only these, greedy decoding is the argmax of the logits
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "num_beams": (None, 1), "num_return_sequences": (None, 1), "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0), "no_repeat_ngram_size": (None, 0), "bad_words_ids": (None,),
    "suppress_tokens": (None,), "begin_suppress_tokens": (None,), "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,), "min_length": (None, 0), "min_new_tokens": (None, 0), "sequence_bias": (None,),
    "renormalize_logits": (None, False), "guidance_scale": (None, 1.0), "exponential_decay_length_penalty": (None,),
    "stop_strings": (None,), "watermarking_config": (None,)}


def _plain_greedy(hf: Any) -> bool:
    """Whether greedy decoding of ``hf`` is the plain argmax of its logits (its generation config sets none of
    :data:`_NEUTRAL` away from neutral; a decoder-only model), so :func:`_greedy` gives what ``hf.generate`` gives."""
    gc = getattr(hf, "generation_config", None)
    if gc is None or getattr(hf.config, "is_encoder_decoder", False):
        return False
    value = lambda k: getattr(gc, k, None) or None if isinstance(getattr(gc, k, None), (list, tuple)) else getattr(gc, k, None)  # noqa: E731
    return all(value(k) in ok for k, ok in _NEUTRAL.items())


def _shared_prefills(ivs: list[Intervention], same_prompt: Sequence[Any] | None,
                     kwargs: Mapping[str, Any]) -> tuple[Tensor, Tensor] | None:
    """``(first, of_row)``: the prompts whose prefill is run (the first of each group of identical prompts with
    alike edits of the prompt) and, per prompt, the position in ``first`` of the one it shares; ``None`` when no two
    share or it cannot be told (an edit without :meth:`Intervention.prompt_key`, inputs not one row per prompt)."""
    if same_prompt is None:
        return None
    B = kwargs["input_ids"].shape[0]
    if len(same_prompt) != B or any(isinstance(v, Tensor) and (v.dim() == 0 or v.shape[0] != B) for v in kwargs.values()):
        return None
    edits = [iv for iv in ivs if iv.edits_prompt]
    groups: dict[Any, int] = {}
    first, of_row = [], []
    for b in range(B):
        key = [same_prompt[b]]
        for iv in edits:
            k = iv.prompt_key(b)
            if k is None:
                return None
            key.append(k)
        g = groups.setdefault(tuple(key), len(groups))
        if g == len(first):
            first.append(b)
        of_row.append(g)
    if len(first) == B:
        return None
    return torch.tensor(first), torch.tensor(of_row)


@dataclass(frozen=True)
class _Below:
    """The prefill's part below the first edited decoder layer ``layer``, shared by identical prompts: ``key[b]``
    numbers prompt ``b``'s group of identical prompts, ``run`` the decoder layers from ``layer`` up."""

    layer: int
    key: Tensor
    adapter: VLMAdapter


def _shared_below(adapter: VLMAdapter, ivs: list[Intervention], same_prompt: Sequence[Any] | None,
                  kwargs: Mapping[str, Any]) -> _Below | None:
    """The layers below the first edited one compute the same states for identical prompts whatever the edits: with
    ``same_prompt`` keys, an adapter whose decoder layers run in sequence (:attr:`VLMAdapter.sequential_layers`) and
    at least one edit, a :class:`_Below` for :func:`_greedy` to run them once per distinct prompt."""
    if same_prompt is None or not ivs or not adapter.sequential_layers:
        return None
    B = kwargs["input_ids"].shape[0]
    if len(same_prompt) != B or any(isinstance(v, Tensor) and (v.dim() == 0 or v.shape[0] != B) for v in kwargs.values()):
        return None
    groups: dict[Any, int] = {}
    key = torch.tensor([groups.setdefault(k, len(groups)) for k in same_prompt])
    return _Below(min(iv.layer for iv in ivs), key, adapter)


class _StopBelow(Exception):
    """Raised at the first edited layer's input to end the forward over the layers below it."""


def _prefill_from_below(hf: Any, first: dict[str, Any], below: _Below, rows: Tensor, live: LivePrompts,
                        extra: Mapping[str, Any]) -> tuple[Tensor, Any]:
    """The prefill of prompts ``rows`` (a forward of ``first``, the prompts ``rows`` of the batch) with the decoder
    layers below ``below.layer`` run once per distinct prompt: a forward of one prompt per group stops at that
    layer's input (its hidden states, its call's other arguments and the cache of the layers below), whose rows are
    gathered for ``rows``, then the layers from ``below.layer`` up run on them (with the interventions' hooks).
    Returns the logits of the last position and the cache, as the whole forward would."""
    device = rows.device
    key = below.key.to(device)[rows]
    reps: dict[int, int] = {}
    for i, k in enumerate(key.tolist()):
        reps.setdefault(k, i)
    distinct = torch.tensor(list(reps.values()), device=device)
    gather = torch.tensor([list(reps).index(k) for k in key.tolist()], device=device)
    seen: dict[str, Any] = {}

    def stop(module: Any, args: Any, kw: Any) -> None:
        seen["args"], seen["kw"] = args, kw
        raise _StopBelow

    adapter = below.adapter
    handle = adapter.layer_module(below.layer).register_forward_pre_hook(stop, with_kwargs=True)
    try:
        hf(**{k: v[distinct] if isinstance(v, Tensor) else v for k, v in first.items()}, use_cache=True,
           return_dict=True, **extra)
    except _StopBelow:
        pass
    finally:
        handle.remove()
    if "kw" not in seen:
        raise RuntimeError(f"the forward did not reach decoder layer {below.layer}")
    n = len(distinct)
    args, kw = list(seen["args"]), dict(seen["kw"])
    hidden = args.pop(0) if args else kw.pop("hidden_states")
    cache = kw.get("cache", kw.get("past_key_values"))
    if cache is None:
        raise RuntimeError(f"decoder layer {below.layer} was called without a cache")
    # the first edited layer too computes the same for identical prompts: run it once each, its hook paused, then
    # its hook on the gathered rows
    module = adapter.layer_module(below.layer)
    live.paused = True
    try:
        out = module(hidden, *args, **kw)
    finally:
        live.paused = False
    take = lambda v: v[gather] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n else v  # noqa: E731
    args = [take(a) for a in args]
    kw = {k: tuple(take(x) for x in v) if isinstance(v, tuple) else take(v) for k, v in kw.items()}
    cache.reorder_cache(gather)
    out = (take(out[0]), *out[1:]) if isinstance(out, tuple) else take(out)
    live.prompts = rows
    hook = live.hooks.get(below.layer)
    if hook is not None:
        edited = hook(module, (hidden,), out)
        out = out if edited is None else edited
    hidden = layer_output(out)
    for layer in range(below.layer + 1, adapter.n_layers):
        hidden = layer_output(adapter.layer_module(layer)(hidden, *args, **kw))
    live.prompts = None
    return adapter.last_logits(hidden), cache


#: ended captions leave :func:`_greedy`'s batch once they are at least 1/_DROP_SHARE of it
_DROP_SHARE = 16


def _greedy(hf: Any, kwargs: dict[str, Any], positions: Tensor, max_new_tokens: int, pad: int | None,
            live: LivePrompts, shared: tuple[Tensor, Tensor] | None = None, below: _Below | None = None) -> Tensor:
    """Greedy decoding with the KV cache, as ``hf.generate(do_sample=False)`` decodes, except that a prompt whose
    caption has ended (end-of-sequence token) is dropped from the batch (its cache rows, mask and positions) once
    the ended ones are 1/:data:`_DROP_SHARE` of it, so the later steps run mostly the captions still being written.  ``live.prompts`` tells the intervention hooks
    which prompts the rows of each step continue.  With ``below`` (:func:`_shared_below`), the prefill runs the layers
    below the first edited one once per distinct prompt.  Returns the new token ids ``[B, n]`` (``pad`` after the
    end)."""
    import inspect

    params = inspect.signature(hf.forward).parameters
    cache_key = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    gc = hf.generation_config
    eos = gc.eos_token_id
    eos = torch.as_tensor([] if eos is None else ([eos] if isinstance(eos, int) else list(eos)), dtype=torch.long)
    pad = pad if pad is not None else (gc.pad_token_id if gc.pad_token_id is not None else (int(eos[0]) if len(eos) else 0))
    ids = kwargs["input_ids"]
    device = ids.device
    mask = kwargs.get("attention_mask")
    if mask is not None and bool((mask == 1).all()):
        mask = None  # as generate does: no padding, no mask
    B = ids.shape[0]
    first = {**kwargs, "position_ids": positions.to(device)}
    if mask is None:
        first.pop("attention_mask", None)
    rep = shared[0].to(device) if shared is not None else torch.arange(B, device=device)
    if shared is not None:  # the prefill of each group of identical prompts with alike edits, run once
        first = {k: v[rep] if isinstance(v, Tensor) else v for k, v in first.items()}
    if below is not None and len(set(below.key[rep.cpu()].tolist())) < len(rep):
        logits, cache = _prefill_from_below(hf, first, below, rep, live, extra)
    else:
        live.prompts = rep if shared is not None else None
        out = hf(**first, use_cache=True, return_dict=True, **extra)
        live.prompts = None
        cache = out.get(cache_key)
        if cache is None:
            cache = out.get("past_key_values")
        logits = out.logits[:, -1]
        del out
    if shared is not None:
        of_row = shared[1].to(device)
        cache.reorder_cache(of_row)
        logits = logits[of_row]
    new = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=device)
    alive = torch.arange(B, device=device)
    pos = positions[:, -1:].to(device)
    eos = eos.to(device)
    n = 0
    done = torch.zeros(B, dtype=torch.bool, device=device)  # rows still in the batch whose caption has ended
    for step in range(max_new_tokens):
        token = logits.float().argmax(-1)
        if bool(done.any()):
            new[alive[~done], step] = token[~done]
        else:
            new[alive, step] = token
        n = step + 1
        done = done | torch.isin(token, eos)
        n_done = int(done.sum())
        if step == max_new_tokens - 1 or n_done == len(done):
            break
        # ended rows leave the batch (cache rows, mask, positions) once they are a sixteenth of it: each removal
        # copies the whole cache, about a quarter of a decode step; until then they run on, their tokens unused
        if n_done and n_done * _DROP_SHARE >= len(done):
            keep = (~done).nonzero().flatten()
            alive, token, pos, done = alive[keep], token[keep], pos[keep], done[keep]
            mask = mask[keep] if mask is not None else None
            cache.reorder_cache(keep)
            live.prompts = alive
        pos = pos + 1
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        step_kwargs = {"input_ids": token[:, None], "position_ids": pos, cache_key: cache, "use_cache": True}
        if mask is not None:
            step_kwargs["attention_mask"] = mask
        logits = hf(**step_kwargs, return_dict=True, **extra).logits[:, -1]
    live.prompts = None
    return new[:, :n]


# ================================================================================================
# Captioning: greedy captions of images in batches, with interventions
# ================================================================================================


@dataclass
class Captioner:
    """Greedy captions of images through :func:`generate`, ``batch_size`` images at a time.

    The prompt is the model's own (chat template with one image and ``prompt`` as text, generation
    prompt added; the plain layout without a template).  ``captioner(images, interventions)`` applies
    the same interventions to every batch; ``interventions`` may instead be a function
    ``(start, stop) -> interventions`` for edits that differ per image (``Patches.per_prompt``)."""

    model: Any
    processor: Any
    adapter: VLMAdapter
    prompt: str = ""
    batch_size: int = 64
    max_new_tokens: int = 28
    prompt_template: str | None = None  # a raw prompt ("[INST] <image>\n{caption} [/INST]"; {caption} = prompt)
    _gather: bool = field(default=True, init=False, repr=False)

    def __call__(self, images: Sequence[Any], interventions: Any = ()) -> list[str]:
        text = self.adapter.render_prompt(self.processor, self.prompt, 1, add_generation_prompt=True,
                                          prompt_template=self.prompt_template)
        out: list[str] = []
        with padding_side(self.processor, "left"):
            for i in range(0, len(images), self.batch_size):
                chunk = list(images[i:i + self.batch_size])
                enc = self.adapter.complete_inputs(self._encode(chunk, text))
                ivs = interventions(i, i + len(chunk)) if callable(interventions) else interventions
                out += generate(self.model, enc, ivs, max_new_tokens=self.max_new_tokens, processor=self.processor,
                                adapter=self.adapter, same_prompt=[id(im) for im in chunk])
        return [c.strip() for c in out]

    def _encode(self, chunk: list[Any], text: str) -> Any:
        """The processor's encoding of ``chunk`` (one prompt per image).  A batch that repeats images (a dose-response
        grid: the same image at many strengths) has each distinct image encoded once and the rows gathered from it
        when every tensor of the encoding has one row per image (then it is exactly what encoding the whole batch
        gives: the same images, so the same padding); otherwise (e.g. patches of all images flattened into one
        tensor) the whole batch is encoded."""
        first: dict[int, int] = {}
        for im in chunk:
            first.setdefault(id(im), len(first))
        if len(first) < len(chunk) and self._gather:
            distinct = list({id(im): im for im in chunk}.values())
            enc = self.processor(images=distinct, text=[text] * len(distinct), return_tensors="pt", padding=True)
            if all(isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == len(distinct) for v in enc.values()):
                rows = torch.tensor([first[id(im)] for im in chunk])
                for key in list(enc.keys()):
                    enc[key] = enc[key][rows]
                return enc
            self._gather = False  # this processor's encodings cannot be gathered by row: do not try again
        return self.processor(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True)


def caption(vlm: Any, images: Sequence[Any], prompt: str, interventions: Any = (), *, max_new_tokens: int = 40,
            batch_size: int = 64, prompt_template: str | None = None) -> list[str]:
    """Greedy captions of ``images`` by ``vlm`` (``jsae.load_vlm(...)``) after ``prompt`` (the processor's chat
    template with one image and the prompt, generation prompt added; ``prompt_template`` a raw prompt with
    ``{caption}`` for the prompt), with ``interventions`` applied: what the protocol itself calls
    (:class:`Captioner`).  The toy models' prompt is ``jsae.world.processors.CAPTION_PROMPT``."""
    model, processor, adapter = vlm
    return Captioner(model, processor, adapter, prompt=prompt, batch_size=batch_size, max_new_tokens=max_new_tokens,
                     prompt_template=prompt_template)(list(images), interventions)

