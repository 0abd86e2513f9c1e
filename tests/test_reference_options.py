"""The JSAE reference code's choices as options: mean loss reduction, torch-linear init, no input centring,
no decoder-norm constraint, the plateau scheduler, epochs, best-epoch selection, exact resume of all of it,
and the ``reference_configs`` preset."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jsae import TrainingJointSAE, TrainingJointSAEConfig
from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData
from jsae.training.recipes import REFERENCE_BATCH_SIZE, reference_configs
from jsae.testing import pairs_with


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


pairs = pairs_with(n=64, d=8, rank=3)  # the shared synthetic pairs (jsae.testing)


def sae_of(cfg: TrainingJointSAEConfig, seed: int = 0) -> TrainingJointSAE:
    torch.manual_seed(seed)
    return TrainingJointSAE(cfg)


def _grads(sae):
    return {n: p.grad.detach().clone() for n, p in sae.named_parameters() if p.grad is not None}


# ---- loss reduction -------------------------------------------------------------------------------

V = [[1.0, -0.5, 2.0], [0.25, 1.5, -1.0]]
T = [[-0.5, 1.0, 0.5], [2.0, 0.0, 1.0]]


def _hand_reference_loss(sae: TrainingJointSAE) -> float:
    """The reference objective, in plain Python over lists (no torch reductions):
    ½(MSE_v+MSE_t) + 0.03·½(mean|z_v|+mean|z_t|) + 1·(1 − mean_b cos(z_v, z_t)), element means throughout."""
    def branch(x, m):
        W_enc, b_enc = sae.W_enc_of(m).tolist(), sae.b_enc_of(m).tolist()
        W_dec, b_dec = sae.W_dec_of(m).tolist(), sae.b_dec_of(m).tolist()
        d_in, d_sae = len(W_enc), len(b_enc)
        zs, sq = [], 0.0
        for row in x:
            z = [max(0.0, sum(row[i] * W_enc[i][j] for i in range(d_in)) + b_enc[j]) for j in range(d_sae)]
            recon = [sum(z[j] * W_dec[j][i] for j in range(d_sae)) + b_dec[i] for i in range(d_in)]
            sq += sum((recon[i] - row[i]) ** 2 for i in range(d_in))
            zs.append(z)
        mse = sq / (len(x) * d_in)
        l1 = sum(abs(v) for z in zs for v in z) / (len(x) * d_sae)
        return mse, l1, zs

    mse_v, l1_v, zv = branch(V, "vision")
    mse_t, l1_t, zt = branch(T, "text")
    cos = []
    for a, b in zip(zv, zt):
        dot = sum(x * y for x, y in zip(a, b))
        na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
        cos.append(dot / max(na * nb, 1e-8))
    return 0.5 * (mse_v + mse_t) + 0.03 * 0.5 * (l1_v + l1_t) + 1.0 * (1.0 - sum(cos) / len(cos))


def _coefficients(sae):
    c = sae.get_coefficients()
    return {"l1": c["l1"][0], "alignment": c["alignment"][0], "aux": c["aux"]}


def test_mean_reduction_is_the_reference_loss_by_hand_and_by_torch():
    sae_cfg, _ = reference_configs(3, 5)
    sae = sae_of(sae_cfg)
    v, t = torch.tensor(V), torch.tensor(T)
    out = sae.paired_forward_pass(v, t, _coefficients(sae))
    assert set(out.losses) == {"mse_loss_vision", "mse_loss_text", "l1_loss_vision", "l1_loss_text", "alignment_loss"}
    assert float(out.loss.detach()) == pytest.approx(_hand_reference_loss(sae), rel=1e-6, abs=1e-7)
    # and the reference's own torch formula, with its nn.Linear modules holding the same weights: value and gradients
    ref = {}
    for m in ("vision", "text"):
        enc, dec = nn.Linear(3, 5), nn.Linear(5, 3)
        with torch.no_grad():
            enc.weight.copy_(sae.W_enc_of(m).T), enc.bias.copy_(sae.b_enc_of(m))
            dec.weight.copy_(sae.W_dec_of(m).T), dec.bias.copy_(sae.b_dec_of(m))
        ref[m] = (enc, dec)
    zv, zt = F.relu(ref["vision"][0](v)), F.relu(ref["text"][0](t))
    loss = (F.mse_loss(ref["vision"][1](zv), v) + F.mse_loss(ref["text"][1](zt), t)) / 2.0 \
        + 0.03 * (zv.abs().mean() + zt.abs().mean()) / 2.0 + 1.0 * (1.0 - F.cosine_similarity(zv, zt).mean())
    torch.testing.assert_close(out.loss, loss)
    out.loss.backward()
    loss.backward()
    for m in ("vision", "text"):
        enc, dec = ref[m]
        torch.testing.assert_close(sae.W_enc_of(m).grad, enc.weight.grad.T)
        torch.testing.assert_close(sae.b_enc_of(m).grad, enc.bias.grad)
        torch.testing.assert_close(sae.W_dec_of(m).grad, dec.weight.grad.T)
        torch.testing.assert_close(sae.b_dec_of(m).grad, dec.bias.grad)


def test_mean_is_the_sum_divided_by_size_and_modalities():
    v, t = pairs(6, 8)
    coeffs = {"l1": 0.03, "alignment": 1.0, "aux": 0.0}
    for norm in ("none", "variance"):
        s = sae_of(TrainingJointSAEConfig(d_in=8, d_sae=20, mse_normalization=norm))
        m = sae_of(TrainingJointSAEConfig(d_in=8, d_sae=20, mse_normalization=norm, loss_reduction="mean"))
        for sae in (s, m):
            sae.mse_scale.copy_(torch.tensor([2.0, 4.0]))
        a, b = s.paired_forward_pass(v, t, coeffs).losses, m.paired_forward_pass(v, t, coeffs).losses
        div = 2.0 if norm == "variance" else 2.0 * 8  # variance: both are fractions of variance unexplained
        for mod in ("vision", "text"):
            torch.testing.assert_close(b[f"mse_loss_{mod}"], a[f"mse_loss_{mod}"] / div)
            torch.testing.assert_close(b[f"l1_loss_{mod}"], a[f"l1_loss_{mod}"] / (2.0 * 20))
        torch.testing.assert_close(b["alignment_loss"], a["alignment_loss"])


@pytest.mark.parametrize("centred", [True, False])
def test_sparse_topk_branch_matches_dense_under_mean(centred):
    sae = sae_of(TrainingJointSAEConfig(d_in=8, d_sae=24, activation="topk", k=3, loss_reduction="mean",
                                        init="torch-linear", apply_b_dec_to_input=centred))
    g = torch.Generator().manual_seed(3)
    v, t = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    dead = torch.zeros(2, 24, dtype=torch.bool)
    dead[:, ::3] = True
    coeffs = {"l1": 0.0, "alignment": 1.0, "aux": 0.5}
    outs = []
    for dense in (True, False):
        sae.zero_grad()
        out = sae.paired_forward_pass(v, t, coeffs, dead, dense=dense)
        out.loss.backward()
        outs.append(({k: float(x.detach()) for k, x in out.losses.items()}, _grads(sae)))
    (l0, g0), (l1, g1) = outs
    assert "auxiliary_reconstruction_loss_vision" in l0 and l0.keys() == l1.keys()
    for k in l0:
        assert l0[k] == pytest.approx(l1[k], rel=1e-5), k
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], atol=1e-6, rtol=1e-4, msg=name)


# ---- architecture ---------------------------------------------------------------------------------


def test_torch_linear_init_is_nn_linear_default():
    d, ds = 32, 128
    sae = sae_of(TrainingJointSAEConfig(d_in=d, d_sae=ds, init="torch-linear"), seed=5)
    torch.manual_seed(5)  # the reference's construction order: vision enc, vision dec, text enc, text dec
    layers = {m: (nn.Linear(d, ds), nn.Linear(ds, d)) for m in ("vision", "text")}
    for m, (enc, dec) in layers.items():
        assert torch.equal(sae.W_enc_of(m), enc.weight.T) and torch.equal(sae.b_enc_of(m), enc.bias)
        assert torch.equal(sae.W_dec_of(m), dec.weight.T) and torch.equal(sae.b_dec_of(m), dec.bias)
        # kaiming_uniform(a=√5) bounds: 1/√fan_in for weights and biases alike
        for p, fan_in in ((sae.W_enc_of(m), d), (sae.b_enc_of(m), d), (sae.W_dec_of(m), ds), (sae.b_dec_of(m), ds)):
            bound, top = 1 / math.sqrt(fan_in), float(p.detach().abs().max())
            assert 0.8 * bound < top <= bound
        w = sae.W_enc_of(m).detach()
        assert float(w.std()) == pytest.approx(1 / math.sqrt(3 * d), rel=0.05)  # uniform(±b): std b/√3
        assert bool((sae.b_enc_of(m) != 0).all()) and bool((sae.b_dec_of(m) != 0).all())
    assert not torch.allclose(sae.W_dec_of("vision").norm(dim=-1), torch.ones(ds))  # not unit rows
    tied = sae_of(TrainingJointSAEConfig(d_in=d, d_sae=ds))
    assert list(tied.state_dict()) == list(sae.state_dict())  # same parameter order as the tied init
    assert float(tied.b_enc_of("text").detach().abs().max()) == 0.0
    shared = sae_of(TrainingJointSAEConfig(d_in=d, d_sae=ds, init="torch-linear", shared_encoder=True,
                                           shared_decoder=True), seed=5)
    torch.manual_seed(5)  # shared: one encoder (drawn at vision), then a decoder Linear per modality
    enc, dec_v, dec_t = nn.Linear(d, ds), nn.Linear(ds, d), nn.Linear(ds, d)
    assert torch.equal(shared.W_enc_of("text"), enc.weight.T) and torch.equal(shared.W_dec_of("text"), dec_v.weight.T)
    assert torch.equal(shared.b_dec_of("vision"), dec_v.bias)
    assert torch.equal(shared.b_dec_of("text"), dec_t.bias)  # each modality keeps its own b_dec


def test_centring_off_encodes_the_raw_input():
    on = sae_of(TrainingJointSAEConfig(d_in=8, d_sae=20, init="torch-linear"))
    off = sae_of(TrainingJointSAEConfig(d_in=8, d_sae=20, init="torch-linear", apply_b_dec_to_input=False))
    x = torch.randn(5, 8)
    for m in ("vision", "text"):
        assert torch.equal(on.W_enc_of(m), off.W_enc_of(m))  # same weights, only the input processing differs
        W, b, b_dec = off.W_enc_of(m), off.b_enc_of(m), off.b_dec_of(m)
        torch.testing.assert_close(off.encode(x, m), F.relu(x @ W + b))
        torch.testing.assert_close(on.encode(x, m), F.relu((x - b_dec) @ W + b))
        assert not torch.allclose(on.encode(x, m), off.encode(x, m))
        z = off.encode(x, m)
        torch.testing.assert_close(off.decode(z, m), z @ off.W_dec_of(m) + b_dec)  # the decoder keeps its bias


def test_normalize_decoder_off_leaves_decoder_norms_free(monkeypatch):
    sae_cfg = TrainingJointSAEConfig(d_in=8, d_sae=20, init="torch-linear")
    cfg = JointTrainerConfig(total_steps=12, lr=1e-2, normalize_decoder=False, progress=False)
    tr = JointSAETrainer.from_config(sae_cfg, cfg, PairedTensorData(*pairs(), batch_size=16))
    before = [w.detach().clone() for w in tr.sae.decoder_weights()]

    def forbidden(*_a, **_k):
        raise AssertionError("normalize_decoder=False must not touch the decoder norms")

    monkeypatch.setattr(tr.sae, "set_decoder_norm_to_unit_norm", forbidden)
    monkeypatch.setattr(tr.sae, "remove_gradient_parallel_to_decoder_directions", forbidden)
    tr.fit()
    for w0, w in zip(before, tr.sae.decoder_weights()):
        norms = w.norm(dim=-1)
        assert not torch.allclose(norms, torch.ones_like(norms), atol=1e-3)
        assert not torch.allclose(norms, w0.norm(dim=-1))  # they moved freely


# ---- optimisation -----------------------------------------------------------------------------------


class Recording(JointSAETrainer):
    """Records the lr and a copy of the weights at the end of every epoch."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.lrs, self.states = [], []

    def _end_epoch(self):
        super()._end_epoch()
        self.lrs.append(self.optimizer.param_groups[0]["lr"])
        self.states.append({k: v.detach().clone() for k, v in self.sae.state_dict().items()})


