"""The JSAE trainer: determinism, schedules, checkpoints, exact resume after SIGKILL, torchrun, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from jsae import TrainingJointSAE, TrainingJointSAEConfig
from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData
from jsae.testing import pairs_with

SCRIPT = Path(__file__).parent / "scripts" / "train_paired.py"
STEPS = 40


pairs = pairs_with(n=256, d=16, rank=5)  # the shared synthetic pairs (jsae.testing)


def trainer(steps=30, seed=0, data=None, **kw) -> JointSAETrainer:
    sae_kw = {k: kw.pop(k) for k in list(kw) if k in TrainingJointSAEConfig.__dataclass_fields__}
    cfg = JointTrainerConfig(total_steps=steps, lr=3e-3, progress=False, seed=seed, log_every=10, **kw)
    return JointSAETrainer.from_config(TrainingJointSAEConfig(d_in=16, d_sae=32, **sae_kw), cfg,
                                       PairedTensorData(*pairs(), batch_size=32) if data is None else data)


def run_script(*args: str, torchrun: bool = False, wait: bool = True):
    cmd = [sys.executable, str(SCRIPT), *args]
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533", *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, torch.Tensor]:
    """One uninterrupted run of the script, without checkpoints."""
    out = tmp_path_factory.mktemp("ref") / "ref.safetensors"
    run_script(str(out), "-", str(STEPS))
    return load_file(out)


# ---- behaviour ------------------------------------------------------------------------------------


def test_training_reduces_loss_and_tracks_saelens_metric_names():
    tr = trainer(steps=60, activation="topk", k=4)
    tr.fit()
    first, last = tr.history[0], tr.history[-1]
    assert last["losses/overall_loss"] < first["losses/overall_loss"]
    assert last["metrics/explained_variance_vision"] > 0.5 and last["metrics/explained_variance_text"] > 0.5
    assert last["metrics/l0_vision"] == pytest.approx(4.0)
    assert {"sparsity/dead_features_vision", "details/current_learning_rate", "losses/alignment_loss"} <= set(last)
    for w in tr.sae.decoder_weights():  # decoder rows kept at unit norm
        torch.testing.assert_close(w.norm(dim=-1), torch.ones(32))


def test_deterministic_for_a_seed():
    a, b, c = trainer(seed=3).fit(), trainer(seed=3).fit(), trainer(seed=4).fit()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.W_enc_of("vision"), c.W_enc_of("vision"))


def test_lr_warm_up_and_decay():
    tr = trainer(steps=20, lr_warm_up_steps=4, lr_decay_steps=5, lr_end=3e-4)
    factors = [tr._lr_factor(s) for s in range(20)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[14] == 1.0 and factors[19] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[15:], factors[16:]))


class _Recorded:
    """A plain iterable (no ``batches()``) that records which of its batches were handed out, per ``iter()``."""

    def __init__(self, batches):
        self.items, self.epochs = batches, []

    def __iter__(self):
        self.epochs.append([])
        for i, batch in enumerate(self.items):
            self.epochs[-1].append(i)
            yield batch


def test_plain_iterables_are_accepted_and_re_iterated():
    v, t = pairs(64)
    data = [(v[i:i + 16], t[i:i + 16]) for i in range(0, 64, 16)]  # 4 batches per epoch, 10 steps
    recorded = _Recorded(data)
    tr = trainer(steps=10, data=recorded)
    sae = tr.fit()
    assert tr.step == 10
    # re-iterated once per epoch, each time in order from the first batch: 4 + 4 + 2 batches
    assert recorded.epochs == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1]]
    # a plain list trains exactly like the same batches served by PairedTensorData without shuffling
    from_list = trainer(steps=10, data=data).fit()
    in_order = trainer(steps=10, data=PairedTensorData(v, t, batch_size=16, shuffle=False)).fit()
    for (k, a), b, c in zip(sae.state_dict().items(), from_list.state_dict().values(), in_order.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c), k
    # and the order matters: the same batches reversed give other weights
    reversed_order = trainer(steps=10, data=data[::-1]).fit()
    assert not torch.equal(reversed_order.W_enc_of("vision"), sae.W_enc_of("vision"))


# ---- checkpoints and exact resume -----------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path, reference):
    ckpt = tmp_path / "ckpt"
    proc = run_script(str(tmp_path / "killed.safetensors"), str(ckpt), str(STEPS), "--slow", "0.2", wait=False)
    deadline = time.time() + 120
    while time.time() < deadline:
        latest = ckpt / "latest.json"
        if latest.exists() and json.loads(latest.read_text())["step"] >= 10:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step_at_kill = json.loads((ckpt / "latest.json").read_text())["step"]
    assert 10 <= step_at_kill < STEPS and not (tmp_path / "killed.safetensors").exists()
    run_script(str(tmp_path / "resumed.safetensors"), str(ckpt), str(STEPS))
    resumed = load_file(tmp_path / "resumed.safetensors")
    assert resumed.keys() == reference.keys()
    for k in reference:
        assert torch.equal(resumed[k], reference[k]), k
    final = ckpt / json.loads((ckpt / "latest.json").read_text())["checkpoint"]
    assert final.name == f"step-{STEPS:07d}"
    assert {p.name for p in final.iterdir()} == {"cfg.json", "sae_weights.safetensors", "trainer_state.json",
                                                "trainer_state.safetensors"}
    assert len(list(ckpt.glob("step-*"))) <= 2  # keep_checkpoints


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path, reference):
    out = tmp_path / "ddp.safetensors"
    run_script(str(out), "-", str(STEPS), torchrun=True)
    ddp = load_file(out)
    for k in reference:
        torch.testing.assert_close(ddp[k], reference[k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.slow
def test_torchrun_with_resampling_matches_one_process(tmp_path):
    """ReLU + L1 with dead-latent resampling: two ranks resample the same latents from the same inputs."""
    args = ["--activation", "relu", "--l1", "1.0", "--resample-every", "6"]
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    run_script(str(one), "-", "24", *args)
    run_script(str(two), "-", "24", *args, torchrun=True)
    log = json.loads(one.with_suffix(".json").read_text())
    assert log == json.loads(two.with_suffix(".json").read_text()) and len(log) == 3
    assert sum(r["vision"] + r["text"] for r in log) > 0  # latents were resampled
    a, b = load_file(one), load_file(two)
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_checkpoint_from_another_config_is_refused(tmp_path):
    trainer(steps=10, checkpoint_every=5, checkpoint_dir=str(tmp_path / "c")).fit()
    other = trainer(steps=10, checkpoint_dir=str(tmp_path / "c"), l1_coefficient=0.5)
    with pytest.raises(ValueError, match=r"another config \(differs in \['sae.l1_coefficient'\]\)"):
        other.fit()
    with pytest.raises(ValueError, match="holds no readable jsae checkpoint"):
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "latest.json").write_text("{not json")
        trainer(steps=10, checkpoint_dir=str(tmp_path / "d")).fit()


def test_resume_in_process_continues_where_it_stopped(tmp_path):
    full = trainer(steps=20).fit()
    trainer(steps=20, checkpoint_every=10, checkpoint_dir=str(tmp_path / "c")).fit()
    # delete the final checkpoint: the latest is step 10; resuming must reproduce step 20 exactly
    latest = json.loads((tmp_path / "c" / "latest.json").read_text())
    assert latest["step"] == 20
    import shutil

    shutil.rmtree(tmp_path / "c" / "step-0000020")
    (tmp_path / "c" / "latest.json").write_text(json.dumps({"checkpoint": "step-0000010", "step": 10}))
    tr = trainer(steps=20, checkpoint_dir=str(tmp_path / "c"))
    resumed = tr.fit()
    assert tr.history[0]["details/n_training_steps"] == 10  # the history came back with the checkpoint
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


# ---- bad input ------------------------------------------------------------------------------------


def test_bad_batches_give_one_line_errors():
    v, t = pairs(64)
    cases = [
        ([(v[:8], t[:6])], "8 vision pools but 6 text pools"),
        ([(v[:8, :10], t[:8, :10])], r"shape \(8, 10\) but the JSAE expects \[B, d_in=16\]"),
        ([v[:8]], "the trainer needs \\(vision, text\\) tensor pairs"),
        ([], "yielded no batches"),
    ]
    bad = t[:8].clone()
    bad[2, 3] = float("nan")
    bad[5, 0] = float("inf")
    cases.append(([(v[:8], bad)], r"text has 2 NaN/inf values in rows \[2, 5\]"))
    for data, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            trainer(steps=2, data=data).fit()


def test_bad_trainer_config():
    with pytest.raises(ValueError, match="lr must be a positive finite number"):
        JointTrainerConfig(total_steps=5, lr=float("nan"))
    with pytest.raises(ValueError, match="checkpoint_every needs a checkpoint_dir"):
        JointTrainerConfig(total_steps=5, checkpoint_every=2)
    with pytest.raises(TypeError, match="trains a TrainingJointSAE"):
        JointSAETrainer(torch.nn.Linear(2, 2), JointTrainerConfig(total_steps=5), [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be between 1 and the number of pairs"):
        PairedTensorData(*pairs(8), batch_size=16)


def test_saelens_own_trainer_trains_the_default_branch():
    """Without pairs, a JSAE is an ordinary SAE: SAELens's SAETrainer trains its text branch."""
    from sae_lens import LoggingConfig, SAETrainer
    from sae_lens.config import SAETrainerConfig

    torch.manual_seed(0)
    sae = TrainingJointSAE(TrainingJointSAEConfig(d_in=16, d_sae=32, activation="topk", k=4))
    _, text = pairs(2048)
    before = sae.W_enc_of("vision").detach().clone()
    loss0 = (sae(text) - text).pow(2).sum(-1).mean().item()
    cfg = SAETrainerConfig(
        n_checkpoints=0, checkpoint_path=None, save_final_checkpoint=False, total_training_samples=2048,
        device="cpu", autocast=False, lr=3e-3, lr_end=3e-4, lr_scheduler_name="constant", lr_warm_up_steps=0,
        adam_beta1=0.9, adam_beta2=0.999, lr_decay_steps=0, n_restart_cycles=1, train_batch_size_samples=64,
        dead_feature_window=1000, feature_sampling_window=1000, logger=LoggingConfig(log_to_wandb=False),
    )
    SAETrainer(cfg=cfg, sae=sae, data_provider=iter(text.split(64)), evaluator=None).fit()
    assert (sae(text) - text).pow(2).sum(-1).mean().item() < 0.5 * loss0
    assert torch.equal(sae.W_enc_of("vision"), before)  # the other branch is untouched


