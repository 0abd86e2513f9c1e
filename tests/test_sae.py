"""JointSAE as a SAELens architecture: registration, branches, losses, hooks, save/load, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from sae_lens import SAE, HookedSAETransformer, TrainingSAE
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
from transformer_lens import HookedTransformerConfig

import jsae
from jsae import JointSAE, JointSAEConfig, TrainingJointSAE, TrainingJointSAEConfig
from jsae.saes.alignment import ALIGNMENT_LOSSES, cosine, infonce, l2

VARIANTS = [
    dict(),
    dict(shared_decoder=True),
    dict(shared_encoder=True),
    dict(shared_encoder=True, shared_decoder=True),
    dict(activation="topk", k=4),
]


def make(d_in=12, d_sae=40, seed=0, **kw) -> TrainingJointSAE:
    torch.manual_seed(seed)
    sae = TrainingJointSAE(TrainingJointSAEConfig(d_in=d_in, d_sae=d_sae, **kw))
    with torch.no_grad():  # non-trivial biases so that every parameter matters
        for p in sae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return sae


# ---- registration ---------------------------------------------------------------------------------


def test_registered_in_both_saelens_registries():
    assert SAE_CLASS_REGISTRY["jsae"] == (JointSAE, JointSAEConfig)
    assert SAE_TRAINING_CLASS_REGISTRY["jsae"] == (TrainingJointSAE, TrainingJointSAEConfig)


@pytest.mark.slow
def test_reimport_is_idempotent():
    import importlib

    importlib.reload(jsae)  # re-registration must not raise
    jsae._register()
    assert SAE_CLASS_REGISTRY["jsae"][0].__name__ == "JointSAE"
    code = "import jsae, importlib; importlib.reload(jsae); jsae._register(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"


# ---- branches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", VARIANTS)
def test_branches_match_manual_computation(kw):
    sae = make(**kw)
    x = torch.randn(5, 12)
    for m in jsae.MODALITIES:
        W_enc, b_enc, W_dec, b_dec = sae.W_enc_of(m), sae.b_enc_of(m), sae.W_dec_of(m), sae.b_dec_of(m)
        pre = (x - b_dec) @ W_enc + b_enc
        z = F.relu(pre)
        if sae.cfg.activation == "topk":
            top = z.topk(sae.cfg.k, dim=-1)
            z = torch.zeros_like(z).scatter(-1, top.indices, top.values)
            assert ((sae.encode(x, m) > 0).sum(-1) <= sae.cfg.k).all()
        torch.testing.assert_close(sae.encode(x, m), z)
        torch.testing.assert_close(sae.decode(z, m), z @ W_dec + b_dec)
        torch.testing.assert_close(sae(x, m), z @ W_dec + b_dec)
    # sharing is real sharing, separate is separate
    assert (sae.W_enc_of("vision") is sae.W_enc_of("text")) == kw.get("shared_encoder", False)
    assert (sae.W_dec_of("vision") is sae.W_dec_of("text")) == kw.get("shared_decoder", False)
    assert sae.b_dec_of("vision") is not sae.b_dec_of("text")


def test_default_modality_is_text_and_saelens_names_follow_it():
    sae = make()
    x = torch.randn(3, 12)
    assert torch.equal(sae.encode(x), sae.encode(x, "text"))
    assert sae.W_dec is sae.W_dec_of("text") and sae.W_enc is sae.W_enc_of("text")
    vis = make(default_modality="vision")
    assert torch.equal(vis(x), vis(x, "vision"))
    assert not torch.equal(sae.encode(x, "vision"), sae.encode(x, "text"))


def test_state_dict_layout_uses_modality_prefixes():
    keys = set(make().state_dict()) - {"mse_scale"}
    assert keys == {f"{m}.{p}" for m in ("vision", "text") for p in ("W_enc", "b_enc", "W_dec", "b_dec")}
    shared = set(make(shared_encoder=True, shared_decoder=True).state_dict()) - {"mse_scale"}
    assert shared == {"shared.W_enc", "shared.b_enc", "shared.W_dec", "vision.b_dec", "text.b_dec"}


# ---- losses ---------------------------------------------------------------------------------------


def test_alignment_losses_values():
    zv = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    zt = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    assert cosine(zv, zt).item() == pytest.approx(0.5)  # pair 0 identical, pair 1 orthogonal
    assert l2(zv, zt).item() == pytest.approx((0 + 4 + 9) / 2)
    # InfoNCE by hand: logits = cos / T
    T = 0.5
    cos = F.normalize(zv, dim=-1) @ F.normalize(zt, dim=-1).T
    logits = cos / T
    manual = 0.5 * (-(logits.log_softmax(1).diag().mean()) - logits.log_softmax(0).diag().mean())
    assert infonce(zv, zt, temperature=T).item() == pytest.approx(manual.item(), rel=1e-6)
    assert ALIGNMENT_LOSSES["none"](zv, zt).item() == 0.0
    assert set(ALIGNMENT_LOSSES) == {"cosine", "infonce", "l2", "none"}


def test_paired_forward_pass_combines_paper_losses():
    sae = make()  # paper defaults: MSE 1.0, L1 0.03, cosine 1.0
    v, t = torch.randn(6, 12), torch.randn(6, 12)
    out = sae.paired_forward_pass(v, t, {"l1": 0.03, "alignment": 1.0, "aux": 0.0})
    zv, zt = sae.encode(v, "vision"), sae.encode(t, "text")
    expected = {
        "mse_loss_vision": (sae.decode(zv, "vision") - v).pow(2).sum(-1).mean(),
        "mse_loss_text": (sae.decode(zt, "text") - t).pow(2).sum(-1).mean(),
        "l1_loss_vision": 0.03 * zv.sum(-1).mean(),
        "l1_loss_text": 0.03 * zt.sum(-1).mean(),
        "alignment_loss": (1 - F.cosine_similarity(zv, zt, dim=-1)).mean(),
    }
    assert set(out.losses) == set(expected)
    for k, v_ in expected.items():
        torch.testing.assert_close(out.losses[k], v_, msg=k)
    torch.testing.assert_close(out.loss, sum(expected.values()))
    out.loss.backward()
    assert sae.W_enc_of("vision").grad is not None and sae.W_enc_of("text").grad is not None


def test_variance_normalised_mse_and_none_alignment():
    sae = make(mse_normalization="variance", alignment="none")
    sae.mse_scale.copy_(torch.tensor([2.0, 4.0]))
    v, t = torch.randn(6, 12), torch.randn(6, 12)
    out = sae.paired_forward_pass(v, t, {"l1": 0.0, "alignment": 1.0, "aux": 0.0})
    raw = (sae(v, "vision") - v).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses["mse_loss_vision"], raw / 2.0)
    assert out.losses["alignment_loss"].item() == 0.0


def test_topk_aux_loss_uses_dead_latents_only():
    sae = make(activation="topk", k=3)
    v, t = torch.randn(8, 12), torch.randn(8, 12)
    coeffs = {"l1": 0.0, "alignment": 0.0, "aux": 1.0}
    no_dead = sae.paired_forward_pass(v, t, coeffs, torch.zeros(2, 40, dtype=torch.bool))
    assert not any(k.startswith("auxiliary") for k in no_dead.losses)
    dead = torch.zeros(2, 40, dtype=torch.bool)
    dead[0, :20] = True
    out = sae.paired_forward_pass(v, t, coeffs, dead)
    assert "auxiliary_reconstruction_loss_vision" in out.losses and "auxiliary_reconstruction_loss_text" not in out.losses
    out.losses["auxiliary_reconstruction_loss_vision"].backward()
    grad = sae.W_dec_of("vision").grad
    assert grad[20:].abs().sum() == 0 and grad[:20].abs().sum() > 0  # only dead latents' rows learn


@pytest.mark.parametrize("n_dead", [3, 6, 25])
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "sparse"])
def test_topk_aux_loss_equals_saelens_topk_training_sae(n_dead, dense):
    """AuxK has SAELens's semantics and defaults: a real ``TopKTrainingSAE`` with the JSAE's vision weights
    gives the same MSE + auxiliary loss and the same gradients, for a few dead latents (scale n_dead / (d_in // 2)
    = 0.5), exactly d_in // 2 and many (k_aux capped at d_in // 2)."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    sae = make(activation="topk", k=3)  # d_in 12: k_aux = 6
    assert sae.cfg.aux_loss_coefficient == 1.0
    ref = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=12, d_sae=40, k=3, rescale_acts_by_decoder_norm=False))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(ref, name).copy_(getattr(sae.vision, name))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 12, generator=g)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.randperm(40, generator=g)[:n_dead]] = True
    out = ref.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=dead,
                                                   n_training_steps=0, is_logging_step=False))
    out.loss.backward()
    b = sae.branch_losses(x, "vision", {"l1": 0.0, "aux": sae.cfg.aux_loss_coefficient}, dead, dense=dense)
    torch.testing.assert_close(b.losses["mse_loss_vision"], out.losses["mse_loss"])
    torch.testing.assert_close(b.losses["auxiliary_reconstruction_loss_vision"], out.losses["auxiliary_reconstruction_loss"])
    assert sae.aux_selection(dead) == (min(n_dead, 6), min(n_dead / 6, 1.0))
    sum(b.losses.values()).backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(sae.vision, name).grad, getattr(ref, name).grad, atol=1e-6, rtol=1e-5, msg=name)


