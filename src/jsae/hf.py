"""Helpers over transformers and nnsight objects that know no model family (stage 0 of the flow: data, the world's
judges and the adapters use them).

* :func:`unwrap` — the ``torch.nn.Module`` behind an nnsight envoy.  nnsight (0.8) has no public accessor for it,
  so this reads the envoy's documented ``_module`` attribute: the one place jsae touches it.
* :func:`tokenizer_of`, :func:`padding_side` — a processor's tokenizer, and its padding side set for a block.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from torch import nn


def unwrap(model: Any) -> nn.Module:
    """The ``torch.nn.Module`` behind an nnsight envoy (or the module itself)."""
    module = getattr(model, "_module", model)  # nnsight's Envoy keeps it here (no public accessor)
    if not isinstance(module, nn.Module):
        raise TypeError(f"expected an nnsight-wrapped or transformers model, got {type(model).__name__}")
    return module


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer of a processor (a tokenizer is its own)."""
    return getattr(processor, "tokenizer", processor)


@contextlib.contextmanager
def padding_side(processor: Any, side: str) -> Iterator[None]:
    """Set the tokenizer's ``padding_side`` inside the block and restore it after."""
    tok = tokenizer_of(processor)
    before = getattr(tok, "padding_side", None)
    tok.padding_side = side
    try:
        yield
    finally:
        tok.padding_side = before


__all__ = ["padding_side", "tokenizer_of", "unwrap"]