def test_plateau_lowers_lr_after_patience_epochs_without_improvement():
    # data that plateaus: all-zero pools give zero codes (tied init, zero biases), a constant loss (1 - cos = 1)
    # and zero gradients, so no epoch ever improves on the first
    zeros = torch.zeros(64, 8)
    cfg = JointTrainerConfig(epochs=8, lr=1e-3, lr_scheduler="plateau", plateau_factor=0.5, plateau_patience=2,
                             plateau_min_lr=3e-4, progress=False)
    torch.manual_seed(0)
    tr = Recording(TrainingJointSAE(TrainingJointSAEConfig(d_in=8, d_sae=20)), cfg,
                   PairedTensorData(zeros, zeros, batch_size=16))
    tr.fit()
    assert tr.total_steps == 8 * 4 and tr.epoch_losses == [1.0] * 8
    # epoch 1 sets the best; epochs 2-4 do not improve: after the 3rd bad epoch (> patience 2) the lr halves,
    # three more bad epochs and it would halve again, but min_lr holds it
    assert tr.lrs == pytest.approx([1e-3, 1e-3, 1e-3, 5e-4, 5e-4, 5e-4, 3e-4, 3e-4], rel=1e-12)


def test_plateau_keeps_the_lr_while_the_loss_improves():
    cfg = JointTrainerConfig(epochs=4, lr=3e-3, lr_scheduler="plateau", plateau_patience=0, progress=False)
    torch.manual_seed(0)
    tr = Recording(TrainingJointSAE(TrainingJointSAEConfig(d_in=8, d_sae=20)), cfg,
                   PairedTensorData(*pairs(), batch_size=16))
    tr.fit()
    assert all(b < a for a, b in zip(tr.epoch_losses, tr.epoch_losses[1:]))
    assert tr.lrs == [3e-3] * 4