def test_wandb_logging_uses_saelens_key_names(tmp_path, monkeypatch):
    """A real wandb run (offline mode): the run file holds the metrics under SAELens's names."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer(steps=10, log_to_wandb=True, wandb_project="jsae-test").fit()
    runs = list(tmp_path.glob("wandb/offline-run-*/*.wandb"))
    assert len(runs) == 1
    deadline = time.time() + 30  # wandb's service process flushes the run file after finish() returns
    while b"details/current_learning_rate" not in runs[0].read_bytes() and time.time() < deadline:
        time.sleep(0.2)
    data = runs[0].read_bytes()
    for key in ("losses/overall_loss", "losses/alignment_loss", "metrics/explained_variance_vision", "metrics/l0_text",
                "sparsity/dead_features_vision", "details/current_learning_rate"):
        assert key.encode() in data, key


# ---- dead-latent revival --------------------------------------------------------------------------


def sparse_pairs(n_features: int, offset: float, n=4096, d=16, seed=0):
    """Pairs of sparse codes over ``n_features`` random unit directions per modality (each active with
    probability 3 / n_features, values uniform in [0, 2]), plus a constant ``offset`` × a random vector."""
    g = torch.Generator().manual_seed(seed)

    def view():
        directions = torch.nn.functional.normalize(torch.randn(n_features, d, generator=g), dim=-1)
        codes = (torch.rand(n, n_features, generator=g) < 3 / n_features).float() * 2 * torch.rand(n, n_features, generator=g)
        return codes @ directions + offset * torch.randn(d, generator=g)

    return view(), view()


def dead_after(sae, vision, text) -> dict[str, int]:
    """Latents that fire on none of the pairs, per branch."""
    with torch.no_grad():
        return {m: int((sae.encode(x, m).amax(0) <= 0).sum()) for m, x in (("vision", vision), ("text", text))}


def test_resampling_sets_dead_latents_as_computed_by_hand():
    """Vision latents 0 and 1 are dead; of the candidates only x3 is badly reconstructed (the others equal b_dec,
    the alive encoder columns are orthogonal to x3 - b_dec), so both draw x3.  Mean μ = b_dec + 0.75 e1, the
    direction x3 - μ = 2.25 e1 -> e1; alive encoder norms 2 and 4 -> the new columns 0.2 · 3 · e1 = 0.6 e1 and
    b_enc = -(0.6 e1 · (μ - b_dec)) = -0.45; decoder rows e1; their Adam moments zero; text untouched."""
    cfg = JointTrainerConfig(total_steps=100, progress=False, resample_every=10, resample_batches=1, dead_feature_window=5)
    tr = JointSAETrainer.from_config(TrainingJointSAEConfig(d_in=4, d_sae=4), cfg, PairedTensorData(*pairs(64, d=4), batch_size=4))
    sae = tr.sae
    for p in tr.optimizer.param_groups[0]["params"]:  # Adam moments to reset: one step with gradients of ones
        p.grad = torch.ones_like(p)
    tr.optimizer.step()
    with torch.no_grad():
        b_dec = torch.tensor([1.0, 0.0, 0.0, 0.0])
        sae.vision.b_dec.copy_(b_dec)
        sae.vision.W_enc.copy_(torch.tensor([[5.0, 5.0, 0.0, 0.0], [5.0, 5.0, 0.0, 0.0], [5.0, 5.0, 2.0, 0.0],
                                             [5.0, 5.0, 0.0, 4.0]]))
        sae.vision.b_enc.zero_()
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    moments = {id(p): {k: s.clone() for k, s in tr.optimizer.state[p].items()} for p in sae.parameters()}
    tr.steps_since_fired[0, :2] = 7  # vision latents 0 and 1 dead for 7 >= 5 steps; text alive
    x = b_dec.repeat(4, 1)
    x[3, 1] = 3.0
    tr.step = 9  # after the 10th step
    tr._resample_dead(x, torch.randn(4, 4))
    e1 = torch.tensor([0.0, 1.0, 0.0, 0.0])
    torch.testing.assert_close(sae.vision.W_dec[:2], e1.repeat(2, 1))
    torch.testing.assert_close(sae.vision.W_enc[:, :2], 0.6 * e1[:, None].repeat(1, 2))
    torch.testing.assert_close(sae.vision.b_enc[:2], torch.tensor([-0.45, -0.45]))
    assert tr.resampled == [{"step": 10, "vision": 2, "text": 0}]
    assert tr.steps_since_fired[0].tolist() == [0, 0, 0, 0]
    after = sae.state_dict()
    for k in before:  # everything else is untouched
        if k.startswith("vision.") and k != "vision.b_dec":
            keep = (slice(None), slice(2, None)) if k == "vision.W_enc" else (slice(2, None),)
            assert torch.equal(after[k][keep], before[k][keep]), k
        else:
            assert torch.equal(after[k], before[k]), k
    for name, p, rows in (("W_dec", sae.vision.W_dec, (slice(0, 2),)), ("b_enc", sae.vision.b_enc, (slice(0, 2),)),
                          ("W_enc", sae.vision.W_enc, (slice(None), slice(0, 2)))):
        for key in ("exp_avg", "exp_avg_sq"):
            state, old = tr.optimizer.state[p][key], moments[id(p)][key]
            assert state[rows].abs().sum() == 0 and old[rows].abs().sum() > 0, (name, key)
            rest = state.clone()
            rest[rows] = old[rows]
            assert torch.equal(rest, old), (name, key)


def test_resampling_with_a_shared_decoder_only_takes_latents_dead_in_both_branches():
    tr = trainer(steps=100, resample_every=10, dead_feature_window=5, shared_decoder=True)
    tr.steps_since_fired[0, :4] = 9  # dead in vision only
    tr.steps_since_fired[:, 10:12] = 9  # dead in both
    before = tr.sae.shared.W_dec.detach().clone()
    v, t = pairs(32)
    tr._resample_dead(v, t)
    assert tr.resampled == [{"step": 1, "vision": 2, "text": 2}]
    changed = (tr.sae.shared.W_dec != before).any(-1)
    assert changed.nonzero().flatten().tolist() == [10, 11]
    assert tr.steps_since_fired[0, :4].tolist() == [9, 9, 9, 9]


def test_resampling_revives_dead_relu_latents():
    """ReLU + L1 on 8 sparse directions per modality with 128 latents: at the same 400 steps, resampling every
    50 steps leaves fewer dead latents in both branches and reconstructs at least as well."""
    vision, text = sparse_pairs(8, 0.0)
    runs = {}
    for every in (0, 50):
        tr = JointSAETrainer.from_config(
            TrainingJointSAEConfig(d_in=16, d_sae=128, l1_coefficient=0.1, alignment="none", mse_normalization="variance"),
            JointTrainerConfig(total_steps=400, lr=3e-3, dead_feature_window=25, resample_every=every, progress=False,
                               log_every=100), PairedTensorData(vision, text, batch_size=128))
        runs[every] = (dead_after(tr.fit(), vision, text), tr.history[-1], tr.resampled)
    (off, off_last, none), (on, on_last, resampled) = runs[0], runs[50]
    print("dead without / with resampling:", off, on)
    assert none == [] and len(resampled) == 7 and sum(r["vision"] + r["text"] for r in resampled) > 0
    assert off["vision"] >= 20 and off["text"] >= 20  # the problem: many dead latents
    for m in ("vision", "text"):
        assert on[m] <= 0.5 * off[m], m
        assert on_last[f"metrics/explained_variance_{m}"] >= off_last[f"metrics/explained_variance_{m}"] - 0.005, m


def test_auxk_revives_dead_topk_latents():
    """TopK (k=4, 128 latents) on offset data: most latents never make the top k without the auxiliary loss;
    with SAELens's AuxK (coefficient 1.0) far fewer are dead at the same 400 steps, in both branches."""
    vision, text = sparse_pairs(64, 2.0)
    dead = {}
    for coefficient in (0.0, 1.0):
        sae = JointSAETrainer.from_config(
            TrainingJointSAEConfig(d_in=16, d_sae=128, activation="topk", k=4, aux_loss_coefficient=coefficient,
                                   alignment="none", mse_normalization="variance"),
            JointTrainerConfig(total_steps=400, lr=3e-3, dead_feature_window=25, progress=False, log_every=100),
            PairedTensorData(vision, text, batch_size=128)).fit()
        dead[coefficient] = dead_after(sae, vision, text)
    print("dead without / with AuxK:", dead)
    for m in ("vision", "text"):
        assert dead[0.0][m] >= 40 and dead[1.0][m] <= 0.25 * dead[0.0][m], m


