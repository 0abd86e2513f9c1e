"""Paired two-modality synthetic data with known ground truth, and the metrics that score a JSAE on it.

The generative model (in the spirit of ``sae_lens.synthetic``: sparse non-negative feature activations
times a feature dictionary, plus noise) has three groups of features:

* ``n_shared`` **shared concepts**.  Concept ``c`` fires in a pair with probability
  ``shared_firing_prob`` and then, with the same magnitude ``a_c``, in *both* modalities, but along a
  *different* direction in each: ``u_c`` in vision and ``v_c`` in text.  arXiv 2606.29888 ("Same
  Concept, Different Directions") shows that real VLM features behave like this.  By default
  (``direction_cosine=None``) the two directions are independent random unit vectors, so they are
  nearly orthogonal (``|cos| ~ 1/sqrt(d_in)``); a float sets ``cos(u_c, v_c)`` exactly for every concept.
* ``n_private`` **vision-private** and ``n_private`` **text-private** features, which fire
  independently in their modality only (probability ``private_firing_prob``).
* a per-modality **offset** (the modality mean, of norm ``offset_norm``) and isotropic Gaussian noise
  of standard deviation ``noise_std`` per coordinate.

So ``vision = a_shared @ U + a_vprivate @ P_v + offset_v + noise`` and likewise for text.  The
directions of one modality are orthonormal when ``n_shared + n_private <= d_in`` (QR of a Gaussian
matrix), random unit vectors otherwise (with ``direction_cosine`` set, the text shared directions are
the exact-cosine mixtures and so only approximately orthogonal to the other text directions).  Magnitudes are ``max(0, N(magnitude_mean, magnitude_std))``
where a feature fires; ``modality_jitter`` > 0 multiplies a shared concept's magnitude by an
independent ``exp(N(0, modality_jitter))`` in each modality (the ground truth stays the un-jittered
``a_c``).  Everything is drawn from ``torch.Generator``s seeded by ``cfg.seed`` (the dictionary) and
the ``seed`` of each :meth:`PairedSyntheticData.sample` call, so data are bit-for-bit reproducible.

Metrics (:func:`recovery_metrics`), all on held-out pairs:

* **shared-concept recovery**: for each true shared concept ``c`` and each latent ``j``,
  ``score_cj = min(corr(z_v[:, j], a_c), corr(z_t[:, j], a_c))`` (Pearson over pairs; a constant
  column has correlation 0); ``recovery_c = max_j score_cj``; the reported figure is the mean over
  concepts.  A latent only scores if it tracks the concept in *both* modalities.
* **paired code agreement**: mean over pairs of ``cos(z_v, z_t)`` (0 for a pair where either code is
  all zero).
* **FVU** per modality: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``.
* **L0** per modality: mean number of non-zero latents per vector.
* **dead latents** per modality: latents that never fire on the held-out pairs.

For two SAEs trained separately, pass ``text_permutation`` (from
:func:`jsae.baselines.hungarian_match`) so that latent ``j`` of the pair is (vision latent ``j``, text
latent ``perm[j]``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from jsae.correlation import correlation_matrix
from jsae.saes.metrics import fvu

__all__ = [
    "PairedSyntheticConfig",
    "PairedSyntheticData",
    "SyntheticPairs",
    "evaluate_sae",
    "recovery_metrics",
]


@dataclass
class PairedSyntheticConfig:
    """Shape and statistics of the generative model (see the module docstring)."""

    d_in: int = 64
    n_shared: int = 32
    n_private: int = 16
    shared_firing_prob: float = 0.05
    private_firing_prob: float = 0.05
    magnitude_mean: float = 1.0
    magnitude_std: float = 0.25
    direction_cosine: float | None = None
    modality_jitter: float = 0.0
    offset_norm: float = 1.0
    noise_std: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.n_shared <= 0 or self.n_private < 0:
            raise ValueError(f"need d_in > 0, n_shared > 0, n_private >= 0; got {self.d_in}, {self.n_shared}, {self.n_private}")
        for name in ("shared_firing_prob", "private_firing_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be a probability, got {getattr(self, name)}")
        if self.direction_cosine is not None and not -1.0 <= self.direction_cosine <= 1.0:
            raise ValueError(f"direction_cosine must be in [-1, 1] or None, got {self.direction_cosine}")
        if min(self.magnitude_std, self.noise_std, self.modality_jitter, self.offset_norm) < 0:
            raise ValueError("magnitude_std, noise_std, modality_jitter and offset_norm must be >= 0")


@dataclass
class SyntheticPairs:
    """One sample of pairs and its ground truth."""

    vision: Tensor  # [N, d_in]
    text: Tensor  # [N, d_in]
    shared: Tensor  # [N, n_shared]   ground-truth shared-concept activations a_c
    vision_private: Tensor  # [N, n_private]
    text_private: Tensor  # [N, n_private]

    def __len__(self) -> int:
        return self.vision.shape[0]


def _unit_rows(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _directions(n: int, d: int, gen: torch.Generator) -> Tensor:
    """``n`` unit rows in R^d: orthonormal when ``n <= d``, random unit vectors otherwise."""
    g = torch.randn(d, n, generator=gen, dtype=torch.float64)
    if n <= d:
        q, r = torch.linalg.qr(g)
        return (q * torch.sign(torch.diagonal(r))).T.contiguous()  # sign fix: a deterministic basis
    return _unit_rows(g.T)


class PairedSyntheticData:
    """The generator: fixed dictionaries (from ``cfg.seed``), :meth:`sample` draws pairs."""

    def __init__(self, cfg: PairedSyntheticConfig | None = None, **overrides: Any):
        cfg = cfg or PairedSyntheticConfig()
        if overrides:
            cfg = PairedSyntheticConfig(**{**asdict(cfg), **overrides})
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        n_s, n_p, d = cfg.n_shared, cfg.n_private, cfg.d_in
        vis = _directions(n_s + n_p, d, gen)
        txt = _directions(n_s + n_p, d, gen)
        u, v = vis[:n_s], txt[:n_s]
        if cfg.direction_cosine is not None:
            rho = cfg.direction_cosine
            # exact cosine: v_c = rho u_c + sqrt(1 - rho^2) w_c, with w_c the part of a random direction orthogonal to u_c
            w = _unit_rows(v - (v * u).sum(-1, keepdim=True) * u)
            v = rho * u + math.sqrt(max(0.0, 1.0 - rho * rho)) * w
        self.vision_shared_dirs = u.float()  # [n_shared, d_in]
        self.text_shared_dirs = _unit_rows(v).float()
        self.vision_private_dirs = vis[n_s:].float()  # [n_private, d_in]
        self.text_private_dirs = txt[n_s:].float()
        offsets = _unit_rows(torch.randn(2, d, generator=gen, dtype=torch.float64)) * cfg.offset_norm
        self.vision_offset, self.text_offset = offsets[0].float(), offsets[1].float()

    # ---- sampling ------------------------------------------------------------------------------
    def _acts(self, n: int, k: int, p: float, gen: torch.Generator) -> Tensor:
        c = self.cfg
        fires = torch.rand(n, k, generator=gen) < p
        mags = (c.magnitude_mean + c.magnitude_std * torch.randn(n, k, generator=gen)).clamp(min=0.0)
        return mags * fires

    def sample(self, n: int, seed: int = 0) -> SyntheticPairs:
        """``n`` pairs with their ground truth; the same ``(cfg, n, seed)`` gives the same tensors."""
        if n <= 0:
            raise ValueError(f"n must be positive, got {n}")
        c = self.cfg
        gen = torch.Generator().manual_seed(1_000_003 * (seed + 1) + c.seed)
        shared = self._acts(n, c.n_shared, c.shared_firing_prob, gen)
        vpriv = self._acts(n, c.n_private, c.private_firing_prob, gen)
        tpriv = self._acts(n, c.n_private, c.private_firing_prob, gen)
        sv, st = shared, shared
        if c.modality_jitter > 0:
            sv = shared * torch.exp(c.modality_jitter * torch.randn(n, c.n_shared, generator=gen))
            st = shared * torch.exp(c.modality_jitter * torch.randn(n, c.n_shared, generator=gen))
        vision = sv @ self.vision_shared_dirs + vpriv @ self.vision_private_dirs + self.vision_offset
        text = st @ self.text_shared_dirs + tpriv @ self.text_private_dirs + self.text_offset
        if c.noise_std > 0:
            vision = vision + c.noise_std * torch.randn(n, c.d_in, generator=gen)
            text = text + c.noise_std * torch.randn(n, c.d_in, generator=gen)
        return SyntheticPairs(vision, text, shared, vpriv, tpriv)

    def to_data(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True) -> Any:
        """``n`` pairs as a :class:`jsae.training.PairedTensorData` (shuffled with ``seed``)."""
        from jsae.training import PairedTensorData

        pairs = self.sample(n, seed)
        return PairedTensorData(pairs.vision, pairs.text, batch_size, shuffle=shuffle, seed=seed)

    def direction_cosines(self) -> Tensor:
        """``cos(u_c, v_c)`` for every shared concept (``[n_shared]``)."""
        return (self.vision_shared_dirs * self.text_shared_dirs).sum(-1)


# ================================================================================================
# Metrics
# ================================================================================================


def recovery_metrics(
    z_vision: Tensor,
    z_text: Tensor,
    shared: Tensor,
    vision: Tensor | None = None,
    text: Tensor | None = None,
    recon_vision: Tensor | None = None,
    recon_text: Tensor | None = None,
    text_permutation: Tensor | None = None,
) -> dict[str, Any]:
    """The benchmark's metrics from held-out codes (see the module docstring for the definitions).

    ``text_permutation[j]`` is the text latent paired with vision latent ``j`` (separately trained
    SAEs); by default latent ``j`` is paired with latent ``j``.  FVU needs the inputs and
    reconstructions; it is omitted when they are not given.
    """
    if text_permutation is not None:
        z_text = z_text[:, text_permutation]
    corr_v = correlation_matrix(shared, z_vision)  # [n_shared, d_sae]
    corr_t = correlation_matrix(shared, z_text)
    score = torch.minimum(corr_v, corr_t)
    per_concept, best = score.max(dim=1)
    agreement = F.cosine_similarity(z_vision.double(), z_text.double(), dim=-1, eps=1e-12)
    out: dict[str, Any] = {
        "shared_recovery": float(per_concept.mean()),
        "shared_recovery_min": float(per_concept.min()),
        "shared_recovered_frac_0.9": float((per_concept > 0.9).double().mean()),
        "code_agreement": float(agreement.mean()),
        "best_latent_per_concept": best.tolist(),
    }
    for name, z in (("vision", z_vision), ("text", z_text)):
        fired = z != 0
        out[f"l0_{name}"] = float(fired.double().sum(-1).mean())
        out[f"dead_{name}"] = int((~fired.any(0)).sum())
    for name, x, r in (("vision", vision, recon_vision), ("text", text, recon_text)):
        if x is not None and r is not None:
            out[f"fvu_{name}"] = float(fvu(r.double(), x.double()))
    return out


@torch.no_grad()
def evaluate_sae(sae: Any, pairs: SyntheticPairs, text_permutation: Tensor | None = None) -> dict[str, Any]:
    """:func:`recovery_metrics` of a (Training)JointSAE on held-out ``pairs``."""
    was_training = getattr(sae, "training", False)
    sae.eval()
    try:
        z_v, r_v = sae.encode_decode(pairs.vision, "vision")
        z_t, r_t = sae.encode_decode(pairs.text, "text")
    finally:
        sae.train(was_training)
    return recovery_metrics(z_v, z_t, pairs.shared, pairs.vision, pairs.text, r_v, r_t, text_permutation)
