"""Pearson correlation of columns: the one implementation, used by feature labelling
(:mod:`jsae.labels`), the separate-SAE matching (:mod:`jsae.training.recipes`) and the synthetic recovery
benchmark (:mod:`jsae.protocol.synthetic`)."""

from __future__ import annotations

from torch import Tensor


def correlation_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of every column of ``a`` [N, p] with every column of ``b`` [N, q] -> [p, q].

    Computed in float64; a column with zero variance correlates 0 with everything.
    """
    a = a.double() - a.double().mean(0)
    b = b.double() - b.double().mean(0)
    na, nb = a.norm(dim=0), b.norm(dim=0)
    c = (a.T @ b) / (na[:, None] * nb[None, :]).clamp(min=1e-30)
    c[na < 1e-12] = 0.0
    c[:, nb < 1e-12] = 0.0
    return c


__all__ = ["correlation_matrix"]
