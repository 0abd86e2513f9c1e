"""The Joint Sparse Autoencoder as a SAELens architecture (``architecture: "jsae"``).

A JSAE has two modality branches, ``"vision"`` and ``"text"``.  By default each has its own encoder
(``W_enc``, ``b_enc``) and decoder (``W_dec``) as in the paper's reference code; ``shared_encoder``
gives one encoder for both (VL-SAE style) and ``shared_decoder`` one dictionary for both.  Every
branch keeps its own ``b_dec`` (the modality mean), so a shared dictionary is about directions.

State-dict keys are ``vision.*``, ``text.*`` and ``shared.*``.  The SAELens attribute names
``W_enc``, ``b_enc``, ``W_dec`` and ``b_dec`` refer to the branch of ``cfg.default_modality`` (default
``"text"``), so without a ``modality`` argument a JSAE behaves as an ordinary SAE on a hook.

**Hook names.** ``cfg.metadata.hook_name`` is TransformerLens's bridge name of the layer's output
(``blocks.L.hook_out``, what SAELens's ``SAETransformerBridge.add_sae`` and evals look up);
``cfg.metadata.hf_hook_name`` is the module path (``model.language_model.layers.L``, what nnsight and forward
hooks use).  A cfg that names the layer by its module path is normalised to both when it is built, loaded or
saved (one that says ``blocks.L.hook_resid_post``, HookedTransformer's name, keeps it);
:attr:`JointSAE.hook_names` lists every naming.

**Modality routing.** Inside ``with sae.routing(image_mask):`` a call without ``modality`` on ``[B, S, d_in]``
states encodes the positions where ``image_mask [B, S]`` is True with the vision branch and the others with
the text branch (and decodes each with its own decoder), so one forward of an SAE attached to a hook (SAELens's
``SAETransformerBridge.add_sae``, ``HookedSAETransformer``) or called inside an nnsight trace treats image
tokens as images and text as text; positions past the mask (generated tokens) are text.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float
from sae_lens.saes.sae import (
    SAE,
    SAEConfig,
    SAEMetadata,
    TrainCoefficientConfig,
    TrainingSAE,
    TrainingSAEConfig,
    TrainStepInput,
    TrainStepOutput,
)
from torch import Tensor, nn

from jsae.guards import shape_checked
from jsae.saes.alignment import get_alignment_loss
from jsae.saes.sae_files import (CFG_FILE, WEIGHTS_FILE, atomic_save, check_finite_state, check_finite_weights,  # noqa: F401
                                  check_sae_dir, check_state_dict)
from jsae.saes.sparse_relu import (DENSE_ALIGNMENTS, SPARSE_ALIGNMENTS, active_entries, in_pair, one_thread, relu_dense_codes,
                                   relu_sparse_pair, sparse_aux_reconstruction, sparse_switch_density,
                                   topk_sparse_codes)

MODALITIES: tuple[str, str] = ("vision", "text")
ACTIVATIONS: tuple[str, str] = ("relu", "topk")
METADATA_KEYS = ("model_name", "hook_name", "hf_hook_name", "layer", "pooling")


def check_modality(modality: str) -> str:
    if modality not in MODALITIES:
        raise ValueError(f"unknown modality {modality!r}; a JSAE has the modalities {list(MODALITIES)}")
    return modality


@dataclass
class JointSAEConfig(SAEConfig):
    """Inference config.  ``activation`` is ``"relu"`` (trained with L1) or ``"topk"`` (keeps ``k``)."""

    activation: Literal["relu", "topk"] = "relu"
    k: int = 32
    shared_encoder: bool = False
    shared_decoder: bool = False
    default_modality: Literal["vision", "text"] = "text"

    @classmethod
    def architecture(cls) -> str:
        return "jsae"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; choose one of {list(ACTIVATIONS)}")
        if self.activation == "topk" and not 0 < self.k <= self.d_sae:
            raise ValueError(f"k={self.k} must be between 1 and d_sae={self.d_sae}; lower k or widen the SAE")
        check_modality(self.default_modality)
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if isinstance(self.metadata, dict):  # SAELens's from_dict passes the raw dict first
            self.metadata = SAEMetadata(**self.metadata)
        self._complete_metadata()

    def _complete_metadata(self) -> None:
        self.metadata.modalities = list(MODALITIES)
        for key in METADATA_KEYS:  # always present in cfg.json, null when unknown
            if key not in self.metadata:
                self.metadata[key] = None
        normalise_hook_metadata(self.metadata)


def normalise_hook_metadata(meta: Any) -> None:
    """Name the SAE's site for SAELens and TransformerLens (in place on SAELens ``cfg.metadata``): a module path in
    ``hook_name`` (``model.language_model.layers.L``) moves to ``hf_hook_name`` and ``hook_name`` becomes
    TransformerBridge's ``blocks.L.hook_out``; a TransformerLens name (``blocks.L.hook_out``, or
    ``blocks.L.hook_resid_post`` for HookedTransformer) is kept; ``layer`` is filled in from the hook.  A hook that
    is not a decoder layer's output is left as it is."""
    from jsae.adapters.base import bridge_hook_name, is_tl_hook_name, layer_of_hook

    hook = meta.get("hook_name")
    layer = layer_of_hook(hook) if isinstance(hook, str) else None
    if layer is not None:
        if not is_tl_hook_name(hook):
            if not meta.get("hf_hook_name"):
                meta["hf_hook_name"] = hook
            meta["hook_name"] = bridge_hook_name(layer)
        if meta.get("layer") is None:
            meta["layer"] = layer
    elif hook is None and meta.get("layer") is not None:
        meta["hook_name"] = bridge_hook_name(int(meta["layer"]))


class _Branch(nn.Module):
    """A parameter holder: the encoder and/or decoder of one modality, or the shared ones."""


Weights = tuple[dict[str, tuple[Tensor, Tensor]], dict[str, Tensor], dict[str, Tensor]]


def tied_weights(cfg: JointSAEConfig, **kw: Any) -> Weights:
    """``init="tied"``: ``(encoders {name: (W_enc, b_enc)}, decoders {name: W_dec}, b_dec {modality})``;
    Kaiming-uniform decoder rows, each encoder the transpose of its decoder (a shared encoder: of the vision
    one), zero biases.  Names are ``"shared"`` for a shared part, else the modalities."""
    dec: dict[str, Tensor] = {}
    for name in ("shared",) if cfg.shared_decoder else MODALITIES:
        dec[name] = nn.init.kaiming_uniform_(torch.empty(cfg.d_sae, cfg.d_in, **kw))
    enc = {name: (dec["shared" if cfg.shared_decoder else "vision" if name == "shared" else name].T.clone().contiguous(),
                  torch.zeros(cfg.d_sae, **kw))
           for name in (("shared",) if cfg.shared_encoder else MODALITIES)}
    return enc, dec, {m: torch.zeros(cfg.d_in, **kw) for m in MODALITIES}