# ---- SAELens hooks --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hooked():
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(n_layers=2, d_model=12, n_ctx=16, d_head=4, n_heads=3, d_vocab=40, act_fn="relu",
                                  d_mlp=24, normalization_type="LN")
    return HookedSAETransformer(cfg).eval()


@pytest.mark.parametrize("kw", [dict(), dict(activation="topk", k=4)])
def test_attaches_to_hooked_sae_transformer_with_error_term(tiny_hooked, kw):
    sae = make(**kw).eval()
    sae.cfg.metadata.hook_name = "blocks.0.hook_resid_post"
    tokens = torch.randint(0, 40, (2, 10))
    clean = tiny_hooked(tokens)
    tiny_hooked.add_sae(sae, use_error_term=True)
    try:
        with_sae, cache = tiny_hooked.run_with_cache(tokens)
        torch.testing.assert_close(with_sae, clean, atol=1e-5, rtol=1e-5)
        acts = cache["blocks.0.hook_resid_post.hook_sae_acts_post"]
        assert acts.shape == (2, 10, 40) and (acts > 0).any()
    finally:
        tiny_hooked.reset_saes()
    tiny_hooked.add_sae(sae, use_error_term=False)  # without the error term the SAE really edits
    try:
        assert not torch.allclose(tiny_hooked(tokens), clean, atol=1e-4)
    finally:
        tiny_hooked.reset_saes()
    torch.testing.assert_close(tiny_hooked(tokens), clean)


