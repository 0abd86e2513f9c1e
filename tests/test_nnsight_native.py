"""nnsight users, first class: jsae imports after nnsight, ``load_vlm`` returns a model whose own ``trace`` and
``generate`` contexts work, SAE features can be edited inside the user's own ``model.generate`` trace, and a
release's labels have a public accessor."""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Mapping

import pytest
import torch
from jaxtyping import Float
from torch import Tensor

from jsae.guards import TypeCheckError, check_types, typechecked


def test_import_nnsight_then_jsae() -> None:
    """The order most nnsight scripts use; nnsight's ``.save`` mount still works after jsae's import."""
    code = ("import nnsight, torch\nimport jsae, sys\n"
            "assert 'beartype' not in sys.modules\n"
            "assert hasattr(torch.ones(1), 'save') and hasattr(object(), 'save')\n"
            "sae = jsae.JointSAE.from_pretrained('jsae-shapes-llava-l4')\n"
            "try:\n    sae.encode(torch.ones(2, 3))\nexcept ValueError as e:\n    print('checked:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "checked: activations have last dimension 3 but this JSAE has d_in=128" in out.stdout


def test_check_types_accepts_and_rejects() -> None:
    @typechecked
    def f(x: Float[Tensor, "n d"], y: Float[Tensor, "n"] | None = None, m: Mapping[str, Any] | None = None,
          *rest: int) -> Float[Tensor, "d"]:
        return x.sum(0)

    assert torch.equal(f(torch.ones(2, 3)), torch.full((3,), 2.0))
    f(torch.ones(2, 3), torch.ones(2), {"a": 1}, 1, 2)
    for bad in [(torch.ones(2, 3), torch.ones(3)),                 # n bound to 2 by x, 3 here
                (torch.ones(2, 3, dtype=torch.long),),              # not float
                (torch.ones(2, 3), None, [1]),                     # not a mapping
                (torch.ones(2, 3), None, None, 1, "two")]:         # *rest holds a str
        with pytest.raises(Exception) as e:
            f(*bad)
        assert "TypeCheckError" in type(e.value).__name__

    @check_types
    def g(x: int) -> str:
        return x  # type: ignore[return-value]

    with pytest.raises(TypeCheckError, match="must return"):
        g(1)
    with pytest.raises(TypeCheckError, match="x must be"):
        g("1")  # type: ignore[arg-type]