def torch_linear_init(n_in: int, n_out: int, **kw: Any) -> tuple[Tensor, Tensor]:
    """The weight ``[n_out, n_in]`` and bias ``[n_out]`` that ``nn.Linear(n_in, n_out)`` starts with (same
    random draws in the same order: Kaiming-uniform ``a=√5`` weight, then bias uniform in ``±1/√n_in``)."""
    w = torch.empty(n_out, n_in, **kw)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    bound = 1 / math.sqrt(n_in) if n_in > 0 else 0.0
    b = nn.init.uniform_(torch.empty(n_out, **kw), -bound, bound)
    return w, b


def torch_linear_weights(cfg: JointSAEConfig, **kw: Any) -> Weights:
    """``init="torch-linear"``: per modality an encoder ``nn.Linear(d_in, d_sae)`` and a decoder
    ``nn.Linear(d_sae, d_in)``, drawn in the order vision encoder, vision decoder, text encoder, text decoder
    (the reference's construction order, so one seed gives the same numbers).  A shared encoder or decoder is
    drawn once, at vision; a shared decoder's text ``Linear`` is still drawn for its bias (each modality keeps
    its own ``b_dec``)."""
    enc: dict[str, tuple[Tensor, Tensor]] = {}
    dec: dict[str, Tensor] = {}
    b_dec: dict[str, Tensor] = {}
    for m in MODALITIES:
        e = "shared" if cfg.shared_encoder else m
        if e not in enc:
            w, b = torch_linear_init(cfg.d_in, cfg.d_sae, **kw)
            enc[e] = (w.T.contiguous(), b)
        w, b_dec[m] = torch_linear_init(cfg.d_sae, cfg.d_in, **kw)
        dec.setdefault("shared" if cfg.shared_decoder else m, w.T.contiguous())
    return enc, dec, b_dec


def check_size(cfg: JointSAEConfig, training: bool = False) -> None:
    """Refuse, before allocating, a JSAE whose weights (with gradients and Adam moments when ``training``) do not
    fit the memory of ``cfg.device``."""
    from jsae.guards import check_allocation

    n_mat = (1 if cfg.shared_encoder else 2) + (1 if cfg.shared_decoder else 2)
    itemsize = getattr(torch, str(cfg.dtype).removeprefix("torch."), torch.float32).itemsize
    n_bytes = float(n_mat) * cfg.d_in * cfg.d_sae * itemsize * (4 if training else 1)
    check_allocation(n_bytes, cfg.device, f"a JSAE with d_in={cfg.d_in}, d_sae={cfg.d_sae}" + (" (training)" if training else ""),
                     "lower d_sae (or use a device with more memory)")


