"""Divergence and degeneracy guards, up-front refusals and one-line shape errors, on real trainers, SAEs and
interventions: nothing diverged is returned or saved, the last good checkpoint stays, bad values never
reach a forward."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from jsae import JointSAE, JointSAEConfig, TrainingJointSAEConfig
from jsae.interventions import Clamp, ProjectOut, Steer
from jsae.labels import label_features
from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData
from jsae.training.trainer import TrainingDiverged
from jsae.testing import pairs_with


pairs = pairs_with(n=64, d=16, rank=4)  # the shared synthetic pairs (jsae.testing)


def trainer(data, steps=20, sae_kw=None, **kw):
    cfg = JointTrainerConfig(total_steps=steps, lr=3e-3, progress=False, log_every=5, **kw)
    return JointSAETrainer.from_config(TrainingJointSAEConfig(d_in=16, d_sae=32, **(sae_kw or {})), cfg, data)


class TurnsHuge(PairedTensorData):
    """Ordinary batches until ``after``, then activations near 1e20 (a capture gone wrong mid-way)."""

    after = 10

    def batches(self, start=0):
        for i, (v, t) in enumerate(super().batches(start), start):
            yield (v * 1e20, t * 1e20) if i >= self.after else (v, t)


def test_divergence_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    tr = trainer(TurnsHuge(*pairs(), batch_size=8), steps=30, checkpoint_every=5, checkpoint_dir=str(tmp_path))
    with pytest.raises(TrainingDiverged, match=r"training diverged by step 1[1-5] .*last good checkpoint \(step-0000010\)"):
        tr.fit()
    assert json.loads((tmp_path / "latest.json").read_text())["checkpoint"] == "step-0000010"
    assert all(torch.isfinite(w).all() for w in load_file(tmp_path / "step-0000010" / "sae_weights.safetensors").values())
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000005", "step-0000010"]  # none after it


def test_huge_activations_diverge_at_the_first_step_without_checkpoints():
    with pytest.raises(TrainingDiverged, match="by step 1 "):
        trainer(PairedTensorData(*pairs(scale=1e20), batch_size=8)).fit()


def test_variance_normalisation_refuses_what_it_cannot_estimate():
    var = {"mse_normalization": "variance"}
    with pytest.raises(ValueError, match="batch 0 holds 1 pair; use a batch size of at least 2"):
        trainer(PairedTensorData(*pairs(), batch_size=1), sae_kw=var).fit()
    const = torch.ones(64, 16)
    with pytest.raises(ValueError, match="vision activations of the first 4 batches are constant"):
        trainer(PairedTensorData(const, pairs()[1], batch_size=8), sae_kw=var).fit()
    with pytest.raises(ValueError, match="too large to train in torch.float32"):
        trainer(PairedTensorData(*pairs(scale=1e20), batch_size=8), sae_kw=var).fit()
    tr = trainer(PairedTensorData(*pairs(), batch_size=8), sae_kw=var)  # the ordinary case still trains
    tr.fit()
    assert tr.history[-1]["losses/overall_loss"] < 10


@pytest.mark.parametrize("kw, match", [
    ({"log_every": 0}, "log_every must be a whole number >= 1"),
    ({"keep_checkpoints": 0}, "keep_checkpoints must be a whole number >= 1"),
    ({"checkpoint_every": -1, "checkpoint_dir": "x"}, "checkpoint_every must be a whole number >= 0"),
    ({"grad_clip_norm": float("nan")}, "grad_clip_norm must be a positive finite number"),
    ({"device": "cuda:7" if torch.cuda.is_available() else "cuda"}, "GPU"),
    ({"device": "potato"}, "is not a torch device"),
])
def test_trainer_config_refuses_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        JointTrainerConfig(total_steps=10, **kw)


def test_checkpoint_dir_that_is_a_file_is_refused_before_training(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a folder")
    tr = trainer(PairedTensorData(*pairs(), batch_size=8), checkpoint_dir=str(f))
    with pytest.raises(NotADirectoryError, match="checkpoint_dir .* is a file, not a folder"):
        tr.fit()
    assert tr.step == 0 and f.read_text() == "not a folder"


def test_an_sae_beyond_the_machines_memory_is_refused_before_allocating():
    with pytest.raises(MemoryError, match=r"d_sae=1000000000000 needs .* TB but cpu has .*; lower d_sae"):
        JointSAE(JointSAEConfig(d_in=16, d_sae=10**12))
    with pytest.raises(MemoryError, match="training"):
        JointSAETrainer.from_config(TrainingJointSAEConfig(d_in=4096, d_sae=10**9), JointTrainerConfig(total_steps=1),
                                    PairedTensorData(*pairs(), batch_size=8))


def test_non_float_or_non_finite_sae_weights_are_refused(tmp_path):
    JointSAE(JointSAEConfig(d_in=16, d_sae=32)).save_model(tmp_path)
    # copies: older safetensors memory-map the file, which the next lines rewrite in place (SIGBUS on a later read)
    weights = {k: v.clone() for k, v in load_file(tmp_path / "sae_weights.safetensors").items()}
    save_file({k: v.to(torch.int8) for k, v in weights.items()}, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"non-float weights .*I8"):
        JointSAE.load_from_disk(tmp_path)
    bad = {k: v.clone() for k, v in weights.items()}
    bad["vision.W_enc"][3, 4] = float("nan")
    save_file(bad, tmp_path / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"\['vision.W_enc'\] hold NaN/inf"):
        JointSAE.load_from_disk(tmp_path)


def test_nan_strengths_and_directions_are_refused_at_construction():
    sae = JointSAE(JointSAEConfig(d_in=16, d_sae=32))
    d = torch.ones(16)
    with pytest.raises(ValueError, match="finite"):
        Steer(layer=1, direction=d, strength=float("nan"))
    with pytest.raises(ValueError, match="finite"):
        Steer(layer=1, direction=torch.full((16,), float("inf")))
    with pytest.raises(ValueError, match="finite"):
        ProjectOut(layer=1, direction=torch.full((16,), float("nan")))
    with pytest.raises(ValueError, match="strength must be finite"):
        Clamp(layer=1, sae=sae, features=[1, 2], strength=float("nan"))
    with pytest.raises(ValueError, match="strength must be finite"):
        Clamp(layer=1, sae=sae, features=[[1], [2]], strength=[[1.0], [float("inf")]])


def test_shape_and_dtype_errors_are_one_line_naming_the_argument():
    def one_line(excinfo):
        assert "\n" not in str(excinfo.value), str(excinfo.value)
        return str(excinfo.value)

    with pytest.raises(TypeError) as e:
        label_features(torch.zeros(10, 8, dtype=torch.long), torch.zeros(10, 8), torch.zeros(10, 3), ["a", "b", "c"])
    assert one_line(e) == "label_features: z_vision must be a float tensor of shape [n, d_sae], got int64 [10, 8]; convert it with .float()"
    with pytest.raises(ValueError) as e:
        label_features(torch.zeros(10, 8), torch.zeros(8, 8), torch.zeros(10, 3), ["a", "b", "c"])
    assert "z_text has n=8 but z_vision has n=10" in one_line(e)
    with pytest.raises(ValueError) as e:
        PairedTensorData(torch.zeros(10, 4), torch.zeros(10, 5), 2)
    assert "text has d_in=5 but vision has d_in=4" in one_line(e)
    sae = JointSAE(JointSAEConfig(d_in=16, d_sae=32))
    with pytest.raises(TypeError) as e:
        sae.encode(torch.zeros(3, 16, dtype=torch.int64))
    assert one_line(e).startswith("JointSAE.encode: x must be a float tensor of shape [batch, d_in]")