# ---- save / load ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", VARIANTS)
def test_save_load_bitwise_through_saelens(tmp_path, kw):
    sae = make(**kw)
    sae.cfg.metadata.model_name, sae.cfg.metadata.hook_name = "toy-llava", "model.language_model.layers.4"
    sae.cfg.metadata.layer, sae.cfg.metadata.pooling = 4, "mean"
    sae.save_model(tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == "jsae"
    assert {k: cfg["metadata"][k] for k in ("model_name", "layer", "hook_name", "hf_hook_name", "pooling", "modalities")} == {
        "model_name": "toy-llava", "layer": 4, "hook_name": "blocks.4.hook_out", "hf_hook_name": "model.language_model.layers.4",
        "pooling": "mean", "modalities": ["vision", "text"]}
    x = torch.randn(4, 12)
    for loader, training in ((SAE.load_from_disk, False), (TrainingSAE.load_from_disk, True),
                             (JointSAE.load_from_disk, False)):
        loaded = loader(tmp_path / "sae")
        assert isinstance(loaded, JointSAE)
        assert isinstance(loaded, TrainingSAE) == training
        for m in jsae.MODALITIES:
            assert torch.equal(loaded(x, m), sae(x, m))
            assert torch.equal(loaded.encode(x, m), sae.encode(x, m))
    inference = tmp_path / "inference"
    sae.save_inference_model(inference)
    assert type(SAE.load_from_disk(inference)) is JointSAE
    assert sorted(os.listdir(tmp_path)) == ["inference", "sae"]  # no temporary leftovers


def _fake_hf_cache(cache: Path, repo_id: str, folder: str, sae: JointSAE) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    sae.save_model(repo / "snapshots" / commit / folder)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_from_pretrained_local_release_and_saelens_cached_lookup(tmp_path):
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    sae = make(activation="topk", k=4)
    sae.save_model(tmp_path / "rel" / "layer_4")
    jsae.releases.register_release("jsae-test-local", repo_id=str(tmp_path / "rel"), model="toy",
                                   conversion_func="jsae_local", saes=[{"id": "layer_4", "path": "layer_4", "l0": 4}])
    try:
        x = torch.randn(3, 12)
        a = JointSAE.from_pretrained("jsae-test-local")  # one SAE: sae_id may be omitted
        b = SAE.from_pretrained("jsae-test-local", "layer_4")
        assert type(a) is JointSAE and type(b) is JointSAE
        assert torch.equal(a(x, "vision"), sae(x, "vision")) and torch.equal(b(x), sae(x))
        get_pretrained_saes_directory.cache_clear()  # survives SAELens's cache being rebuilt
        assert "jsae-test-local" in get_pretrained_saes_directory()
        assert torch.equal(SAE.from_pretrained("jsae-test-local", "layer_4")(x), sae(x))
        with pytest.raises(ValueError, match="has no SAE 'layer_9'"):
            JointSAE.from_pretrained("jsae-test-local", "layer_9")
        with pytest.raises(ValueError, match="unknown release 'jsae-test-lokal'.*did you mean"):
            JointSAE.from_pretrained("jsae-test-lokal")
    finally:
        jsae.releases.unregister_release("jsae-test-local")


@pytest.mark.slow
def test_from_pretrained_offline_from_hf_cache(tmp_path):
    sae = make()
    _fake_hf_cache(tmp_path / "hub", "jsae-org/jsae-toy", "layer_2", sae)
    sae.save_model(tmp_path / "expected")
    code = f"""
import torch, jsae
from sae_lens import SAE
jsae.releases.register_release("jsae-test-hub", repo_id="jsae-org/jsae-toy", model="toy",
                               saes=[{{"id": "layer_2", "path": "layer_2"}}], recipe="jsae train --layer 2")
a = jsae.JointSAE.from_pretrained("jsae-test-hub")
b = SAE.load_from_disk({str(tmp_path / "expected")!r})
x = torch.randn(3, 12)
assert torch.equal(a(x, "vision"), b(x, "vision")) and torch.equal(a(x), b(x))
jsae.releases.register_release("jsae-test-missing", repo_id="jsae-org/not-cached", model="toy",
                               saes=[{{"id": "l", "path": "l"}}], recipe="jsae train --layer 16")
try:
    jsae.JointSAE.from_pretrained("jsae-test-missing")
except RuntimeError as e:
    print("ERR", e)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    err = [line for line in out.stdout.splitlines() if line.startswith("ERR")]
    assert err and "'jsae-test-missing'" in err[0] and "jsae train --layer 16" in err[0]


# ---- bad input ------------------------------------------------------------------------------------


def test_bad_config_values():
    with pytest.raises(ValueError, match="k=50 must be between 1 and d_sae=40"):
        JointSAEConfig(d_in=12, d_sae=40, activation="topk", k=50)
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        JointSAEConfig(d_in=12, d_sae=40, activation="gelu")
    with pytest.raises(ValueError, match="unknown alignment loss 'cka'.*cosine"):
        TrainingJointSAEConfig(d_in=12, d_sae=40, alignment="cka")
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        JointSAEConfig(d_in=12, d_sae=40, default_modality="audio")


def test_bad_inputs_at_encode():
    sae = make()
    with pytest.raises(ValueError, match="last dimension 7 but this JSAE has d_in=12"):
        sae.encode(torch.randn(2, 7), "vision")
    with pytest.raises(ValueError, match="unknown modality 'audio'"):
        sae.encode(torch.randn(2, 12), "audio")
    with pytest.raises(ValueError, match="unknown modality 'image'"):
        sae.W_dec_of("image")


def _saved(tmp_path: Path, **kw) -> Path:
    d = tmp_path / "sae"
    make(**kw).save_model(d)
    return d


def test_load_errors_are_one_line_and_specific(tmp_path):
    d = _saved(tmp_path)
    with pytest.raises(FileNotFoundError, match="no cfg.json in"):
        JointSAE.load_from_disk(tmp_path / "nowhere")
    cfg = json.loads((d / "cfg.json").read_text())
    (d / "cfg.json").write_text(json.dumps({**cfg, "architecture": "topk"}))
    with pytest.raises(ValueError, match="holds a 'topk' SAE, not a 'jsae' one"):
        JointSAE.load_from_disk(d)
    (d / "cfg.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_sae"}))
    with pytest.raises(ValueError, match=r"lacks the field\(s\) \['d_sae'\]"):
        JointSAE.load_from_disk(d)
    (d / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 41}))
    with pytest.raises(ValueError, match="do not fit this JSAE config"):
        SAE.load_from_disk(d)  # through plain SAELens too
    (d / "cfg.json").write_text(json.dumps(cfg))
    data = (d / "sae_weights.safetensors").read_bytes()
    (d / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        JointSAE.load_from_disk(d)
    (d / "sae_weights.safetensors").write_bytes(b"\x00" * 3 + data[3:200])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        JointSAE.load_from_disk(d)


def test_failed_save_leaves_nothing_behind(tmp_path):
    sae = make()
    sae.save_model(tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()}

    def half_written(tmp):
        tmp.mkdir(parents=True)
        (tmp / "sae_weights.safetensors").write_bytes(b"partial")
        raise OSError("killed mid-write")

    from jsae.saes.sae_files import atomic_save

    with pytest.raises(OSError, match="killed mid-write"):
        atomic_save(tmp_path / "sae", half_written)
    assert {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]


@pytest.mark.parametrize("kw", VARIANTS)
def test_folding_a_norm_scaling_factor_keeps_the_function(kw):
    """Train at a scaled norm, fold the scale in: the SAE then takes raw activations."""
    sae = make(**kw)
    x, s = 40 * torch.randn(5, 12), 0.05
    codes = {m: sae.encode(x * s, m) for m in jsae.MODALITIES}
    outs = {m: sae(x * s, m) / s for m in jsae.MODALITIES}
    sae.fold_activation_norm_scaling_factor(s)
    for m in jsae.MODALITIES:
        torch.testing.assert_close(sae.encode(x, m), codes[m], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(sae(x, m), outs[m], atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_import_registers_without_parsing_saelens_release_yaml_or_importing_nnsight():
    """``import jsae`` registers the architecture and the releases only: SAELens's ~170-release YAML is
    not parsed (its cache stays empty) and nnsight is not imported; the first load merges the releases."""
    code = """
import sys, jsae
from sae_lens.loading import pretrained_saes_directory as d
from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY
original = d.get_pretrained_saes_directory.__jsae_wrapped__
print("cache", original.cache_info().currsize, "nnsight", "nnsight" in sys.modules)
print("registered", "jsae" in SAE_CLASS_REGISTRY and "jsae" in SAE_TRAINING_CLASS_REGISTRY)
print("releases", "jsae-shapes-llava-l4" in jsae.releases.RELEASES, "jsae-vista-toy-llava-text-sae" in jsae.releases.RELEASES)
from sae_lens import SAE
sae = SAE.from_pretrained("jsae-shapes-llava-l4")   # the design card's one-argument call
print("loaded", type(sae).__name__, original.cache_info().currsize, "jsae-shapes-llava-l4" in original())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert "cache 0 nnsight False" in lines
    assert "registered True" in lines and "releases True True" in lines
    assert "loaded JointSAE 1 True" in lines


def test_one_argument_from_pretrained_needs_a_single_sae_release():
    with pytest.raises(ValueError, match="has 3 SAEs; pass sae_id"):
        SAE.from_pretrained("jsae-vista-toy-llava-text-sae")


def test_saelens_yaml_has_only_saelens_keys_and_loads_back():
    import yaml

    from jsae.releases.registry import SAELENS_RELEASE_KEYS, SAELENS_SAE_KEYS, saelens_yaml

    data = yaml.safe_load(saelens_yaml())
    assert "jsae-shapes-llava-l4" in data and "jsae-llava-l16" in data
    for name, entry in data.items():
        assert set(entry) <= set(SAELENS_RELEASE_KEYS) | {"saes"} and {"repo_id", "model", "saes"} <= set(entry)
        assert all(set(s) <= set(SAELENS_SAE_KEYS) and {"id", "path"} <= set(s) for s in entry["saes"])
    (s,) = data["jsae-shapes-llava-l4"]["saes"]
    assert s["l0"] > 0 and 0 < s["variance_explained"] <= 1
    with pytest.raises(ValueError, match="unknown release"):
        saelens_yaml(["jsae-nope"])


@pytest.mark.slow
def test_jsae_and_nnsight_import_in_either_order():
    """jsae's shape checks do not use beartype (which cannot be imported once nnsight mounts ``.save`` on every
    object), so both orders work (the nnsight-first order, with SAELens's evals, is tested in test_nnsight_native)."""
    for order in ("import nnsight, jsae", "import jsae, nnsight"):
        out = subprocess.run([sys.executable, "-c", f"{order}; print(jsae.JointSAE.__name__)"], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "JointSAE", out.stderr[-500:]
