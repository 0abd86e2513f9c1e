"""What every part of jsae measures of an SAE the same way (one definition each).

* :func:`fvu` — fraction of variance unexplained, ``Σ‖x − x̂‖² / Σ‖x − mean(x)‖²`` over a batch ``[n, d]``;
  :func:`explained_variance` is ``1 − fvu`` (the trainer's log, the release metrics).
* :func:`summed_unit_rows` — ``Σ_j W[j] / ‖W[j]‖`` over some rows of a decoder: the steering direction of a set
  of latents (the protocol's methods and sweep, the experiments).
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

#: the smallest total variance / row norm divided by (a constant batch or a zero row gives a finite number)
EPS_VARIANCE = 1e-12
EPS_NORM = 1e-8


def fvu(recon: Tensor, x: Tensor) -> Tensor:
    """Fraction of variance unexplained of ``recon`` against ``x`` (both ``[n, d]``), as a 0-d tensor in their
    dtype (pass float64 tensors for a float64 result)."""
    return (recon - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp(min=EPS_VARIANCE)


def explained_variance(recon: Tensor, x: Tensor) -> Tensor:
    """``1 − fvu(recon, x)``."""
    return 1 - fvu(recon, x)


def summed_unit_rows(W: Tensor, rows: Sequence[int] | Tensor) -> Tensor:
    """``Σ_j W[j] / max(‖W[j]‖, 1e-8)`` over ``rows`` of ``W [n, d]`` (detached): the direction of a set of
    latents."""
    picked = W.detach()[rows]
    return (picked / picked.norm(dim=-1, keepdim=True).clamp(min=EPS_NORM)).sum(0)


__all__ = ["EPS_NORM", "EPS_VARIANCE", "explained_variance", "fvu", "summed_unit_rows"]
