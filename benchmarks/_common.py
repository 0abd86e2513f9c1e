"""Set-up shared by the overhead benchmarks (run them from the repository root)."""

from __future__ import annotations

from typing import Any

import jsae  # noqa: F401  (before nnsight)
import torch
from nnsight import NNsight

from jsae.adapters import for_model
from jsae.testing import build_hf, tiny_vlm


def wrapped_and_plain(kind: str, layers: int, hidden: int, batch: int) -> tuple[Any, Any, Any, Any, list, list]:
    """(hf, hf_plain, nnsight model, adapter, images, texts).  The baseline runs on an identical copy never
    wrapped by nnsight (wrapping replaces every module's forward with nnsight's dispatcher, which a fair
    baseline must not pay)."""
    hf = build_hf(kind, layers=layers, hidden=hidden)
    hf_plain = build_hf(kind, layers=layers, hidden=hidden)
    assert all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), hf_plain.state_dict().values()))
    model = NNsight(hf)
    images, texts = map(list, zip(*tiny_vlm(kind).pairs(batch)))
    return hf, hf_plain, model, for_model(model), images, texts
