"""Paired activations as the trainer consumes them: :class:`PairedTensorData` (in memory, shuffled per
epoch, with the exact-resume hook ``batches(start)``), :class:`PairedActivations` / :func:`load_pairs` (one
layer of a capture directory) and :func:`check_paired_batch` (one-line errors for malformed batches)."""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch
from jaxtyping import Float
from torch import Tensor

from jsae.guards import shape_checked
from jsae.capture import read_layer


class PairedTensorData:
    """In-memory paired activations served as shuffled batches, deterministic per (seed, epoch).

    ``len()`` is the number of batches per epoch (the last partial batch is dropped); iterating gives one
    epoch (each new ``iter()`` the next epoch); ``batches(start)`` yields from global batch index ``start``
    on, epoch after epoch (the trainer's exact-resume hook).
    """

    @shape_checked
    def __init__(self, vision: Float[Tensor, "n d_in"], text: Float[Tensor, "n d_in"], batch_size: int,
                 shuffle: bool = True, seed: int = 0):
        if not 0 < batch_size <= vision.shape[0]:
            raise ValueError(f"batch_size must be between 1 and the number of pairs ({vision.shape[0]}), got {batch_size}")
        self.vision, self.text, self.batch_size, self.shuffle, self.seed = vision, text, batch_size, shuffle, seed
        self._epoch = 0

    @property
    def d_in(self) -> int:
        return int(self.vision.shape[1])

    def __len__(self) -> int:
        return self.vision.shape[0] // self.batch_size

    def order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.vision.shape[0])
        return torch.randperm(self.vision.shape[0], generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def batches(self, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Batches from global index ``start`` on, forever (batch ``i`` is batch ``i % len`` of epoch ``i // len``)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        n = len(self)
        epoch, offset = divmod(start, n)
        while True:
            order = self.order(epoch)
            for i in range(offset, n):
                idx = order[i * self.batch_size:(i + 1) * self.batch_size]
                yield self.vision[idx], self.text[idx]
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        epoch, self._epoch = self._epoch, self._epoch + 1
        it = self.batches(epoch * len(self))
        return (next(it) for _ in range(len(self)))



def check_paired_batch(batch: Any, d_in: int, index: int) -> tuple[Tensor, Tensor]:
    """One-line errors for malformed paired batches (shape, size mismatch, NaN/inf)."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and all(isinstance(t, Tensor) for t in batch)):
        raise TypeError(f"batch {index} is {type(batch).__name__}; the trainer needs (vision, text) tensor pairs")
    vision, text = batch
    for name, x in (("vision", vision), ("text", text)):
        if x.ndim != 2 or x.shape[1] != d_in:
            raise ValueError(f"batch {index}: {name} has shape {tuple(x.shape)} but the JSAE expects [B, d_in={d_in}]; "
                             "capture the layer the SAE was configured for")
    if vision.shape[0] != text.shape[0]:
        raise ValueError(f"batch {index}: {vision.shape[0]} vision pools but {text.shape[0]} text pools; "
                         "each image needs exactly one caption in the same order")
    for name, x in (("vision", vision), ("text", text)):
        bad = ~torch.isfinite(x)
        if bad.any():
            rows = bad.any(1).nonzero().flatten().tolist()
            raise ValueError(f"batch {index}: {name} has {int(bad.sum())} NaN/inf values in rows {rows[:10]}"
                             f"{' ...' if len(rows) > 10 else ''}; drop or recapture those pairs")
    return vision, text




class PairedActivations(PairedTensorData):
    """Captured ``(vision [B, d_in], text [B, d_in])`` batches of one layer, shuffled per epoch from
    ``seed`` (see :class:`PairedTensorData`), with the capture's ``manifest``.  The layer's vectors are held
    in memory (2 × count × d_in values)."""

    @shape_checked
    def __init__(self, vision: Float[Tensor, "n d_in"], text: Float[Tensor, "n d_in"], batch_size: int,
                 shuffle: bool = True, seed: int = 0, manifest: dict[str, Any] | None = None):
        if vision.shape != text.shape:
            raise ValueError(f"vision {tuple(vision.shape)} and text {tuple(text.shape)} must have the same shape")
        super().__init__(vision, text, batch_size, shuffle, seed)
        self.manifest = manifest or {}


def load_pairs(out_dir: str | os.PathLike[str], layer: int | None = None, *, batch_size: int = 256,
               shuffle: bool = True, seed: int = 0, dtype: torch.dtype = torch.float32,
               allow_incomplete: bool = False) -> PairedActivations:
    """The captured pairs of ``layer`` (default: the only captured layer) as a :class:`PairedActivations`.

    A ``batch_size`` larger than the capture is clamped to the number of pairs, with a warning that says so."""
    vision, text, manifest = read_layer(out_dir, layer, dtype=dtype, allow_incomplete=allow_incomplete)
    if batch_size > vision.shape[0] > 0:
        import warnings

        warnings.warn(f"batch_size {batch_size} is larger than the {vision.shape[0]} captured pairs of {out_dir}; "
                      f"using batches of {vision.shape[0]}", stacklevel=2)
        batch_size = int(vision.shape[0])
    return PairedActivations(vision, text, batch_size, shuffle, seed, manifest)


__all__ = ["PairedActivations", "PairedTensorData", "check_paired_batch", "load_pairs"]
