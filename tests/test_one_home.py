"""What every part of jsae measures the same way has one definition (jsae.saes.metrics, jsae.activations), with
values checked by hand here, and no second copy of the formula elsewhere in the package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import jsae
import jsae.adapters
from jsae.activations import last_position_mask, last_positions
from jsae.saes.metrics import explained_variance, fvu, summed_unit_rows

ROOT = Path(jsae.__file__).resolve().parent
ADAPTERS = Path(jsae.adapters.__file__).resolve().parent


def test_fvu_and_explained_variance_by_hand():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])  # centred variance: 8 + 8 = 16
    recon = x + torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # squared error: 4
    assert float(fvu(recon, x)) == 0.25 and float(explained_variance(recon, x)) == 0.75
    assert fvu(recon.double(), x.double()).dtype == torch.float64
    assert float(fvu(x, x)) == 0.0
    assert torch.isfinite(fvu(x[:1] + 1, x[:1]))  # one sample: zero variance gives a finite number, not inf


def test_summed_unit_rows_by_hand():
    W = torch.tensor([[3.0, 4.0], [0.0, 2.0], [0.0, 0.0], [5.0, 0.0]], requires_grad=True)
    torch.testing.assert_close(summed_unit_rows(W, [0, 1]), torch.tensor([0.6, 1.8]))
    torch.testing.assert_close(summed_unit_rows(W, [2, 3]), torch.tensor([1.0, 0.0]))  # a zero row adds nothing
    assert not summed_unit_rows(W, [0]).requires_grad


def test_last_positions_by_hand():
    m = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert last_positions(m).tolist() == [2, -1, 3]
    assert last_position_mask(m).int().tolist() == [[0, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]]


# the formula's fingerprint, and the files that may hold it (issue 27 owns saebench.py)
COPIES = {
    "FVU": (re.compile(r"\.mean\(0\)\)\.pow\(2\)\.sum\(\)"), {"saes/metrics.py", "releases/saebench.py"}),
    "summed unit decoder rows": (re.compile(r"norm\(dim=-1, keepdim=True\)[^\n]*\)\.sum\(0\)"), {"saes/metrics.py"}),
    "per-token states (a read_layers pass gathered at a mask)":
        (re.compile(r"h\[[^\]]*\.to\(h\.device\)\]|got\[layer\]\[keep\]|states\[img\]"), {"activations.py"}),
    "last position of a mask": (re.compile(r"where\(\w+, \w+, (?:-1|torch\.full_like\(\w+, -1\))\)\.amax"), {"adapters/base.py"}),
    "zlib repetition ratios (zlib_ratio and its reciprocal, the reference's compression_ratio)":
        (re.compile(r"zlib\.compress\("), {"data/judges.py"}),
    "markdown tables (the model card of a hub release is the one renderer outside report/)":
        (re.compile(r"\|---\||\[\"---\"\]"), {"report/markdown.py", "releases/hub.py"}),
    "the default JSAE recipe's schedule": (re.compile(r"lr_warm_up_steps="), {"protocol/methods.py"}),
}


@pytest.mark.parametrize("what", sorted(COPIES))
def test_each_formula_is_written_once(what):
    pattern, allowed = COPIES[what]
    homes = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if pattern.search(p.read_text()))
    homes += sorted(f"adapters/{p.relative_to(ADAPTERS)}" for p in ADAPTERS.rglob("*.py")  # installed as jsae.adapters,
                    if ADAPTERS.parent != ROOT and pattern.search(p.read_text()))  # but kept outside src/jsae
    assert set(homes) <= allowed and homes, f"{what} is written in {homes}; use its one home {sorted(allowed)}"


def test_states_at_gathers_the_masked_positions_of_one_pass():
    from jsae.activations import read_layers, states_at
    from jsae.testing import tiny_vlm

    vlm = tiny_vlm("llava")
    enc = vlm.inputs(2)
    mask = vlm.adapter.image_token_mask(enc)
    full = read_layers(vlm.model, vlm.adapter, enc, [0, 2])
    got = states_at(vlm.model, vlm.adapter, enc, [0, 2], mask)
    assert sorted(got) == [0, 2]
    for layer in (0, 2):
        assert got[layer].dtype == torch.float32 and got[layer].shape == (int(mask.sum()), full[layer].shape[-1])
        torch.testing.assert_close(got[layer], full[layer][mask].float(), rtol=0, atol=0)


def test_default_recipe_is_the_one_every_default_trainer_uses():
    """``jsae sae train``, the protocol and the release builder train by one recipe object, with one learning rate."""
    import dataclasses

    from jsae.cli.sae import TRAIN_DEFAULTS, train_configs
    from jsae.protocol.methods import DEFAULT_RECIPE
    from jsae.protocol.config import ProtocolConfig
    from jsae.releases.build import BuildConfig

    lr = {f.name: f.default for f in dataclasses.fields(BuildConfig)}["lr"]
    assert DEFAULT_RECIPE.lr == 3e-3 == ProtocolConfig(model="llava").lr == lr == TRAIN_DEFAULTS["lr"]
    cfg, tcfg = train_configs(16, preset="default", alignment="cosine", activation="relu", k=32, d_sae=None, steps=None,
                              epochs=None, lr=None, l1_coefficient=0.03, checkpoint_dir=None, seed=0)
    assert cfg == DEFAULT_RECIPE.sae_config(16, TRAIN_DEFAULTS["d_sae"], alignment="cosine", activation="relu", k=32)
    assert tcfg == DEFAULT_RECIPE.trainer_config(TRAIN_DEFAULTS["steps"], seed=0, checkpoint_every=0, checkpoint_dir=None)
    assert (tcfg.lr, tcfg.lr_warm_up_steps, tcfg.lr_decay_steps, tcfg.grad_clip_norm) == (3e-3, 100, 400, None)
    assert (cfg.mse_normalization, cfg.l1_coefficient) == ("variance", 0.03)


def test_default_recipe_trains_at_unit_norm_and_returns_an_sae_of_raw_activations():
    """Training at mean norm sqrt(d_in) makes the recipe blind to the activations' scale: pairs twice as large give
    the same training (a power of two scales exactly) and an SAE whose reconstruction is exactly twice as large."""
    from jsae.protocol.methods import DEFAULT_RECIPE
    from jsae.training.data import PairedTensorData

    g = torch.Generator().manual_seed(0)
    v, t = torch.randn(128, 8, generator=g) * 5 + 1, torch.randn(128, 8, generator=g) * 3
    cfg = DEFAULT_RECIPE.sae_config(8, 16, alignment="cosine")
    tcfg = DEFAULT_RECIPE.trainer_config(30, seed=0, progress=False, log_every=10)
    one = DEFAULT_RECIPE.fit(cfg, tcfg, PairedTensorData(v, t, batch_size=32))
    two = DEFAULT_RECIPE.fit(cfg, tcfg, PairedTensorData(2 * v, 2 * t, batch_size=32))
    assert [h["losses/overall_loss"] for h in one.training_history] == [h["losses/overall_loss"] for h in two.training_history]
    with torch.no_grad():
        torch.testing.assert_close(two(2 * v), 2 * one(v), rtol=1e-6, atol=1e-6)
        assert not torch.allclose(one(v), 2 * one(v))  # the check can fail: the reconstruction is not zero
    assert not one.training and len(one.training_history) == 3


def test_method_names_have_one_registry():
    """The protocol's method names live in ``jsae.report.rundir.METHOD_INFO``; no module lists them again."""
    import ast

    from jsae.protocol.methods import METHODS
    from jsae.report.plots import METHOD_COLOURS
    from jsae.report.rundir import METHOD_INFO

    assert METHODS == tuple(METHOD_INFO) == ("jsae", "jsae-none", "separate", "saelens-topk")
    assert {k: METHOD_COLOURS[k] for k in METHOD_INFO} == {k: m.colour for k, m in METHOD_INFO.items()}
    assert [m for m in METHOD_INFO.values() if m.joint and m.derived_from is None] == [METHOD_INFO["jsae"], METHOD_INFO["jsae-none"]]
    lists = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = {e.value for e in node.elts if isinstance(e, ast.Constant)} & set(METHOD_INFO)
                if len(names) >= 3:
                    lists.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not lists, f"method names listed outside the registry at {lists}; read jsae.report.rundir.METHOD_INFO"
