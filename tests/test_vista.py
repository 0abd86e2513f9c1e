"""VISTA: the projector loss, the matching rate and localisation, patch-local edits, bad inputs, CLI.

Real objects throughout: the shipped toy LLaVA and the shipped text-SAE release
(``jsae-vista-toy-llava-text-sae``, SAELens TopK SAEs trained on its plain-text caption activations)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import jsae  # noqa: F401
from jsae.vista import VistaConfig, check_projector, check_text_sae, load_text_sae, recon_error_on_images, train_projector
from jsae.adapters import layer_of_hook
from jsae.vista.core import _batches
from jsae.vista.metrics import (edit_interventions, label_latents_from_words, localisation_scores,
                                matching_scores, object_cells, patch_edit, ratio_interval)
from jsae.vista.experiment import RELEASE

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world():
    from jsae import load_vlm
    from jsae.world import world_dataset

    model, processor, adapter = load_vlm("llava")
    ds = world_dataset("validation", 48, 0)
    return model, processor, adapter, ds


@pytest.fixture(scope="module")
def sae4():
    return load_text_sae(RELEASE, "model.language_model.layers.4")


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


# ---- the VISTA loss ---------------------------------------------------------------------------


@pytest.mark.slow
def test_vista_loss_lowers_text_sae_error_on_image_tokens(world, sae4):
    model, processor, adapter, ds = world
    images, caps = [ex["image"] for ex in ds], [ex["captions"][0] for ex in ds]
    train_i, train_c, held_i, held_c = images[:32], caps[:32], images[32:], caps[32:]
    held = _batches(adapter, processor, held_i, held_c, 16)
    init = {k: v.clone() for k, v in check_projector(adapter).state_dict().items()}
    errs = {}
    try:
        for lam in (0.0, 5.0):
            check_projector(adapter).load_state_dict(init)  # same init for both
            hist = train_projector(model, processor, adapter, {4: sae4}, train_i, train_c,
                                   VistaConfig(lam=lam, layers=(4,), steps=6, batch_size=16, reinit=False), progress=False)
            assert len(hist["history"]) >= 2
            errs[lam] = recon_error_on_images(model, adapter, {4: sae4}, held)
    finally:
        check_projector(adapter).load_state_dict(init)
    # the text SAE reconstructs the image tokens better after VISTA training than after λ = 0 training
    assert errs[5.0][4] < errs[0.0][4] - 0.02, errs
    # only the projector was trained
    assert all(not p.requires_grad for p in sae4.parameters())


def test_reinit_is_deterministic(world):
    from jsae.vista import reinit_projector

    _, _, adapter, _ = world
    proj = check_projector(adapter)
    init = {k: v.clone() for k, v in proj.state_dict().items()}
    try:
        reinit_projector(adapter, 3)
        a = {k: v.clone() for k, v in proj.state_dict().items()}
        reinit_projector(adapter, 3)
        assert all(torch.equal(a[k], v) for k, v in proj.state_dict().items())
        assert not torch.equal(a["linear_1.weight"], init["linear_1.weight"])
    finally:
        proj.load_state_dict(init)


# ---- matching rate and localisation ---------------------------------------------------------------


def test_matching_rate_on_a_constructed_example():
    # 4 latents: 0 'red', 1 'cat', 2 unlabelled, 3 'fish'
    labels = ["red", "cat", None, "fish"]
    codes = torch.tensor([
        [3.0, 2.0, 1.0, 0.0],  # top-2 = {0, 1}: red, cat both present -> 2/2
        [0.0, 5.0, 4.0, 0.0],  # top-2 = {1, 2}: cat present, 2 unlabelled -> 1/2
        [1.0, 0.0, 0.0, 0.0],  # only one active latent (red, absent) -> 0/2
        [0.0, 0.0, 0.0, 2.0],  # fish present, second slot inactive -> 1/2
    ])
    present = [{"red", "cat", "animal"}, {"cat"}, {"blue"}, {"fish", "animal"}]
    np.testing.assert_allclose(matching_scores(codes, labels, present, k=2), [1.0, 0.5, 0.0, 0.5])
    np.testing.assert_allclose(matching_scores(codes, labels, present, k=1), [1.0, 1.0, 0.0, 1.0])
    r = ratio_interval(np.array([1.0, 0.5, 0.5]), np.array([0.5, 0.25, 0.25]))
    assert r["ratio"] == pytest.approx(2.0) and r["low"] == pytest.approx(2.0)
    with pytest.raises(ValueError) as exc:
        matching_scores(codes, labels[:3], present, k=2)
    assert "one label" in _one_line(exc)


def test_localisation_on_a_constructed_example():
    labels = ["red", "cat", None]
    # 2x2 grid: object A (red cat) at patches 0,1; object B (blue fish) at patch 3; patch 2 background
    objs = [[{"name": "cat", "category": "animal", "color": "red", "mask": [1, 1, 0, 0]},
             {"name": "fish", "category": "animal", "color": "blue", "mask": [0, 0, 0, 1]}]]
    z = torch.zeros(1, 4, 3)
    z[0, 0, 0] = 1.0   # red on A: hit
    z[0, 1, 2] = 9.0   # only the unlabelled latent is active on A's second patch: miss
    z[0, 3, 1] = 1.0   # cat on B (a fish): miss
    np.testing.assert_allclose(localisation_scores(z, labels, objs), [1 / 3])


def test_labels_from_the_words_latents_fire_on():
    words = ["a", "red", "cat", "at", "a", "blue", "fish", "red"]
    codes = torch.zeros(len(words), 3)
    for t, w in enumerate(words):
        codes[t, 0] = float(w == "red")
        codes[t, 1] = float(w in ("cat", "fish"))  # fires on animal words
        codes[t, 2] = float(w == "a")
    labs = label_latents_from_words(codes, words, ["cat", "fish", "animal", "red", "blue"])
    assert labs == ["red", "animal", None]


# ---- patch-local edits ------------------------------------------------------------------------------


def _states(model, adapter, enc, layer, ctx=None):
    from contextlib import nullcontext

    from jsae.adapters import unwrap

    got = []
    with (ctx or nullcontext()), torch.no_grad():  # the edit hook first, so the capture sees its output
        h = adapter.layer_module(layer).register_forward_hook(lambda m, a, o: got.append(o[0] if isinstance(o, tuple) else o))
        try:
            unwrap(model)(**adapter.model_kwargs(enc))
        finally:
            h.remove()
    return got[0]


def test_patch_edits_touch_only_the_object_tokens(world, sae4):
    from jsae.interventions import Patches, intervene

    model, processor, adapter, ds = world
    ex = next(e for e in ds if len(e["objects"]) >= 2)
    enc = adapter.build_inputs(processor, [ex["image"]], [ex["caption"]])
    obj = ex["objects"][0]
    cells = object_cells(obj, 6)
    pos = Patches.per_prompt([cells]).mask(adapter.patch_grid(enc))
    assert int(pos.sum()) == len(cells) == sum(obj["mask"])
    z0 = sae4.encode(_states(model, adapter, enc, 4)[pos]).detach()
    active = (z0 > 0).any(0)
    zero = active[None].clone()  # zero every latent active on the object: a large edit
    setv = torch.full((1, zero.shape[1]), float("nan"))
    before = _states(model, adapter, enc, 4)
    after = _states(model, adapter, enc, 4, intervene(model, patch_edit(4, sae4, [cells], zero, setv), enc, adapter))
    changed = (after - before).abs().amax(-1) > 1e-6
    assert changed.any()
    assert torch.equal(changed, pos)  # exactly the object's patches, bit for bit elsewhere
    # the same edit through jsae's public interventions (Ablate on jsae.Patches) gives the same states
    feats = active.nonzero().flatten().tolist()
    with intervene(model, edit_interventions(4, sae4, cells, feats), enc, adapter):
        via_api = _states(model, adapter, enc, 4)
    torch.testing.assert_close(via_api, after, atol=1e-5, rtol=1e-5)


# ---- bad input ----------------------------------------------------------------------------------------


def test_text_sae_of_the_wrong_width(world):
    from sae_lens import StandardSAE, StandardSAEConfig

    _, _, adapter, _ = world
    sae = StandardSAE(StandardSAEConfig(d_in=64, d_sae=32))
    with pytest.raises(ValueError) as exc:
        check_text_sae(sae, adapter, 4)
    assert "d_in=64" in _one_line(exc) and "hidden size is 128" in str(exc.value)


def test_text_sae_of_another_layer(world, sae4):
    _, _, adapter, _ = world
    check_text_sae(sae4, adapter, 4)
    with pytest.raises(ValueError) as exc:
        check_text_sae(sae4, adapter, 2)
    assert "model.language_model.layers.4" in _one_line(exc) and "not layer 2" in str(exc.value)
    assert layer_of_hook("blocks.12.hook_resid_post") == 12 and layer_of_hook("model.layers.3") == 3


def test_negative_lambda():
    with pytest.raises(ValueError) as exc:
        VistaConfig(lam=-0.5)
    assert "must be >= 0" in _one_line(exc)


def test_adapter_without_projector(world):
    from jsae.adapters import LlavaAdapter

    model, _, _, _ = world

    class NoProjector(LlavaAdapter):
        @property
        def projector(self):
            return None

    class Raising(LlavaAdapter):
        @property
        def projector(self):
            raise NotImplementedError("this family maps vision features inside the LM")

    for cls in (NoProjector, Raising):
        with pytest.raises(ValueError) as exc:
            check_projector(cls(model))
        assert "no visual projector" in _one_line(exc)


def test_cli_bad_inputs(tmp_path):
    from jsae.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["vista", "eval", "--run", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "jsae vista train" in r.output
    r = runner.invoke(app, ["vista", "train", "--out", str(tmp_path / "x"), "--lam", "-1", "--layers", "4"])
    assert r.exit_code == 2 and "must be >= 0" in r.output
    r = runner.invoke(app, ["vista", "train", "--out", str(tmp_path / "x"), "--layers", "4,x"])
    assert r.exit_code == 2 and "comma-separated" in r.output