class JointSAE(SAE[JointSAEConfig]):
    """Inference JSAE: ``encode/decode/forward(x, modality=None)``."""

    def __init__(self, cfg: JointSAEConfig, use_error_term: bool = False):
        check_size(cfg, training=isinstance(cfg, TrainingSAEConfig))
        cfg._complete_metadata()  # SAELens's SAEConfig.from_dict replaces the metadata after __post_init__
        super().__init__(cfg, use_error_term)
        self._route: Tensor | None = None

    # ---- where it reads ------------------------------------------------------------------------
    @property
    def hook_names(self) -> dict[str, str | None]:
        """The SAE's hook under every naming: ``"hf"`` (module path, for nnsight and forward hooks; None when
        unknown), ``"bridge"`` (TransformerBridge ``blocks.L.hook_out``) and ``"hooked_transformer"``
        (``blocks.L.hook_resid_post``).  Raises a one-line error when the metadata names no layer."""
        from jsae.adapters.base import hook_names, sae_layer

        normalise_hook_metadata(self.cfg.metadata)
        return hook_names(sae_layer(self), self.cfg.metadata.get("hf_hook_name"))

    # ---- modality routing ----------------------------------------------------------------------
    @contextlib.contextmanager
    def routing(self, image_mask: Tensor | None) -> Iterator["JointSAE"]:
        """Inside the block, ``encode`` / ``decode`` / ``forward`` called without ``modality`` on ``[B, S, ·]``
        tensors use the vision branch where ``image_mask [B, S]`` (bool) is True and the text branch elsewhere;
        positions past ``S`` (generated tokens) and single decode steps are text.  ``None`` turns routing off.
        Restores the previous routing on exit."""
        if image_mask is not None:
            if not isinstance(image_mask, Tensor) or image_mask.dim() != 2 or image_mask.dtype != torch.bool:
                raise TypeError(f"routing needs a [batch, seq] bool image-token mask (adapter.image_token_mask(inputs)), "
                                f"got {getattr(image_mask, 'dtype', type(image_mask).__name__)} "
                                f"{list(getattr(image_mask, 'shape', []))}")
        before = getattr(self, "_route", None)
        self._route = image_mask
        try:
            yield self
        finally:
            self._route = before

    def _routed_rows(self, x: Tensor) -> Tensor | None:
        """``[B, S]`` bool of the positions of ``x [B, S, ·]`` that take the vision branch, or None when not routing."""
        mask = getattr(self, "_route", None)
        if mask is None:
            return None
        if x.dim() != 3 or x.shape[0] != mask.shape[0]:
            raise ValueError(f"routing by an image mask of shape {list(mask.shape)} needs [batch={mask.shape[0]}, seq, d] "
                             f"states, got {list(x.shape)}; route with the mask of the batch you run")
        mask = mask.to(x.device)
        seq, known = x.shape[1], mask.shape[1]
        if seq == known:
            return mask
        if seq < known:  # a decode step with the KV cache: generated tokens are text
            return torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        return torch.cat([mask, mask.new_zeros(x.shape[0], seq - known)], dim=1)  # prompt + generated, no cache

    # ---- weights -------------------------------------------------------------------------------
    def initialize_weights(self) -> None:
        self._register_weights(*tied_weights(self.cfg, dtype=self.dtype, device=self.device))

    def _register_weights(self, enc: dict[str, tuple[Tensor, Tensor]], dec: dict[str, Tensor], b_dec: dict[str, Tensor]) -> None:
        """The one place parameters are created: ``W_dec`` of each decoder, ``W_enc``, ``b_enc`` of each encoder
        (``"shared"`` or per modality) and each modality's ``b_dec``, in that order, in the branch containers."""
        self.vision, self.text, self.shared = _Branch(), _Branch(), _Branch()
        for name, w in dec.items():
            getattr(self, name).W_dec = nn.Parameter(w)
        for name, (w, b) in enc.items():
            getattr(self, name).W_enc = nn.Parameter(w)
            getattr(self, name).b_enc = nn.Parameter(b)
        for m in MODALITIES:
            getattr(self, m).b_dec = nn.Parameter(b_dec[m])

    def _enc(self, modality: str) -> _Branch:
        return self.shared if self.cfg.shared_encoder else getattr(self, modality)

    def _dec(self, modality: str) -> _Branch:
        return self.shared if self.cfg.shared_decoder else getattr(self, modality)

    def W_enc_of(self, modality: str) -> Tensor:
        return self._enc(check_modality(modality)).W_enc

    def b_enc_of(self, modality: str) -> Tensor:
        return self._enc(check_modality(modality)).b_enc

    def W_dec_of(self, modality: str) -> Tensor:
        return self._dec(check_modality(modality)).W_dec

    def b_dec_of(self, modality: str) -> Tensor:
        return getattr(self, check_modality(modality)).b_dec

    # SAELens names: the default modality's branch.
    @property
    def W_enc(self) -> Tensor:  # type: ignore[override]
        return self.W_enc_of(self.cfg.default_modality)

    @property
    def b_enc(self) -> Tensor:
        return self.b_enc_of(self.cfg.default_modality)

    @property
    def W_dec(self) -> Tensor:  # type: ignore[override]
        return self.W_dec_of(self.cfg.default_modality)

    @property
    def b_dec(self) -> Tensor:  # type: ignore[override]
        return self.b_dec_of(self.cfg.default_modality)

    def unique_params(self, attr: str) -> list[Tensor]:
        """The distinct tensors called ``attr`` over both modalities (one when that part is shared)."""
        owner = {"W_enc": self._enc, "b_enc": self._enc, "W_dec": self._dec, "b_dec": lambda m: getattr(self, m)}[attr]
        out: list[Tensor] = []
        for m in MODALITIES:
            p = getattr(owner(m), attr)
            if all(p is not q for q in out):
                out.append(p)
        return out

    # ---- decoder housekeeping (as sparsify's SparseCoder) ---------------------------------------
    def decoder_weights(self) -> list[Tensor]:
        """The distinct decoder matrices (one when the dictionary is shared, else vision's and text's)."""
        return self.unique_params("W_dec")

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        """Rescale every decoder row to unit norm."""
        for w in self.decoder_weights():
            w.div_(torch.linalg.vector_norm(w, dim=-1, keepdim=True).clamp_(min=1e-8))

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Project out the part of each decoder row's gradient along the row (keeps unit rows on the sphere)."""
        for w in self.decoder_weights():
            if w.grad is not None:  # row-wise dots as one batched product, then one in-place pass
                dots = torch.bmm(w.grad.unsqueeze(1), w.unsqueeze(2)).view(-1, 1)
                w.grad.addcmul_(dots, w, value=-1.0)

    # ---- forward -------------------------------------------------------------------------------
    def _modality(self, modality: str | None) -> str:
        return self.cfg.default_modality if modality is None else check_modality(modality)

    def _check_d_in(self, x: Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(
                f"activations have last dimension {x.shape[-1]} but this JSAE has d_in={self.cfg.d_in}; "
                f"pass the hidden states of the layer it was trained on ({self.cfg.metadata.hook_name})"
            )

    def process_sae_in(self, sae_in: Tensor, modality: str | None = None) -> Tensor:  # type: ignore[override]
        """SAELens's input processing (dtype, reshape, ``hook_sae_input``, run-time norm) with the ``b_dec``
        of ``modality`` subtracted."""
        x = self.run_time_activation_norm_fn_in(self.hook_sae_input(self.reshape_fn_in(sae_in.to(self.dtype))))
        return x - self.b_dec_of(self._modality(modality)) * self.cfg.apply_b_dec_to_input

    def _pre(self, x: Tensor, modality: str) -> Tensor:
        enc = self._enc(modality)
        return self.hook_sae_acts_pre(self.process_sae_in(x, modality) @ enc.W_enc + enc.b_enc)

    def _activate(self, pre: Tensor) -> Tensor:
        acts = F.relu(pre)
        if self.cfg.activation == "topk":
            top = acts.topk(self.cfg.k, dim=-1, sorted=False)
            acts = torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
        return acts

    def _routed_pre(self, x: Tensor, rows: Tensor) -> Tensor:
        """Pre-activations with each position through its branch (``rows``: vision); the SAE's hooks see the whole
        ``[B, S, ·]`` tensors once, and each branch's rows go through exactly the ops of :meth:`_pre`."""
        x = self.run_time_activation_norm_fn_in(self.hook_sae_input(self.reshape_fn_in(x.to(self.dtype))))
        pre = x.new_empty(*x.shape[:-1], self.cfg.d_sae)
        for m, sel in (("vision", rows), ("text", ~rows)):
            if bool(sel.any()):
                enc = self._enc(m)
                pre[sel] = (x[sel] - self.b_dec_of(m) * self.cfg.apply_b_dec_to_input) @ enc.W_enc + enc.b_enc
        return self.hook_sae_acts_pre(pre)

    @shape_checked
    def encode(self, x: Float[Tensor, "*batch d_in"], modality: str | None = None) -> Float[Tensor, "*batch d_sae"]:
        """Sparse codes of ``x`` through the encoder of ``modality`` (default: ``cfg.default_modality``; inside
        :meth:`routing`, each position's own branch)."""
        self._check_d_in(x)
        rows = self._routed_rows(x) if modality is None else None
        if rows is not None:
            return self.hook_sae_acts_post(self._activate(self._routed_pre(x, rows)))
        return self.hook_sae_acts_post(self._activate(self._pre(x, self._modality(modality))))

    @shape_checked
    def decode(self, feature_acts: Float[Tensor, "*batch d_sae"], modality: str | None = None) -> Float[Tensor, "*batch d_in"]:
        """Reconstruction from codes through the decoder of ``modality`` (inside :meth:`routing`: each position's own)."""
        if feature_acts.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"codes have last dimension {feature_acts.shape[-1]} but d_sae={self.cfg.d_sae}")
        rows = self._routed_rows(feature_acts) if modality is None else None
        if rows is not None:
            out = feature_acts.new_empty(*feature_acts.shape[:-1], self.cfg.d_in)
            for m, sel in (("vision", rows), ("text", ~rows)):
                if bool(sel.any()):
                    out[sel] = feature_acts[sel] @ self._dec(m).W_dec + self.b_dec_of(m)
            out = self.hook_sae_recons(out)
        else:
            m = self._modality(modality)
            out = self.hook_sae_recons(feature_acts @ self._dec(m).W_dec + self.b_dec_of(m))
        return self.reshape_fn_out(self.run_time_activation_norm_fn_out(out), self.d_head)

    @torch.no_grad()
    def encode_decode(self, x: Tensor, modality: str | None = None, batch_size: int = 4096) -> tuple[Tensor, Tensor]:
        """Codes and reconstructions of ``x [n, d_in]`` through one branch, in batches (no gradient)."""
        zs, rs = [], []
        for i in range(0, x.shape[0], batch_size):
            z = self.encode(x[i:i + batch_size], modality)
            zs.append(z)
            rs.append(self.decode(z, modality))
        return torch.cat(zs), torch.cat(rs)

    @contextlib.contextmanager
    def hooks_off(self) -> Iterator["JointSAE"]:
        """Inside the block every hook point of the SAE (``hook_dict``, TransformerLens's public map) is an identity
        without hooks, as SAELens's ``SAE.forward`` computes the clean reconstruction of ``use_error_term``."""
        try:
            for name in self.hook_dict:
                setattr(self, name, nn.Identity())
            yield self
        finally:
            for name, hook in self.hook_dict.items():
                setattr(self, name, hook)

    def forward(self, x: Tensor, modality: str | None = None) -> Tensor:  # type: ignore[override]
        """Reconstruction of ``x``; with ``use_error_term`` the error is added back (output == input)."""
        feature_acts = self.encode(x, modality)
        sae_out = self.decode(feature_acts, modality)
        if self.use_error_term:
            with torch.no_grad(), self.hooks_off():
                clean = self.decode(self.encode(x, modality), modality)
            sae_out = sae_out + self.hook_sae_error(x - clean)
        return self.hook_sae_output(sae_out)

    # ---- saving and loading, the SAELens way ---------------------------------------------------
    def save_model(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` atomically (tmp files, then rename); the hook is
        written under every naming (:func:`normalise_hook_metadata`)."""
        check_finite_state(self, Path(path))
        normalise_hook_metadata(self.cfg.metadata)
        return atomic_save(path, lambda tmp: SAE.save_model(self, tmp))

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        check_state_dict(self, state_dict)

    @classmethod
    def load_from_disk(cls, path: str | Path, device: str = "cpu", dtype: str | None = None, **kwargs: Any):  # type: ignore[override]
        """``SAE.load_from_disk`` with one-line errors for a missing, foreign or corrupt SAE directory."""
        check_sae_dir(path)
        sae = super().load_from_disk(path, device=device, dtype=dtype, **kwargs)
        sae.source_dir = Path(path)  # where its labels.json is (jsae.load_labels)
        return sae

    # ---- SAELens folding helpers, over every branch --------------------------------------------
    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        if self.cfg.shared_decoder != self.cfg.shared_encoder:
            raise ValueError("fold_W_dec_norm needs encoders and decoders paired one to one (both shared or both separate)")
        for m in MODALITIES if not self.cfg.shared_decoder else ("vision",):
            enc, dec = self._enc(m), self._dec(m)
            norms = dec.W_dec.norm(dim=-1).clamp(min=1e-8)
            dec.W_dec.div_(norms[:, None])
            enc.W_enc.mul_(norms[None, :])
            enc.b_enc.mul_(norms)

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scaling_factor: float) -> None:
        for p in self.unique_params("W_enc"):
            p.mul_(scaling_factor)
        for p in self.unique_params("W_dec") + self.unique_params("b_dec"):
            p.div_(scaling_factor)
        self.cfg.normalize_activations = "none"


# ================================================================================================
# Training
# ================================================================================================


class BranchCodes(NamedTuple):
    """What a path computes for one modality, and all the loss reads: codes (``feature_acts``), pre-activations
    (``hidden_pre``), reconstruction (``sae_out``); the codes the L1 term sums (ReLU: dense ``[B, d_sae]`` or the
    active values); the dead latents' reconstruction of the residual and its :meth:`TrainingJointSAE.aux_selection`
    scale (TopK, when it has dead latents); on a sparse path the differentiable ``(values, codes)`` the alignment
    reads and the ``[d_sae]`` mask of latents that fired."""

    feature_acts: Tensor
    hidden_pre: Tensor
    sae_out: Tensor
    l1_codes: Tensor | None = None
    aux_recon: Tensor | None = None
    aux_scale: float = 0.0
    sparse: tuple[Tensor, Any] | None = None
    fired: Tensor | None = None


class BranchOutput(NamedTuple):
    """One modality's part of a training step: named losses, codes (``feature_acts``), pre-activations
    (``hidden_pre``, detached on the sparse path), reconstruction (``sae_out``) and, on the sparse TopK path,
    the codes as ``(values [B * k], codes)`` (:class:`~jsae.saes.sparse_relu.SparseCodes`)."""

    losses: dict[str, Tensor]
    feature_acts: Tensor
    hidden_pre: Tensor
    sae_out: Tensor
    sparse: tuple[Tensor, Any] | None = None


@dataclass
class JointStepOutput:
    """What one paired training step computed: total loss, named losses, and per modality the codes
    (``feature_acts``) and reconstructions (``sae_out``), as SAELens's ``TrainStepOutput`` names them.
    ``path`` says which implementation ran (``"dense"``: plain autograd; ``"sparse"``: the sparse TopK or
    ReLU path; ``"dense-codes"``: the ReLU fast path while the codes are too dense for the sparse one) and
    ``density`` the measured fraction of active ReLU codes (the higher of the two modalities) when known;
    ``fired`` (when the path knows it without a pass over the codes) per modality the ``[d_sae]`` mask of the
    latents active on some sample of the batch."""

    loss: Tensor
    losses: dict[str, Tensor]
    feature_acts: dict[str, Tensor]
    sae_out: dict[str, Tensor]
    path: str = "dense"
    density: float | None = None
    fired: dict[str, Tensor] | None = None


LOSS_REDUCTIONS: tuple[str, str] = ("sum", "mean")
INITS: tuple[str, str] = ("tied", "torch-linear")
# options added after the first trained results: left out of cfg.json and checkpoint fingerprints while at
# their default, so files written with the defaults stay byte-identical and old checkpoints stay resumable
_OPTIONAL_DEFAULTS: dict[str, Any] = {"loss_reduction": "sum", "init": "tied"}


@dataclass(kw_only=True)
class TrainingJointSAEConfig(JointSAEConfig, TrainingSAEConfig):
    """Training config: the paper's defaults are MSE 1.0, L1 0.03, cosine alignment 1.0 (ReLU).

    ``loss_reduction`` says how the reconstruction (MSE, TopK auxiliary) and L1 terms are reduced:

    * ``"sum"`` (default): per sample, the sum over ``d_in`` (MSE) or ``d_sae`` (L1), then the mean over the
      batch; the two modalities' terms are added.  The loss is
      ``Σ_m [mse·mean_b Σ_i (x̂-x)² + l1·mean_b Σ_j z] + align·A``.
    * ``"mean"``: the reference code's element means, *and* the mean over the two modalities: each
      modality's term is ``½ · mean over batch × d_in`` of the squared error (``½ · mean over batch × d_sae``
      of ``|z|`` for L1), so the loss is
      ``mse·½(MSE_v+MSE_t) + l1·½(mean|z_v|+mean|z_t|) + align·A``, exactly the reference objective
      ``½(MSE_v+MSE_t) + 0.03·½(mean|z_v|+mean|z_t|) + 1·(1 − mean cos(z_v, z_t))`` at the paper's
      coefficients.  The ½ is folded into ``"mean"`` (a mean over batch × modality × features), so there is
      no separate modality weighting; the per-modality entries of ``losses`` each carry their ½.  The
      alignment term is a mean over pairs under both reductions.  With ``mse_normalization="variance"`` the
      element mean is divided by the mean per-element variance (``mse_scale / d_in``), so the normalised MSE
      is ½·(fraction of variance unexplained) per modality.

    ``init`` says how the weights start: ``"tied"`` (default; unit-free Kaiming-uniform decoder rows, each
    encoder the transpose of its decoder, zero biases) or ``"torch-linear"`` (PyTorch's ``nn.Linear``
    default: the encoder is ``Linear(d_in, d_sae)`` and the decoder ``Linear(d_sae, d_in)``, each weight
    Kaiming-uniform with ``a=√5`` (bound ``1/√fan_in``) and each bias uniform in ``±1/√fan_in``, so ``b_enc``
    and ``b_dec`` start non-zero, as in the reference).  Input centring is SAELens's ``apply_b_dec_to_input``
    (the reference has none: ``False``); the unit-norm decoder constraint is the trainer's
    ``JointTrainerConfig.normalize_decoder``.

    Dead-latent revival.  A TopK JSAE trains with SAELens's AuxK loss (``TopKTrainingSAE``'s, same defaults and
    semantics): per modality, the latents the trainer counts as dead (no firing for
    ``JointTrainerConfig.dead_feature_window`` steps) reconstruct the detached residual ``x - x̂`` from their
    top ``min(aux_k, n_dead)`` pre-activations (``aux_k`` defaults to ``d_in // 2``; not ReLU'd, no ``b_dec``),
    weighted by ``aux_loss_coefficient`` (default 1.0) × ``min(n_dead / aux_k, 1)`` and reduced as the MSE
    (so with ``mse_normalization="variance"`` it is divided by the same variance); ``aux_loss_coefficient=0``
    turns it off.  A ReLU JSAE revives dead latents by resampling them (``JointTrainerConfig.resample_every``).
    """

    mse_coefficient: float = 1.0
    mse_normalization: Literal["none", "variance"] = "none"
    l1_coefficient: float = 0.03
    l1_warm_up_steps: int = 0
    alignment: str = "cosine"
    alignment_coefficient: float = 1.0
    alignment_warm_up_steps: int = 0
    infonce_temperature: float = 0.07
    aux_loss_coefficient: float = 1.0  # the TopK auxiliary (AuxK) loss; SAELens's default
    aux_k: int | None = None  # dead latents used by the TopK auxiliary loss (default: d_in // 2, as SAELens)
    decoder_init_norm: float | None = None
    loss_reduction: Literal["sum", "mean"] = "sum"
    init: Literal["tied", "torch-linear"] = "tied"

    def __post_init__(self) -> None:
        super().__post_init__()
        get_alignment_loss(self.alignment)
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"unknown loss_reduction {self.loss_reduction!r}; choose 'sum' (per-sample sums) "
                             "or 'mean' (the reference's element means)")
        if self.init not in INITS:
            raise ValueError(f"unknown init {self.init!r}; choose 'tied' or 'torch-linear' (PyTorch nn.Linear default)")
        if self.mse_normalization not in ("none", "variance"):
            raise ValueError(f"unknown mse_normalization {self.mse_normalization!r}; choose 'none' or 'variance'")
        for name in ("mse_coefficient", "l1_coefficient", "alignment_coefficient", "aux_loss_coefficient"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.infonce_temperature <= 0:
            raise ValueError(f"infonce_temperature must be > 0, got {self.infonce_temperature}")
        if self.aux_k is not None and (isinstance(self.aux_k, bool) or not 1 <= self.aux_k <= self.d_sae):
            raise ValueError(f"aux_k={self.aux_k!r} must be a whole number between 1 and d_sae={self.d_sae} "
                             "(or None for d_in // 2)")

    def get_inference_config_class(self) -> type[SAEConfig]:
        return JointSAEConfig

    def to_dict(self) -> dict[str, Any]:
        return _drop_optional_defaults(super().to_dict())

    def get_training_architecture_details(self) -> dict[str, Any]:
        return _drop_optional_defaults(super().get_training_architecture_details())


def _drop_optional_defaults(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in _OPTIONAL_DEFAULTS or v != _OPTIONAL_DEFAULTS[k]}


class TrainingJointSAE(JointSAE, TrainingSAE[TrainingJointSAEConfig]):  # type: ignore[misc]
    """Training JSAE.  ``paired_forward_pass`` is the joint objective; ``training_forward_pass`` trains
    the default branch alone, so SAELens's own ``SAETrainer`` can train it as an ordinary SAE."""

    cfg: TrainingJointSAEConfig  # type: ignore[assignment]
    # the ReLU fast path turns sparse once at most this fraction of the codes is active (both modalities); None: by
    # width, sparse_relu.sparse_switch_density (0.2 at 512 -> 4096, 0.07 at 4096 -> 16384: the measured break-evens
    # of the sparse and dense-code steps fall with the weight matrices' size) ...
    sparse_relu_max_density: float | None = None
    # ... and, once sparse, stays sparse up to this multiple of it (hysteresis): an L1-trained SAE's density hovers,
    # and a single switch flipped the path back and forth (the break-even lies near the upper end: 20-25% at
    # 512 -> 4096, ~9% at 4096 -> 16384)
    sparse_relu_stay_factor: float = 1.25

    def __init__(self, cfg: TrainingJointSAEConfig, use_error_term: bool = False):
        super().__init__(cfg, use_error_term)
        # per-modality squared norm of centred inputs, used when mse_normalization == "variance"
        self.register_buffer("mse_scale", torch.ones(len(MODALITIES), dtype=self.dtype, device=self.device))
        self._relu_sparse = False  # whether the previous ReLU fast-path step ran sparse (see _fast_relu_codes)

    def initialize_weights(self) -> None:
        draw = torch_linear_weights if self.cfg.init == "torch-linear" else tied_weights
        self._register_weights(*draw(self.cfg, dtype=self.dtype, device=self.device))
        if self.cfg.decoder_init_norm is not None:
            with torch.no_grad():
                for w in self.unique_params("W_dec"):
                    w.mul_(self.cfg.decoder_init_norm / w.norm(dim=-1, keepdim=True))

    def process_state_dict_for_saving(self, state_dict: dict[str, Any]) -> None:
        state_dict.pop("mse_scale", None)

    def process_state_dict_for_loading(self, state_dict: dict[str, Any]) -> None:
        state_dict.setdefault("mse_scale", torch.ones(len(MODALITIES), dtype=self.dtype, device="cpu"))
        check_state_dict(self, state_dict)

    def save_inference_model(self, path: str | Path) -> tuple[Path, Path]:
        check_finite_state(self, Path(path))
        normalise_hook_metadata(self.cfg.metadata)
        return atomic_save(path, lambda tmp: TrainingSAE.save_inference_model(self, tmp))

    def get_coefficients(self) -> dict[str, float | TrainCoefficientConfig]:
        c = self.cfg
        return {
            "l1": TrainCoefficientConfig(c.l1_coefficient, c.l1_warm_up_steps),
            "alignment": TrainCoefficientConfig(c.alignment_coefficient, c.alignment_warm_up_steps),
            "aux": c.aux_loss_coefficient,
        }

    def encode_with_hidden_pre(self, x: Tensor, modality: str | None = None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        pre = self._pre(x, self._modality(modality))
        return self.hook_sae_acts_post(self._activate(pre)), pre

    def encode(self, x: Tensor, modality: str | None = None) -> Tensor:  # type: ignore[override]
        return JointSAE.encode(self, x, modality)

    def decode(self, feature_acts: Tensor, modality: str | None = None) -> Tensor:  # type: ignore[override]
        return JointSAE.decode(self, feature_acts, modality)

    # ---- the loss: one definition, read by every path -------------------------------------------
    # Every path (the dense reference below, the fast paths of jsae.saes.sparse_relu) produces per modality a
    # BranchCodes; the terms are computed from it here and nowhere else: reconstruction (_scaled_mse), sparsity
    # (_l1), TopK's auxiliary loss (_aux), alignment (_alignment) and their total (_objective).

    def _mean_scale(self, modality: str) -> Tensor:
        """The divisor of a ``loss_reduction="mean"`` reconstruction term: the mean per-element variance under
        ``mse_normalization="variance"``, else ``mse_scale`` (ones)."""
        scale = self.mse_scale[MODALITIES.index(modality)]
        return scale / self.cfg.d_in if self.cfg.mse_normalization == "variance" else scale

    def _scaled_mse(self, recon: Tensor, x: Tensor, modality: str) -> Tensor:
        """The reconstruction term (without its coefficient's warm-up: ``mse_coefficient`` is constant)."""
        # F.mse_loss: one pass forward and one backward (the unfused form took ~6 of each)
        if self.cfg.loss_reduction == "mean":  # ½ · element mean (see TrainingJointSAEConfig)
            return self.cfg.mse_coefficient * (0.5 * F.mse_loss(recon, x)) / self._mean_scale(modality)
        n_samples = max(1, x.numel() // x.shape[-1])  # per-sample sums over d_in, then the mean over samples
        err = F.mse_loss(recon, x, reduction="sum") / n_samples
        return self.cfg.mse_coefficient * err / self.mse_scale[MODALITIES.index(modality)]

    def _l1(self, codes: Tensor, n_samples: int) -> Tensor:
        """The sparsity term (before its coefficient) from the non-negative codes of ``n_samples`` samples, dense
        ``[B, d_sae]`` or only the active values ``[nnz]`` (the same sum): the per-sample sum, or under
        ``loss_reduction="mean"`` ½ · the mean over samples × ``d_sae``."""
        l1 = codes.sum() / n_samples
        return 0.5 * l1 / self.cfg.d_sae if self.cfg.loss_reduction == "mean" else l1

    def aux_selection(self, dead: Tensor) -> tuple[int, float]:
        """``(k_aux, scale)`` of the TopK auxiliary (AuxK) loss for a ``[d_sae]`` dead mask, as SAELens's
        ``TopKTrainingSAE`` (and sparsify) choose them: the top ``k_aux = min(aux_k, n_dead)`` dead latents
        (``aux_k`` defaults to ``d_in // 2``), and the loss scaled by ``min(n_dead / aux_k, 1)`` so a handful
        of dead latents does not get the full weight."""
        base = self.cfg.aux_k or max(1, self.cfg.d_in // 2)
        n_dead = int(dead.sum())
        return min(base, n_dead), min(n_dead / base, 1.0)

    def _uses_aux(self, dead: Tensor | None, coefficients: dict[str, float]) -> bool:
        """Whether this step has a TopK auxiliary term: a TopK SAE, a positive ``aux`` coefficient, dead latents."""
        return (self.cfg.activation == "topk" and dead is not None and coefficients.get("aux", 0.0) > 0
                and bool(dead.any()))

    def _aux(self, aux_recon: Tensor, residual: Tensor, coefficient: float, modality: str) -> Tensor:
        """The TopK auxiliary term: how well the dead latents reconstruct the residual, reduced as the MSE
        (``coefficient`` already holds the :meth:`aux_selection` scale)."""
        if self.cfg.loss_reduction == "mean":
            return coefficient * (0.5 * (aux_recon - residual).pow(2).mean()) / self._mean_scale(modality)
        aux = (aux_recon - residual).pow(2).sum(-1).mean()  # a mean over samples: exact under DDP
        return coefficient * aux / self.mse_scale[MODALITIES.index(modality)]

    def _branch_terms(self, x: Tensor, modality: str, b: BranchCodes, coefficients: dict[str, float]) -> dict[str, Tensor]:
        """One modality's named terms: ``mse_loss_{m}``, then ``l1_loss_{m}`` (ReLU) or
        ``auxiliary_reconstruction_loss_{m}`` (TopK, when it has dead latents)."""
        losses = {f"mse_loss_{modality}": self._scaled_mse(b.sae_out, x, modality)}
        if self.cfg.activation == "relu":
            losses[f"l1_loss_{modality}"] = coefficients["l1"] * self._l1(b.l1_codes, x.shape[0])
        elif b.aux_recon is not None:
            losses[f"auxiliary_reconstruction_loss_{modality}"] = \
                self._aux(b.aux_recon, x - b.sae_out.detach(), coefficients["aux"] * b.aux_scale, modality)
        return losses

    def _alignment(self, vision: BranchCodes, text: BranchCodes, fast: bool = False) -> Tensor:
        """The alignment loss (before its coefficient): from the sparse codes when both paths have them (the loss
        of :data:`~jsae.saes.sparse_relu.SPARSE_ALIGNMENTS`, or a user-registered one on dense codes that carry
        the values' gradient), else from the dense ``feature_acts`` (on a ``fast`` path with the loss of
        :data:`~jsae.saes.sparse_relu.DENSE_ALIGNMENTS` when it has one)."""
        loss, temperature = get_alignment_loss(self.cfg.alignment), self.cfg.infonce_temperature
        if vision.sparse is None or text.sparse is None:
            if fast and self.cfg.alignment in DENSE_ALIGNMENTS:
                loss = DENSE_ALIGNMENTS[self.cfg.alignment]
            return loss(vision.feature_acts, text.feature_acts, temperature=temperature)
        if self.cfg.alignment in SPARSE_ALIGNMENTS:
            return SPARSE_ALIGNMENTS[self.cfg.alignment](*vision.sparse, *text.sparse, temperature=temperature)
        dense_codes = [z.new_zeros(c.shape).index_put((c.rows, c.cols), z) for z, c in (vision.sparse, text.sparse)]
        return loss(*dense_codes, temperature=temperature)

    def _objective(self, vision: Tensor, text: Tensor, codes: dict[str, BranchCodes], coefficients: dict[str, float],
                   path: str, density: float | None = None) -> JointStepOutput:
        """The joint loss ``Σ_m (reconstruction + sparsity or auxiliary) + alignment`` of one paired step."""
        fired = {m: b.fired for m, b in codes.items()}
        out = JointStepOutput(loss=vision.new_zeros(()), losses={}, feature_acts={}, sae_out={}, path=path,
                              density=density, fired=fired if all(f is not None for f in fired.values()) else None)  # type: ignore[arg-type]
        for m, x in zip(MODALITIES, (vision, text)):
            out.losses.update(self._branch_terms(x, m, codes[m], coefficients))
            out.feature_acts[m], out.sae_out[m] = codes[m].feature_acts, codes[m].sae_out
        out.losses["alignment_loss"] = coefficients["alignment"] * self._alignment(codes["vision"], codes["text"],
                                                                                   fast=path != "dense")
        out.loss = sum(out.losses.values())  # type: ignore[assignment]
        return out

    # ---- the paths: each computes a modality's codes and reconstruction, none a loss ----------------
    def _reference_codes(self, x: Tensor, modality: str, dead: Tensor | None, coefficients: dict[str, float]) -> BranchCodes:
        """The reference: plain autograd through :meth:`_pre` (``hook_sae_acts_pre`` called)."""
        pre = self._pre(x, modality)
        acts = F.relu(pre)
        W_dec, b_dec = self._dec(modality).W_dec, self.b_dec_of(modality)
        if self.cfg.activation == "relu":
            return BranchCodes(acts, pre, acts @ W_dec + b_dec, l1_codes=acts)
        top = acts.topk(self.cfg.k, dim=-1, sorted=False)
        z = torch.zeros_like(acts).scatter(-1, top.indices, top.values)
        # sparse decode: k rows of W_dec per sample instead of a dense [B, d_sae] @ [d_sae, d_in]
        recon = F.embedding_bag(top.indices, W_dec, per_sample_weights=top.values, mode="sum") + b_dec
        if not self._uses_aux(dead, coefficients):
            return BranchCodes(z, pre, recon)
        # AuxK as SAELens's TopKTrainingSAE: the top k_aux *pre-activations* (not ReLU'd, so latents whose
        # pre-activation is negative everywhere still get a gradient) among the dead latents reconstruct the
        # detached residual, without b_dec
        k_aux, scale = self.aux_selection(dead)  # type: ignore[arg-type]
        aux = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1, sorted=False)  # type: ignore[operator]
        aux_recon = F.embedding_bag(aux.indices, W_dec, per_sample_weights=aux.values, mode="sum")
        return BranchCodes(z, pre, recon, aux_recon=aux_recon, aux_scale=scale)

    def _encoder_inputs(self, x: Tensor, modality: str) -> tuple[Tensor, Tensor]:
        """``(sae_in, pre)`` without gradient: the one dense matmul of a fast path."""
        with torch.no_grad():
            sae_in = self.process_sae_in(x, modality)
            enc = self._enc(modality)
            return sae_in, torch.addmm(enc.b_enc, sae_in, enc.W_enc)

    def _weights(self, modality: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        enc = self._enc(modality)
        return enc.W_enc, enc.b_enc, self._dec(modality).W_dec, self.b_dec_of(modality)

    def _sparse_topk_codes(self, x: Tensor, modality: str, dead: Tensor | None, coefficients: dict[str, float],
                           sparse_codes: bool) -> BranchCodes:
        """The TopK fast path (:func:`~jsae.saes.sparse_relu.topk_sparse_codes`): the encoder runs without gradient
        and the ``k`` selected entries (and the auxiliary loss's dead ones) get theirs through
        :class:`~jsae.saes.sparse_relu.SparseReluEncoder`.  ``hook_sae_acts_pre`` is not called and ``hidden_pre``
        is detached; with ``sparse_codes`` so are the dense ``feature_acts`` (the alignment reads ``sparse``)."""
        centre = bool(self.cfg.apply_b_dec_to_input)
        sae_in, pre = self._encoder_inputs(x, modality)
        weights = self._weights(modality)
        with one_thread(pre.device.type == "cpu"):  # small ops from here on (see one_thread)
            values, codes, recon = topk_sparse_codes(sae_in, pre, self.cfg.k, *weights, centre)
            z = pre.new_zeros(pre.shape).index_put_((codes.rows, codes.cols), values.detach()) if sparse_codes \
                else pre.new_zeros(pre.shape).index_put((codes.rows, codes.cols), values)
            aux_recon, scale = None, 0.0
            if self._uses_aux(dead, coefficients):
                k_aux, scale = self.aux_selection(dead)  # type: ignore[arg-type]
                aux_recon = sparse_aux_reconstruction(sae_in, pre, dead, k_aux, *weights, centre)  # type: ignore[arg-type]
        fired = codes.latent_counts > 0 if sparse_codes else None
        return BranchCodes(z, pre, recon, aux_recon=aux_recon, aux_scale=scale,
                           sparse=(values, codes) if sparse_codes else None, fired=fired)

    @property
    def sparse_relu_switch(self) -> float:
        """The density at or below which a ReLU step turns sparse: ``sparse_relu_max_density`` when set, else
        :func:`~jsae.saes.sparse_relu.sparse_switch_density` of ``d_in`` and ``d_sae``."""
        if self.sparse_relu_max_density is not None:
            return self.sparse_relu_max_density
        return sparse_switch_density(self.cfg.d_in, self.cfg.d_sae)

    def _fast_relu_codes(self, vision: Tensor, text: Tensor) -> tuple[dict[str, BranchCodes], str, float]:
        """The ReLU fast paths of :mod:`jsae.saes.sparse_relu`.  The encoders run once without gradient; the step runs
        on the active entries (:func:`~jsae.saes.sparse_relu.relu_sparse_pair`, ``"sparse"``) when at most
        :attr:`sparse_relu_switch` of either modality's codes is active (``sparse_relu_stay_factor`` times that if the
        previous step ran sparse: hysteresis), else on dense codes with the encoder backward of
        :class:`~jsae.saes.sparse_relu.EncoderFromPre` (:func:`~jsae.saes.sparse_relu.relu_dense_codes`,
        ``"dense-codes"``).  After a sparse step everything but the encoder matmul runs on one intra-op thread and
        the density comes from the active entries' indices (no separate count).  ``hook_sae_acts_pre`` is not called
        and ``feature_acts`` are detached on the sparse path."""
        centre = bool(self.cfg.apply_b_dec_to_input)
        cpu = vision.device.type == "cpu"
        small = self._relu_sparse and cpu  # expect a sparse step: small ops on one thread
        parallel = cpu and torch.get_num_threads() > 1  # the two modalities' small ops side by side (in_pair)
        inputs = {}
        with torch.no_grad():
            for m, x in zip(MODALITIES, (vision, text)):
                with one_thread(small):
                    sae_in = self.process_sae_in(x, m)
                enc = self._enc(m)
                inputs[m] = sae_in, torch.addmm(enc.b_enc, sae_in, enc.W_enc)  # the one dense matmul

            def find(m: str) -> tuple[Tensor, Tensor | None]:  # the active codes' count decides the path
                pre = inputs[m][1]
                positive = pre > 0
                return positive, active_entries(pre, positive) if small else None

            with one_thread(small):
                (pos_v, act_v), (pos_t, act_t) = in_pair(lambda: find("vision"), lambda: find("text"), small and parallel)
                positive = {"vision": pos_v, "text": pos_t}
                active = {"vision": act_v, "text": act_t} if small else {}
                counts = [a.numel() for a in active.values()] if small else \
                    [int(torch.count_nonzero(p)) for p in positive.values()]
        density = max(counts) / max(1, inputs["vision"][1].numel())
        limit = self.sparse_relu_switch * (self.sparse_relu_stay_factor if self._relu_sparse else 1.0)
        sparse = density <= limit
        self._relu_sparse = sparse
        out = {}
        if sparse:
            with one_thread(cpu):  # small ops (see one_thread), the two modalities side by side where threads allow
                paired = relu_sparse_pair({m: (sae_in, pre, active.get(m)) for m, (sae_in, pre) in inputs.items()},
                                          {m: self._weights(m) for m in inputs}, centre, parallel)
            for m, (values, codes, recon) in paired.items():
                pre = inputs[m][1]  # relu(pre) from here on (codes.dense)
                out[m] = BranchCodes(pre, pre, recon, l1_codes=values, sparse=(values, codes), fired=codes.latent_counts > 0)
        else:
            for m, (sae_in, pre) in inputs.items():
                z, recon = relu_dense_codes(sae_in, pre, *self._weights(m), centre)
                out[m] = BranchCodes(z, pre, recon, l1_codes=z, fired=positive[m].any(0))
        return out, "sparse" if sparse else "dense-codes", density

    def branch_losses(self, x: Tensor, modality: str, coefficients: dict[str, float], dead: Tensor | None,
                      *, dense: bool = False, sparse_codes: bool = False) -> BranchOutput:
        """Reconstruction, sparsity and auxiliary losses of one modality (SAELens's single-modality step).

        TopK runs on its fast path (:func:`~jsae.saes.sparse_relu.topk_sparse_codes`) unless ``dense``; ReLU and
        ``dense`` on the reference (same losses and gradients up to summation order).  With ``sparse_codes``
        the TopK fast path returns ``feature_acts`` without gradient and the differentiable codes in
        ``sparse``."""
        if self.cfg.activation == "topk" and not dense:
            b = self._sparse_topk_codes(x, modality, dead, coefficients, sparse_codes)
        else:
            b = self._reference_codes(x, modality, dead, coefficients)
        return BranchOutput(self._branch_terms(x, modality, b, coefficients), b.feature_acts, b.hidden_pre, b.sae_out,
                            b.sparse)

    def paired_forward_pass(self, vision: Tensor, text: Tensor, coefficients: dict[str, float],
                            dead_neuron_mask: Tensor | None = None, *, dense: bool = False) -> JointStepOutput:
        """The joint objective on a paired batch.

        ``coefficients`` has the current (warmed-up) ``l1``, ``alignment`` and ``aux`` values;
        ``dead_neuron_mask`` is ``[2, d_sae]`` (vision, text) and drives the TopK auxiliary loss.  Unless
        ``dense`` (the plain-autograd reference), a TopK SAE runs on its sparse fast path and a ReLU SAE on
        :meth:`_fast_relu_codes`; every path feeds the same loss (:meth:`_objective`)."""
        dead = dict(zip(MODALITIES, (None, None) if dead_neuron_mask is None else dead_neuron_mask))
        if dense:
            codes = {m: self._reference_codes(x, m, dead[m], coefficients) for m, x in zip(MODALITIES, (vision, text))}
            return self._objective(vision, text, codes, coefficients, "dense")
        if self.cfg.activation == "topk":
            codes = {m: self._sparse_topk_codes(x, m, dead[m], coefficients, True) for m, x in zip(MODALITIES, (vision, text))}
            with one_thread(vision.device.type == "cpu"):
                return self._objective(vision, text, codes, coefficients, "sparse")
        codes, path, density = self._fast_relu_codes(vision, text)
        with one_thread(path == "sparse" and vision.device.type == "cpu"):
            return self._objective(vision, text, codes, coefficients, path, density)

    def training_forward_pass(self, step_input: TrainStepInput) -> TrainStepOutput:
        """Single-modality step (the default branch) for SAELens's ``SAETrainer``."""
        m = self.cfg.default_modality
        coeffs = {"l1": step_input.coefficients.get("l1", self.cfg.l1_coefficient), "aux": step_input.coefficients.get("aux", 0.0)}
        b = self.branch_losses(step_input.sae_in, m, coeffs, step_input.dead_neuron_mask)
        renamed = {k.removesuffix(f"_{m}"): v for k, v in b.losses.items()}
        return TrainStepOutput(
            sae_in=step_input.sae_in, sae_out=b.sae_out, feature_acts=b.feature_acts, hidden_pre=b.hidden_pre,
            loss=sum(renamed.values()), losses=renamed,  # type: ignore[arg-type]
        )

    def calculate_aux_loss(self, step_input, feature_acts, hidden_pre, sae_out):  # type: ignore[no-untyped-def]
        return {}  # folded into training_forward_pass
