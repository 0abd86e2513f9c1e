"""Pytest fixtures over the tiny random-config VLMs of :mod:`jsae.testing` (which builds them).

``vlm`` is parametrized over the four kinds, ``vlm2`` over one LLaVA-family and one Qwen-family kind.
The builders are re-exported here, so ``from conftest import tiny_vlm, build_processor, ...`` keeps working.
"""

from __future__ import annotations

import warnings
from typing import Any

import jsae  # noqa: F401  (before nnsight: `import nnsight; import beartype` fails, see report)
import pytest
import torch

from jsae.testing import (  # noqa: F401  (re-exported for the tests)
    CAPTIONS,
    IMAGE_ID,
    IMAGE_SIZES,
    KINDS,
    LLAVA_TEMPLATE,
    QWEN_TEMPLATE,
    VEND_ID,
    VIDEO_ID,
    VSTART_ID,
    WORDS,
    TinyVLM,
    build_hf,
    build_processor,
    make_image,
    make_tokenizer,
    tiny_vlm,
)

warnings.filterwarnings("ignore")
torch.set_num_threads(1)  # tiny models gain nothing from intra-op threads, and the CPU is shared


@pytest.fixture(params=KINDS)
def vlm(request: Any) -> TinyVLM:
    return tiny_vlm(request.param)


@pytest.fixture(params=["llava", "qwen3_vl"])
def vlm2(request: Any) -> TinyVLM:
    """One LLaVA-family and one Qwen-family model, for the slower tests."""
    return tiny_vlm(request.param)


def assert_same_capture(a: Any, b: Any, keys: tuple[str, ...] = ("fingerprint", "plan", "shards", "count", "complete")) -> None:
    """Two capture directories agree: the manifests' ``keys`` equal, and every shard bitwise the same tensors."""
    from pathlib import Path

    from safetensors.torch import load_file

    from jsae.capture import read_manifest

    a, b = Path(a), Path(b)
    ma, mb = read_manifest(a), read_manifest(b)
    for key in keys:
        assert ma[key] == mb[key], key
    for s in ma["shards"]:
        ta, tb = load_file(a / s["file"]), load_file(b / s["file"])
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), s["file"]
