"""Synthetic paired data, the recovery metrics, the Hungarian baseline, the alignment benchmark (small)
and the sparse TopK training kernels."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import jsae  # noqa: F401  (registers the architecture)
from jsae.saes.alignment import cosine
from jsae.training.recipes import hungarian_match
from jsae.saes.sparse_relu import SPARSE_ALIGNMENTS, topk_codes
from jsae.saes.joint_sae import TrainingJointSAE, TrainingJointSAEConfig
from jsae.protocol.synthetic import PairedSyntheticConfig, PairedSyntheticData, recovery_metrics
from jsae.correlation import correlation_matrix
from jsae.training import PairedTensorData

ROOT = Path(__file__).resolve().parents[1]


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- the generator ---------------------------------------------------------------------------------


def test_generator_is_deterministic_and_seeded():
    a = PairedSyntheticData(seed=3).sample(100, seed=1)
    b = PairedSyntheticData(seed=3).sample(100, seed=1)
    c = PairedSyntheticData(seed=3).sample(100, seed=2)
    d = PairedSyntheticData(seed=4).sample(100, seed=1)
    for name in ("vision", "text", "shared", "vision_private", "text_private"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.shared, c.shared)
    assert not torch.equal(a.vision, d.vision)


def test_generator_follows_its_model():
    cfg = PairedSyntheticConfig(d_in=32, n_shared=8, n_private=4, shared_firing_prob=0.2, noise_std=0.05, seed=1)
    gen = PairedSyntheticData(cfg)
    p = gen.sample(4000, seed=0)
    assert p.vision.shape == p.text.shape == (4000, 32)
    assert p.shared.shape == (4000, 8) and p.vision_private.shape == p.text_private.shape == (4000, 4)
    # shared concepts fire in both modalities of a pair (one ground truth), at about the set rate
    assert abs(float((p.shared > 0).double().mean()) - 0.2) < 0.02
    assert bool((p.shared >= 0).all())
    # the residual after removing the model's signal is the noise
    res_v = p.vision - p.shared @ gen.vision_shared_dirs - p.vision_private @ gen.vision_private_dirs - gen.vision_offset
    res_t = p.text - p.shared @ gen.text_shared_dirs - p.text_private @ gen.text_private_dirs - gen.text_offset
    assert abs(float(res_v.std()) - 0.05) < 0.005 and abs(float(res_t.std()) - 0.05) < 0.005
    # one modality's directions are orthonormal (12 <= 32), the two modalities' directions differ
    vis = torch.cat([gen.vision_shared_dirs, gen.vision_private_dirs])
    assert torch.allclose(vis @ vis.T, torch.eye(12), atol=1e-5)
    assert float(gen.direction_cosines().abs().max()) < 0.8


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.9, -0.5])
def test_direction_cosine_is_exact(rho):
    gen = PairedSyntheticData(d_in=24, n_shared=6, n_private=2, direction_cosine=rho)
    assert torch.allclose(gen.direction_cosines(), torch.full((6,), rho), atol=1e-5)
    assert torch.allclose(gen.text_shared_dirs.norm(dim=-1), torch.ones(6), atol=1e-5)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="probability"):
        PairedSyntheticConfig(shared_firing_prob=1.5)
    with pytest.raises(ValueError, match="direction_cosine"):
        PairedSyntheticConfig(direction_cosine=2.0)


def test_to_data_serves_the_sample():
    gen = PairedSyntheticData(d_in=16, n_shared=4, n_private=2)
    data = gen.to_data(64, batch_size=16, seed=5)
    assert isinstance(data, PairedTensorData) and len(data) == 4
    v, t = next(iter(data))
    assert v.shape == t.shape == (16, 16)
    ref = gen.sample(64, seed=5)
    assert torch.equal(torch.sort(data.vision[:, 0]).values, torch.sort(ref.vision[:, 0]).values)


# ---- metrics and matching --------------------------------------------------------------------------


def test_correlation_matrix_matches_numpy_and_handles_constant_columns():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 3, generator=g), torch.randn(50, 4, generator=g)
    b[:, 3] = 2.0  # constant column
    c = correlation_matrix(a, b)
    import numpy as np

    ref = np.corrcoef(a.numpy().T, b[:, :3].numpy().T)[:3, 3:]
    assert np.allclose(c[:, :3].numpy(), ref, atol=1e-10)
    assert torch.all(c[:, 3] == 0)


def test_recovery_metrics_on_ground_truth_codes_and_a_scrambled_text_side():
    gen = PairedSyntheticData(d_in=32, n_shared=8, n_private=4, shared_firing_prob=0.1, private_firing_prob=0.1)
    p = gen.sample(3000, seed=0)
    z_v = torch.cat([p.shared, p.vision_private, torch.zeros(3000, 4)], 1)  # 4 dead latents
    z_t = torch.cat([p.shared, torch.zeros(3000, 4), p.text_private], 1)
    m = recovery_metrics(z_v, z_t, p.shared)
    assert m["shared_recovery"] == pytest.approx(1.0)
    assert m["best_latent_per_concept"] == list(range(8))
    assert m["dead_vision"] == 4 and m["dead_text"] == 4
    assert m["l0_vision"] == pytest.approx(float(((p.shared > 0).sum(1) + (p.vision_private > 0).sum(1)).double().mean()))
    # a scrambled text side: latent j no longer means the same concept in both modalities
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    scrambled = z_t[:, perm]
    assert recovery_metrics(z_v, scrambled, p.shared)["shared_recovery"] < 0.5
    # Hungarian matching on code correlations undoes the scramble for every shared concept
    match, corr = hungarian_match(z_v, scrambled)
    assert torch.equal(perm[match[:8]], torch.arange(8))
    assert bool((corr[:8] > 0.99).all())
    assert recovery_metrics(z_v, scrambled, p.shared, text_permutation=match)["shared_recovery"] == pytest.approx(1.0)


def test_code_agreement_and_fvu_definitions():
    z_v = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    z_t = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    x = torch.tensor([[1.0, 1.0], [3.0, 1.0], [2.0, 4.0]])
    m = recovery_metrics(z_v, z_t, torch.tensor([[1.0], [0.0], [0.0]]), x, x, x + 1.0, x)
    assert m["code_agreement"] == pytest.approx(1.0 / 3.0)  # cos 1, 0, and 0 for the all-zero code
    # FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2 = 6 / (2 + 6)
    assert m["fvu_vision"] == pytest.approx(6.0 / 8.0) and m["fvu_text"] == 0.0


# ---- the benchmark, small: alignment beats no alignment ------------------------------------------


@pytest.mark.slow
def test_alignment_beats_none_on_shared_concept_recovery(one_thread):
    bench = _load_benchmark("synthetic_recovery")
    out = bench.run(d_in=32, n_shared=12, n_private=6, d_sae=64, steps=400, batch=128, lr=2e-3, l1=0.1,
                    n_train=8192, n_test=2048, verbose=False)
    r = {m: v["shared_recovery"] for m, v in out["results"].items()}
    assert set(r) == set(bench.METHODS)
    for aligned in ("jsae-cosine", "jsae-infonce", "separate+hungarian"):
        assert r[aligned] > r["jsae-none"] + 0.4, r
    assert out["results"]["jsae-cosine"]["code_agreement"] > out["results"]["jsae-none"]["code_agreement"] + 0.4
    for m in out["results"].values():
        assert 0.0 <= m["fvu_vision"] < 0.5 and 0.0 <= m["fvu_text"] < 0.5
        assert m["l0_vision"] > 0 and m["l0_text"] > 0
    assert "jsae-cosine" in bench.format_table(out)


# ---- sparse TopK kernels -------------------------------------------------------------------------


def _perturbed_topk_sae(alignment: str = "cosine", **kw) -> TrainingJointSAE:
    torch.manual_seed(0)
    sae = TrainingJointSAE(TrainingJointSAEConfig(d_in=16, d_sae=64, activation="topk", k=4, alignment=alignment, **kw))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae


def _grads(sae: TrainingJointSAE) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("with_dead", [False, True])
def test_sparse_branch_losses_match_the_dense_reference(with_dead):
    sae = _perturbed_topk_sae()
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    dead = None
    if with_dead:
        dead = torch.zeros(64, dtype=torch.bool)
        dead[::3] = True
    coefficients = {"l1": 0.0, "aux": 0.5, "alignment": 1.0}
    outs = []
    for dense in (True, False):  # the dense reference, then the sparse TopK path
        sae.zero_grad()
        losses, z, _, recon, _ = sae.branch_losses(x, "text", coefficients, dead, dense=dense)
        sum(losses.values()).backward()
        outs.append(({k: float(v.detach()) for k, v in losses.items()}, z.detach(), recon.detach(), _grads(sae)))
    (l0, z0, r0, g0), (l1, z1, r1, g1) = outs
    assert set(l0) == set(l1) and all(math.isclose(l0[k], l1[k], rel_tol=1e-5) for k in l0)
    assert ("auxiliary_reconstruction_loss_text" in l0) == with_dead
    assert torch.allclose(z0, z1, atol=1e-6) and torch.allclose(r0, r1, atol=1e-5)
    assert set(g0) == set(g1)
    for name in g0:
        assert torch.allclose(g0[name], g1[name], atol=1e-5), name


def test_sparse_cosine_alignment_equals_dense_cosine():
    """The TopK path's cosine on sparse codes (``SPARSE_ALIGNMENTS["cosine"]``), with pairs that share all their
    latents and an all-zero code, equals the dense cosine and its gradient."""
    g = torch.Generator().manual_seed(2)
    B, M, k = 20, 30, 5
    iv = torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(B)])
    it = torch.stack([torch.randperm(M, generator=g)[:k] for _ in range(B)])
    it[:5] = iv[:5]  # some pairs share all latents
    vv, vt = torch.rand(B, k, generator=g), torch.rand(B, k, generator=g)
    vv[0] = 0.0  # an all-zero code
    zv, zt = torch.zeros(B, M).scatter(-1, iv, vv), torch.zeros(B, M).scatter(-1, it, vt)
    # pre-activations whose top k are exactly the chosen entries
    (codes_v, val_v), (codes_t, val_t) = (topk_codes(torch.full((B, M), -1.0).scatter(-1, i, v), k)
                                          for i, v in ((iv, vv), (it, vt)))
    val_v, val_t = val_v.requires_grad_(), val_t.requires_grad_()
    sparse = SPARSE_ALIGNMENTS["cosine"](val_v, codes_v, val_t, codes_t)
    zv.requires_grad_(), zt.requires_grad_()
    dense = cosine(zv, zt)
    assert float(sparse.detach()) == pytest.approx(float(dense.detach()), abs=1e-6)
    sparse.backward(), dense.backward()
    torch.testing.assert_close(val_v.grad, zv.grad[codes_v.rows, codes_v.cols], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(val_t.grad, zt.grad[codes_t.rows, codes_t.cols], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("alignment", ["cosine", "infonce"])
def test_sparse_paired_pass_matches_the_dense_reference(alignment):
    sae = _perturbed_topk_sae(alignment)
    g = torch.Generator().manual_seed(3)
    v, t = torch.randn(24, 16, generator=g), torch.randn(24, 16, generator=g)
    coefficients = {"l1": 0.0, "aux": 0.1, "alignment": 1.0}
    outs = []
    for dense in (True, False):
        sae.zero_grad()
        out = sae.paired_forward_pass(v, t, coefficients, None, dense=dense)
        out.loss.backward()
        outs.append((float(out.loss.detach()), {k: float(x.detach()) for k, x in out.losses.items()}, _grads(sae)))
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-5)
    assert outs[0][1].keys() == outs[1][1].keys()
    for name in outs[0][2]:
        assert torch.allclose(outs[0][2][name], outs[1][2][name], atol=1e-5), name


def test_train_separate_saes_trains_two_independent_branches_and_pairs_them(one_thread):
    from jsae.training.recipes import separate_config, train_separate_saes
    from jsae.training.trainer import JointTrainerConfig

    gen = PairedSyntheticData(d_in=16, n_shared=4, n_private=2, shared_firing_prob=0.2)
    p = gen.sample(1024, seed=0)
    cfg = TrainingJointSAEConfig(d_in=16, d_sae=16, alignment="cosine", shared_encoder=True)
    assert separate_config(cfg).alignment == "none" and not separate_config(cfg).shared_encoder
    sae, perm = train_separate_saes(cfg, JointTrainerConfig(total_steps=30, lr=1e-3, progress=False),
                                    PairedTensorData(p.vision, p.text, 128), p.vision, p.text)
    assert sae.cfg.alignment == "none" and not sae.cfg.shared_encoder
    assert sae.W_enc_of("vision") is not sae.W_enc_of("text")
    assert sorted(perm.tolist()) == list(range(16))