class ScaledData(PairedTensorData):
    """Pairs scaled per epoch (``scales[epoch]``), so the epoch losses go up and down by construction;
    a function of the global batch index, so exact resume still holds."""

    scales = (2.0, 1.0, 1.5, 3.0, 2.5, 4.0)

    def batches(self, start=0):
        for i, (v, t) in enumerate(super().batches(start)):
            s = self.scales[(start + i) // len(self)]
            yield v * s, t * s


def test_keep_best_epoch_restores_the_best_epochs_weights():
    cfg = JointTrainerConfig(epochs=4, lr=1e-3, keep_best_epoch=True, progress=False)
    torch.manual_seed(0)
    tr = Recording(TrainingJointSAE(TrainingJointSAEConfig(d_in=8, d_sae=20)), cfg,
                   ScaledData(*pairs(), batch_size=16))
    sae = tr.fit()
    best = min(range(4), key=tr.epoch_losses.__getitem__)
    assert best == tr.best_epoch == 1 and tr.best_loss == tr.epoch_losses[1]
    for k, v in sae.state_dict().items():
        assert torch.equal(v, tr.states[1][k]), k
    assert not torch.equal(sae.W_enc_of("vision"), tr.states[-1]["vision.W_enc"])
    # without keep_best_epoch the last weights stay
    torch.manual_seed(0)
    last = Recording(TrainingJointSAE(TrainingJointSAEConfig(d_in=8, d_sae=20)), replace(cfg, keep_best_epoch=False),
                     ScaledData(*pairs(), batch_size=16))
    assert torch.equal(last.fit().W_enc_of("vision"), tr.states[-1]["vision.W_enc"])


class Stop(Exception):
    pass


class Interrupted(ScaledData):
    stop_at = 10**9

    def batches(self, start=0):
        for i, batch in enumerate(super().batches(start)):
            if start + i == self.stop_at:
                raise Stop("interrupted")
            yield batch


def _reference_like(tmp=None, **kw):
    sae_cfg, cfg = reference_configs(8, 20)
    cfg = replace(cfg, epochs=6, lr=1e-3, plateau_factor=0.5, plateau_patience=0, progress=False,
                  checkpoint_every=5 if tmp else 0, checkpoint_dir=str(tmp) if tmp else None, keep_checkpoints=10, **kw)
    return sae_cfg, cfg


def test_resume_mid_epoch_equals_an_uninterrupted_epoch_run(tmp_path):
    v, t = pairs(64)
    sae_cfg, cfg = _reference_like()
    full = JointSAETrainer.from_config(sae_cfg, cfg, ScaledData(v, t, batch_size=16, seed=1))
    full_sae = full.fit()
    assert full.total_steps == 24 and len(full.epoch_losses) == 6
    assert full.best_epoch == 1 and full.optimizer.param_groups[0]["lr"] < 1e-3  # both kinds of state in play

    sae_cfg, cfg = _reference_like(tmp_path / "c")
    data = Interrupted(v, t, batch_size=16, seed=1)
    data.stop_at = 17  # epoch 4 of 6 (4 steps each); the last checkpoint is step 15, mid-epoch 3
    with pytest.raises(Stop):
        JointSAETrainer.from_config(sae_cfg, cfg, data).fit()
    latest = json.loads((tmp_path / "c" / "latest.json").read_text())
    assert latest["step"] == 15
    state = json.loads((tmp_path / "c" / latest["checkpoint"] / "trainer_state.json").read_text())
    assert len(state["epochs"]["epoch_losses"]) == 3 and state["epochs"]["best_epoch"] == 1
    assert state["scheduler"]["num_bad_epochs"] >= 0 and state["param_groups"][0]["lr"] < 1e-3

    resumed_tr = JointSAETrainer.from_config(sae_cfg, cfg, ScaledData(v, t, batch_size=16, seed=1))
    resumed = resumed_tr.fit()
    assert resumed_tr.epoch_losses == full.epoch_losses  # exactly: the epoch in progress was summed across the cut
    assert resumed_tr.best_epoch == full.best_epoch
    assert resumed_tr.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]
    assert resumed_tr.scheduler.state_dict() == full.scheduler.state_dict()
    for (k, a), b in zip(full_sae.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # resuming the final checkpoint changes nothing (the best weights come back with it)
    again = JointSAETrainer.from_config(sae_cfg, cfg, ScaledData(v, t, batch_size=16, seed=1)).fit()
    for (k, a), b in zip(full_sae.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    shutil.rmtree(tmp_path / "c")


def test_epochs_over_plain_iterables_and_steps_per_epoch():
    v, t = pairs(48)
    data = [(v[i:i + 16], t[i:i + 16]) for i in range(0, 48, 16)]
    sae_cfg = TrainingJointSAEConfig(d_in=8, d_sae=20)
    tr = JointSAETrainer.from_config(sae_cfg, JointTrainerConfig(epochs=2, lr=1e-3, progress=False), data)
    tr.fit()
    assert tr.total_steps == 6 and tr.step == 6 and len(tr.epoch_losses) == 2
    unsized = (b for b in data)
    with pytest.raises(ValueError, match="has no len\\(\\); set steps_per_epoch"):
        JointSAETrainer.from_config(sae_cfg, JointTrainerConfig(epochs=2, progress=False), unsized)
    tr = JointSAETrainer.from_config(sae_cfg, JointTrainerConfig(epochs=2, steps_per_epoch=2, progress=False), unsized)
    assert tr.total_steps == 4 and tr.epoch_length == 2


def test_bad_option_values_give_one_line_errors():
    cases = [
        (dict(), "give total_steps or epochs"),
        (dict(total_steps=5, epochs=2), "not both"),
        (dict(epochs=0), "epochs must be positive"),
        (dict(epochs=2, steps_per_epoch=0), "steps_per_epoch must be positive"),
        (dict(total_steps=5, lr_scheduler="cosine"), "unknown lr_scheduler 'cosine'"),
        (dict(total_steps=5, lr_scheduler="plateau", lr_warm_up_steps=2), "set them to 0 with lr_scheduler='plateau'"),
        (dict(total_steps=5, plateau_factor=1.5), "plateau_factor must be between 0 and 1"),
        (dict(total_steps=5, plateau_patience=-1), "plateau_patience must be >= 0"),
        (dict(total_steps=5, plateau_min_lr=-1.0), "plateau_min_lr must be a finite number >= 0"),
    ]
    for kw, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            JointTrainerConfig(**kw)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="unknown loss_reduction 'median'"):
        TrainingJointSAEConfig(d_in=4, d_sae=8, loss_reduction="median")
    with pytest.raises(ValueError, match="unknown init 'xavier'.*torch-linear"):
        TrainingJointSAEConfig(d_in=4, d_sae=8, init="xavier")
    data = PairedTensorData(*pairs(32), batch_size=16)  # 2 batches per epoch
    with pytest.raises(ValueError, match="exceeds the 4 training steps"):
        JointSAETrainer.from_config(TrainingJointSAEConfig(d_in=8, d_sae=20),
                                    JointTrainerConfig(epochs=2, lr_warm_up_steps=5, progress=False), data)


def test_defaults_leave_configs_and_fingerprints_as_before():
    cfg = TrainingJointSAEConfig(d_in=8, d_sae=20)
    assert "loss_reduction" not in cfg.to_dict() and "init" not in cfg.to_dict()
    assert "init" not in cfg.get_training_architecture_details()
    assert TrainingJointSAEConfig.from_dict(cfg.to_dict()).loss_reduction == "sum"
    ref, _ = reference_configs(8, 20)
    back = TrainingJointSAEConfig.from_dict(ref.to_dict())
    assert (back.loss_reduction, back.init, back.apply_b_dec_to_input) == ("mean", "torch-linear", False)
    tr = JointSAETrainer.from_config(cfg, JointTrainerConfig(total_steps=5, progress=False),
                                     PairedTensorData(*pairs(32), batch_size=16))
    fp = tr._fingerprint()["trainer"]
    assert not {"lr_scheduler", "epochs", "keep_best_epoch", "plateau_factor", "steps_per_epoch"} & set(fp)
    assert tr.epoch_length is None


def test_reference_configs_preset():
    sae_cfg, cfg = reference_configs(16)
    assert (sae_cfg.d_in, sae_cfg.d_sae, sae_cfg.activation) == (16, 64, "relu")
    assert (sae_cfg.loss_reduction, sae_cfg.init, sae_cfg.apply_b_dec_to_input) == ("mean", "torch-linear", False)
    assert (sae_cfg.mse_coefficient, sae_cfg.l1_coefficient, sae_cfg.alignment, sae_cfg.alignment_coefficient) == \
        (1.0, 0.03, "cosine", 1.0)
    assert not sae_cfg.shared_encoder and not sae_cfg.shared_decoder and sae_cfg.mse_normalization == "none"
    assert (cfg.optimizer, cfg.lr, cfg.epochs, cfg.total_steps) == ("adam", 1e-5, 20, None)
    assert (cfg.lr_scheduler, cfg.plateau_factor, cfg.plateau_patience, cfg.plateau_min_lr) == ("plateau", 0.3, 3, 1e-7)
    assert cfg.keep_best_epoch and cfg.grad_clip_norm is None and not cfg.normalize_decoder
    assert REFERENCE_BATCH_SIZE == 8 and reference_configs(16, 40)[0].d_sae == 40
    # it trains (2 epochs of 4 batches of 8 pairs)
    data = PairedTensorData(*pairs(32, 16), batch_size=REFERENCE_BATCH_SIZE)
    tr = JointSAETrainer.from_config(sae_cfg, replace(cfg, epochs=2, progress=False), data)
    tr.fit()
    assert tr.step == 8 and len(tr.epoch_losses) == 2 and tr.best_epoch in (0, 1)