def test_resume_with_resampling_continues_exactly(tmp_path):
    kw = dict(steps=40, resample_every=8, dead_feature_window=3, l1_coefficient=2.0)
    full_trainer = trainer(**kw)
    full = full_trainer.fit()
    assert sum(r["vision"] + r["text"] for r in full_trainer.resampled) > 0  # resampling happened
    trainer(**kw, checkpoint_every=20, checkpoint_dir=str(tmp_path / "c")).fit()
    import shutil

    shutil.rmtree(tmp_path / "c" / "step-0000040")
    (tmp_path / "c" / "latest.json").write_text(json.dumps({"checkpoint": "step-0000020", "step": 20}))
    tr = trainer(**kw, checkpoint_dir=str(tmp_path / "c"))
    resumed = tr.fit()
    assert tr.resampled == full_trainer.resampled  # the log came back with the checkpoint and went on
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # the resampling options are part of the config a checkpoint must match
    with pytest.raises(ValueError, match=r"differs in \['trainer.resample_every'\]"):
        trainer(**{**kw, "resample_every": 4}, checkpoint_dir=str(tmp_path / "c")).fit()


def test_bad_revival_options():
    with pytest.raises(ValueError, match="resample_every must be a whole number of steps >= 0"):
        JointTrainerConfig(total_steps=5, resample_every=-1)
    with pytest.raises(ValueError, match="resample_batches must be a whole number >= 1"):
        JointTrainerConfig(total_steps=5, resample_batches=0)
    with pytest.raises(ValueError, match="resample_encoder_scale must be a positive finite number"):
        JointTrainerConfig(total_steps=5, resample_encoder_scale=0.0)
    with pytest.raises(ValueError, match=r"aux_k=0 must be a whole number between 1 and d_sae=32"):
        TrainingJointSAEConfig(d_in=16, d_sae=32, activation="topk", aux_k=0)
