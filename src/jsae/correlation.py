"""Pearson correlation of columns: the one implementation, used by feature labelling
(:mod:`jsae.labels`), the separate-SAE matching (:mod:`jsae.training.recipes`) and the synthetic recovery
benchmark (:mod:`jsae.protocol.synthetic`)."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
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


def presence_matrix(items: Sequence[Iterable[str]], names: Sequence[str]) -> Tensor:
    """[N, C] float 0/1: whether item ``i`` (a set of concepts or words) holds ``names[c]`` (others ignored)."""
    index = {c: i for i, c in enumerate(names)}
    y = torch.zeros(len(items), len(names))
    for i, cs in enumerate(items):
        for c in cs:
            if c in index:
                y[i, index[c]] = 1.0
    return y


__all__ = ["correlation_matrix", "presence_matrix"]
