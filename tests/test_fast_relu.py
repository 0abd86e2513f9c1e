"""The fast ReLU training path (jsae.saes.sparse_relu) against the plain-autograd reference."""

from __future__ import annotations

import pytest
import torch

from jsae import TrainingJointSAE, TrainingJointSAEConfig
from jsae.saes.alignment import ALIGNMENT_LOSSES
from jsae.saes.sparse_relu import argsort_latents, in_pair, relu_codes
from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData
from jsae.testing import pairs_with

COEFFS = {"l1": 0.03, "alignment": 1.0, "aux": 0.0}
VARIANTS = [{}, {"shared_decoder": True}, {"shared_encoder": True}, {"loss_reduction": "mean"},
            {"apply_b_dec_to_input": False}, {"mse_normalization": "variance"}]


pairs = pairs_with(n=256, d=16, rank=5)  # the shared synthetic pairs (jsae.testing)


def make_sae(alignment="cosine", d_in=16, d_sae=64, shift=0.3, seed=0, **kw) -> TrainingJointSAE:
    torch.manual_seed(seed)
    sae = TrainingJointSAE(TrainingJointSAEConfig(d_in=d_in, d_sae=d_sae, alignment=alignment, init="torch-linear", **kw))
    with torch.no_grad():  # negative encoder biases: part of the codes inactive, as in training
        for b in sae.unique_params("b_enc"):
            b.sub_(shift)
    return sae


def step_grads(sae: TrainingJointSAE, v, t, mode: str):
    """(loss, {name: grad}, output) of one paired pass on ``mode`` = "reference", "sparse" or "dense-codes"."""
    sae.zero_grad(set_to_none=True)
    sae.sparse_relu_max_density = 1.0 if mode == "sparse" else 0.0
    out = sae.paired_forward_pass(v, t, COEFFS, dense=mode == "reference")
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}, out


@pytest.mark.parametrize("alignment", ["cosine", "infonce", "l2", "none"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_fast_paths_match_the_reference_losses_and_gradients(alignment, variant):
    sae = make_sae(alignment, **variant)
    sae.mse_scale.copy_(torch.tensor([2.0, 3.0]))
    g = torch.Generator().manual_seed(1)
    v, t = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g) + 0.5
    ref_loss, ref_grads, ref = step_grads(sae, v, t, "reference")
    for mode in ("sparse", "dense-codes"):
        loss, grads, out = step_grads(sae, v, t, mode)
        assert out.path == mode and 0.1 < out.density < 0.9
        assert grads.keys() == ref_grads.keys()
        torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
        for k in ref.losses:
            torch.testing.assert_close(out.losses[k], ref.losses[k], atol=1e-5, rtol=1e-5, msg=f"{mode} {k}")
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=f"{mode} {name}")
        for m in ("vision", "text"):
            torch.testing.assert_close(out.feature_acts[m], ref.feature_acts[m].detach())
            torch.testing.assert_close(out.sae_out[m], ref.sae_out[m], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("blocked", [False, True], ids=["whole-W", "row-blocks"])
@pytest.mark.parametrize("alignment", ["cosine", "infonce"])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_the_two_modalities_side_by_side_give_the_same_step_as_one_after_the_other(alignment, variant, blocked,
                                                                                    monkeypatch):
    """With two intra-op threads the sparse step runs the modalities on two threads (in_pair): the same losses and
    gradients, bit for bit, as on one thread, and the reference's up to summation order — also when the decoder
    and the sampled code gradient read W in blocks of rows (row_blocks; here blocks of 5 latents)."""
    import threading

    import jsae.saes.sparse_relu as sr

    if blocked:
        monkeypatch.setattr(sr, "ROW_BLOCK_BYTES", 5 * 16 * 4)  # 5 rows of a [64, 16] float32 W_dec
        codes, _ = relu_codes(torch.tensor([[0.0, 1.0] * 32, [2.0, 0.0] * 32] * 4))  # 4 entries a latent
        blocks = sr.row_blocks(codes, torch.zeros(64, 16))
        assert blocks is not None and blocks.size == 5 and len(blocks.bounds) == 14
        fewer, _ = relu_codes(torch.tensor([[0.0, 1.0] * 32, [2.0, 0.0] * 32] * 2))
        assert sr.row_blocks(fewer, torch.zeros(64, 16)) is None  # 2 entries a latent: W is read whole
    started = []
    real_thread = threading.Thread

    def counting(*a, **k):  # type: ignore[no-untyped-def]
        started.append(k.get("name"))
        return real_thread(*a, **k)

    monkeypatch.setattr(sr.threading, "Thread", counting)
    sae = make_sae(alignment, **variant)
    g = torch.Generator().manual_seed(3)
    v, t = torch.randn(48, 16, generator=g), torch.randn(48, 16, generator=g) + 0.5
    _, ref_grads, _ = step_grads(sae, v, t, "reference")
    runs = {}
    for threads in (1, 2):
        before = len(started)
        torch.set_num_threads(threads)
        try:
            loss, grads, out = step_grads(sae, v, t, "sparse")
        finally:
            torch.set_num_threads(1)
        assert out.path == "sparse" and torch.get_num_threads() == 1
        runs[threads] = loss, grads, len(started) - before
    (loss1, grads1, n1), (loss2, grads2, n2) = runs[1], runs[2]
    assert n1 == 0 and n2 >= 3  # side by side: the codes, the decoders, the backward (and the active entries)
    assert set(started) == {"jsae-modality"}
    assert torch.equal(loss1, loss2) and grads1.keys() == grads2.keys() == ref_grads.keys()
    for name in grads1:
        assert torch.equal(grads1[name], grads2[name]), name
        torch.testing.assert_close(grads2[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_in_pair_runs_the_first_on_another_thread_and_raises_its_failure():
    import threading

    here = threading.get_ident()
    with torch.no_grad():
        (first, grad_mode), second = in_pair(lambda: (threading.get_ident(), torch.is_grad_enabled()),
                                             lambda: threading.get_ident(), True)
    assert first != here and second == here and grad_mode is False  # the caller's grad mode travels
    assert in_pair(lambda: threading.get_ident(), lambda: 2, False) == (here, 2)

    def fail() -> None:
        raise ValueError("boom in the first")

    with pytest.raises(ValueError, match="boom in the first"):
        in_pair(fail, lambda: 1, True)


def test_a_user_registered_alignment_gets_dense_codes_with_the_sparse_gradient():
    ALIGNMENT_LOSSES["test-dot"] = lambda zv, zt, **_: -(zv * zt).sum(-1).mean()
    try:
        sae = make_sae("test-dot")
        v, t = torch.randn(16, 16), torch.randn(16, 16)
        ref_loss, ref_grads, _ = step_grads(sae, v, t, "reference")
        loss, grads, out = step_grads(sae, v, t, "sparse")
        assert out.path == "sparse"
        torch.testing.assert_close(loss, ref_loss)
        for name, grad in ref_grads.items():
            torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    finally:
        del ALIGNMENT_LOSSES["test-dot"]


def test_the_path_follows_the_measured_density():
    sae = make_sae(shift=0.0)  # the default threshold, by width
    assert sae.sparse_relu_max_density is None and sae.sparse_relu_switch == pytest.approx(0.2)
    g = torch.Generator().manual_seed(2)
    v, t = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    measured = []
    for shift in (0.0, 0.5, 1.0, 2.0):
        with torch.no_grad():
            for m in ("vision", "text"):
                sae.b_enc_of(m).fill_(-shift)
        out = sae.paired_forward_pass(v, t, COEFFS)
        with torch.no_grad():
            density = max(float((sae._pre(x, m) > 0).float().mean()) for m, x in (("vision", v), ("text", t)))
        assert out.density == pytest.approx(density)
        assert out.path == ("sparse" if density <= sae.sparse_relu_switch else "dense-codes")
        measured.append((density, out.path))
    assert {p for _, p in measured} == {"sparse", "dense-codes"}  # both sides of the threshold were seen
    assert sae.paired_forward_pass(v, t, COEFFS, dense=True).path == "dense"


class ReferenceSAE(TrainingJointSAE):
    """The trainer on the plain-autograd reference pass."""

    def paired_forward_pass(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        return super().paired_forward_pass(*args, **kwargs, dense=True)


def train(cls, steps, max_density=None, seed=0, trainer_kw=None, **kw):
    torch.manual_seed(seed)
    sae = cls(TrainingJointSAEConfig(d_in=16, d_sae=32, **kw))
    if max_density is not None:
        sae.sparse_relu_max_density = max_density
    paths: list[str] = []
    inner = sae.paired_forward_pass

    def record(*a, **k):  # type: ignore[no-untyped-def]
        out = inner(*a, **k)
        paths.append(out.path)
        return out

    sae.paired_forward_pass = record  # type: ignore[method-assign]
    tr = JointSAETrainer(sae, JointTrainerConfig(total_steps=steps, lr=3e-3, progress=False, seed=seed, log_every=10,
                                                 **{"dead_feature_window": 5, **(trainer_kw or {})}),
                         PairedTensorData(*pairs(), batch_size=32))
    tr.fit()
    return tr, paths


@pytest.mark.parametrize("alignment", ["cosine", "infonce"])
def test_training_on_the_fast_path_matches_the_reference_after_a_few_steps(alignment):
    ref, ref_paths = train(ReferenceSAE, 10, alignment=alignment)
    for max_density, path in ((1.0, "sparse"), (0.0, "dense-codes")):
        fast, paths = train(TrainingJointSAE, 10, max_density=max_density, alignment=alignment)
        assert set(ref_paths) == {"dense"} and set(paths) == {path}
        for (name, a), b in zip(ref.sae.state_dict().items(), fast.sae.state_dict().values()):
            torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=f"{path} {name}")
        assert torch.equal(fast.steps_since_fired, ref.steps_since_fired)  # dead-latent counters from the codes
        for h_ref, h in zip(ref.history, fast.history):
            assert h["losses/overall_loss"] == pytest.approx(h_ref["losses/overall_loss"], rel=1e-4)


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_training_with_revival_on_the_fast_path_matches_the_reference(activation):
    """With dead-latent revival on (resampling every 6 steps; TopK also AuxK, SAELens's coefficient 1.0) the fast
    paths train exactly as the reference: same weights, same resampled latents, same dead-latent counters."""
    kw = dict(activation=activation, k=4, l1_coefficient=1.0, trainer_kw={"dead_feature_window": 2, "resample_every": 6})
    ref, ref_paths = train(ReferenceSAE, 24, **kw)
    fast, paths = train(TrainingJointSAE, 24, max_density=1.0, **kw)
    assert set(ref_paths) == {"dense"} and set(paths) == {"sparse"}
    assert ref.resampled == fast.resampled and len(ref.resampled) == 3
    assert sum(r["vision"] + r["text"] for r in ref.resampled) > 0  # latents were resampled
    if activation == "topk":
        assert any(k.startswith("losses/auxiliary_reconstruction_loss") for h in ref.history for k in h)
    for (name, a), b in zip(ref.sae.state_dict().items(), fast.sae.state_dict().values()):
        torch.testing.assert_close(b, a, atol=2e-5, rtol=1e-4, msg=name)
    assert torch.equal(fast.steps_since_fired, ref.steps_since_fired)


def test_fast_path_training_converges_like_the_reference():
    """200 steps with the automatic switch (codes start dense, then go sparse) against the reference."""
    ref, _ = train(ReferenceSAE, 200, l1_coefficient=0.3)
    fast, paths = train(TrainingJointSAE, 200, max_density=0.3, l1_coefficient=0.3)
    assert paths[0] == "dense-codes" and paths[-1] == "sparse"  # the switch happened during training
    for key in ("losses/overall_loss", "metrics/explained_variance_vision", "metrics/explained_variance_text",
                "metrics/l0_vision", "metrics/l0_text"):
        assert fast.history[-1][key] == pytest.approx(ref.history[-1][key], rel=0.05, abs=0.02), key
    assert fast.history[-1]["losses/overall_loss"] < 0.5 * fast.history[0]["losses/overall_loss"]


def test_relu_codes_groups_entries_by_row_and_by_latent():
    pre = torch.tensor([[0.5, -1.0, 2.0], [-0.1, -0.2, -0.3], [1.0, 3.0, 0.0]])
    codes, values = relu_codes(pre)
    assert values.tolist() == [0.5, 2.0, 1.0, 3.0]
    assert codes.rows.tolist() == [0, 0, 2, 2] and codes.cols.tolist() == [0, 2, 0, 1]
    assert codes.offsets.tolist() == [0, 2, 2]  # the empty row 1 is an empty bag
    assert codes.latent_counts.tolist() == [2, 1, 1] and codes.bags.offsets.tolist() == [0, 2, 3]
    assert codes.bags.sample_of_entry.tolist() == [0, 2, 2, 0]  # latent 0: rows 0, 2; latent 1: row 2; latent 2: row 0
    assert codes.density == pytest.approx(4 / 9)


def test_argsort_latents_is_stable_and_restores_the_thread_count():
    before = torch.get_num_threads()
    keys = torch.randint(0, 50, (10_000,))
    order = argsort_latents(keys)
    assert torch.equal(order, torch.argsort(keys, stable=True))
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("alignment", ["cosine", "infonce", "l2", "none"])
@pytest.mark.parametrize("variant", VARIANTS[:4], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_topk_sparse_path_matches_the_reference_with_dead_latents(alignment, variant):
    """TopK runs on the same sparse-code functions (its k entries per sample, and the auxiliary loss's)."""
    torch.manual_seed(0)
    sae = TrainingJointSAE(TrainingJointSAEConfig(d_in=16, d_sae=64, activation="topk", k=6, alignment=alignment,
                                                  init="torch-linear", **variant))
    g = torch.Generator().manual_seed(4)
    v, t = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    dead = torch.zeros(2, 64, dtype=torch.bool)
    dead[:, ::3] = True
    results = []
    for dense in (True, False):
        sae.zero_grad(set_to_none=True)
        out = sae.paired_forward_pass(v, t, {"l1": 0.0, "alignment": 1.0, "aux": 0.5}, dead, dense=dense)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in sae.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (out, grads) = results
    assert ref.path == "dense" and out.path == "sparse" and "auxiliary_reconstruction_loss_text" in out.losses
    for k in ref.losses:
        torch.testing.assert_close(out.losses[k], ref.losses[k], atol=1e-5, rtol=1e-5, msg=k)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)
    for m in ("vision", "text"):
        torch.testing.assert_close(out.feature_acts[m], ref.feature_acts[m].detach())
        assert torch.equal(out.fired[m], ref.feature_acts[m].amax(0) > 0)


def test_dense_cosine_matches_the_plain_loss_and_gradient_with_empty_and_tiny_rows():
    from jsae.saes.alignment import cosine
    from jsae.saes.sparse_relu import dense_cosine

    g = torch.Generator().manual_seed(3)
    z = torch.relu(torch.randn(2, 12, 40, generator=g, dtype=torch.float64))
    z[0, 3] = 0.0  # a sample without active codes in one modality
    z[1, 5] = 0.0
    z[0, 7], z[1, 7] = 0.0, 0.0  # in both
    z[0, 9] = 1e-10 * (torch.arange(40) == 2)  # a norm below the clamp
    results = []
    for fn in (cosine, dense_cosine):
        zv, zt = z[0].clone().requires_grad_(), z[1].clone().requires_grad_()
        loss = fn(zv, zt)
        loss.backward()
        results.append((loss.detach(), zv.grad, zt.grad))
    (ref, gv_ref, gt_ref), (got, gv, gt) = results
    assert 0.1 < float(ref) < 1.0 and float(gv_ref[9].abs().max()) > 1e6  # the tiny row's gradient is large
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(gv, gv_ref)
    torch.testing.assert_close(gt, gt_ref)
    # the sparse path's cosine, on the same codes' active entries
    from jsae.saes.sparse_relu import sparse_cosine

    # without the dense codes (matching entries found by search) and with them (partners gathered): the same bits
    sparse_results = []
    for with_dense in (False, True):
        (cv, vv), (ct, vt) = relu_codes(z[0]), relu_codes(z[1])
        if with_dense:
            cv, ct = cv._replace(dense=z[0]), ct._replace(dense=z[1])
        vv, vt = vv.clone().requires_grad_(), vt.clone().requires_grad_()
        loss = sparse_cosine(vv, cv, vt, ct)
        loss.backward()
        torch.testing.assert_close(loss.detach(), ref)
        torch.testing.assert_close(vv.grad, gv_ref[cv.rows, cv.cols])
        torch.testing.assert_close(vt.grad, gt_ref[ct.rows, ct.cols])
        sparse_results.append((loss.detach(), vv.grad, vt.grad))
    for a, b in zip(*sparse_results):
        assert torch.equal(a, b)


def test_partner_values_gather_equals_the_matched_entries():
    from jsae.saes.sparse_relu import partner_values

    g = torch.Generator().manual_seed(7)
    pre = torch.randn(2, 64, 512, generator=g) - 1.0  # ~16% active, partly overlapping
    (cv, vv), (ct, vt) = relu_codes(pre[0]), relu_codes(pre[1])
    searched = partner_values(cv, vt, ct)
    gathered = partner_values(cv, vt, ct._replace(dense=pre[1].relu()))
    assert torch.equal(searched, gathered)
    both = (pre[0] > 0) & (pre[1] > 0)
    assert 0 < int((searched > 0).sum()) == int(both.sum())  # non-zero exactly where both are active
    assert torch.equal(searched, pre[1].relu()[cv.rows, cv.cols])


def test_one_thread_runs_its_block_on_one_thread_and_restores_the_count():
    from jsae.saes.sparse_relu import one_thread

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with one_thread():
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with one_thread(enabled=False):
            assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError, match="inside"):
            with one_thread():
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_dense_code_path_reports_the_fired_latents_from_its_density_count():
    sae = make_sae(shift=0.0)
    sae.sparse_relu_max_density = 0.0
    g = torch.Generator().manual_seed(4)
    v, t = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    with torch.no_grad():
        sae.b_enc_of("vision")[:5] = -50.0  # five latents that cannot fire on the vision side
    out = sae.paired_forward_pass(v, t, COEFFS)
    assert out.path == "dense-codes" and out.fired is not None
    for m in ("vision", "text"):
        assert torch.equal(out.fired[m], out.feature_acts[m].amax(0) > 0)
    assert not out.fired["vision"][:5].any() and out.fired["vision"].sum() > 20


def test_a_training_step_on_the_sparse_path_keeps_the_thread_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for activation, max_density in (("relu", 1.0), ("topk", None)):
            tr, paths = train(TrainingJointSAE, 3, max_density=max_density, activation=activation, k=4)
            assert set(paths) == {"sparse"} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_sparse_path_holds_until_the_stay_factor_times_the_switch_density():
    """Hysteresis: a dense step turns sparse at sparse_relu_switch; a sparse one turns dense only above
    sparse_relu_stay_factor times it; in between the path stays what it was."""
    sae = make_sae(shift=0.0)
    switch, stay = sae.sparse_relu_switch, sae.sparse_relu_switch * sae.sparse_relu_stay_factor
    assert (switch, stay) == pytest.approx((0.2, 0.25))
    g = torch.Generator().manual_seed(5)
    v, t = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)

    def step(shift: float):
        with torch.no_grad():
            for m in ("vision", "text"):
                sae.b_enc_of(m).fill_(-shift)
        return sae.paired_forward_pass(v, t, COEFFS)

    densities = {s: step(s).density for s in (0.0, 0.3, 0.35, 0.4, 0.45, 0.6, 1.0, 1.4, 2.5)}
    between = [s for s, d in densities.items() if switch < d <= stay]
    above = [s for s, d in densities.items() if d > stay]
    below = [s for s, d in densities.items() if d <= switch]
    assert between and above and below, densities
    path = [step(s).path for s in (above[0], between[0], below[0], between[0], above[-1], between[0])]
    assert path == ["dense-codes", "dense-codes", "sparse", "sparse", "dense-codes", "dense-codes"]
    assert step(below[0]).path == "sparse"
    sae.sparse_relu_max_density = 0.0  # forcing the dense path works after a sparse step too
    assert step(below[0]).path == "dense-codes"


def test_thread_pick_probes_both_counts_and_keeps_the_faster():
    import time

    from jsae.saes.sparse_relu import ThreadPick

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for slow, expect_one in ((2, True), (1, False)):
            pick, seen = ThreadPick(probes=2, every=8), []
            for _ in range(12):
                with pick.block():
                    seen.append(torch.get_num_threads())
                    time.sleep(0.02 if torch.get_num_threads() == slow else 0.0)
                assert torch.get_num_threads() == 2  # restored after every block
            best = 1 if expect_one else 2
            # call 0 untimed, 1-4 alternate one / two threads, then the faster; call 8 starts the next probe
            assert seen == [2, 1, 2, 1, 2, best, best, best, best, 1, 2, 1]
            assert pick.one is expect_one
        with pytest.raises(RuntimeError, match="inside"):
            with pick.block():
                raise RuntimeError("inside")
        assert torch.get_num_threads() == 2
        with pick.block(enabled=False):
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="probes"):
        ThreadPick(probes=0)


def test_the_optimiser_step_gives_the_same_weights_on_one_thread_and_on_two():
    """The trainer's ThreadPick block (decoder housekeeping, clipping, Adam) gives bitwise the same training on
    either thread count, so the timed choice never changes the numbers (sizes above the 32k-element grain)."""
    from jsae.saes.sparse_relu import ThreadPick

    class Fixed(ThreadPick):
        def __init__(self, n: int):
            super().__init__()
            self.n = n

        def threads_for(self, phase: int, threads: int) -> int:
            return self.n

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        g = torch.Generator().manual_seed(6)
        v, t = torch.randn(256, 64, generator=g), torch.randn(256, 64, generator=g)
        states, used = [], []
        for n in (1, 2):
            torch.manual_seed(0)
            sae = TrainingJointSAE(TrainingJointSAEConfig(d_in=64, d_sae=1024))
            tr = JointSAETrainer(sae, JointTrainerConfig(total_steps=4, lr=1e-3, progress=False, grad_clip_norm=0.5),
                                 PairedTensorData(v, t, batch_size=128))
            tr._housekeeping = Fixed(n)
            tr.optimizer.register_step_pre_hook(lambda *_: used.append(torch.get_num_threads()))
            tr.fit()
            states.append({k: x.clone() for k, x in tr.sae.state_dict().items()})
        assert used == [1] * 4 + [2] * 4
        for k in states[0]:
            assert torch.equal(states[0][k], states[1][k]), k
    finally:
        torch.set_num_threads(before)


def test_the_switch_density_falls_with_the_width_between_the_measured_ends():
    from jsae.saes.sparse_relu import SPARSE_SWITCH_LARGE, SPARSE_SWITCH_SMALL, sparse_switch_density

    assert sparse_switch_density(16, 32) == pytest.approx(0.2)  # below the small end: its value
    assert sparse_switch_density(512, 4096) == pytest.approx(SPARSE_SWITCH_SMALL[1]) == pytest.approx(0.2)
    assert sparse_switch_density(4096, 16384) == pytest.approx(SPARSE_SWITCH_LARGE[1]) == pytest.approx(0.15)
    assert sparse_switch_density(8192, 65536) == pytest.approx(0.15)  # above the large end: its value
    # halfway in log(d_in * d_sae) (2**23.5 weights): the geometric mean of the two ends
    assert sparse_switch_density(2**11, 2**12 * 2**0.5) == pytest.approx((0.2 * 0.15) ** 0.5)
    widths = [(512, 4096), (768, 6144), (1024, 8192), (2048, 8192), (2304, 16384), (4096, 16384)]
    values = [sparse_switch_density(a, b) for a, b in widths]
    assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
    sae = TrainingJointSAE(TrainingJointSAEConfig(d_in=2048, d_sae=8192))
    assert sae.sparse_relu_switch == pytest.approx(sparse_switch_density(2048, 8192))
    sae.sparse_relu_max_density = 0.5  # an explicit switch wins
    assert sae.sparse_relu_switch == 0.5


def test_row_blocks_decode_and_sample_as_the_whole_matrix(monkeypatch):
    """The decoder and the sampled product read W in blocks of rows (a 7-latent block, the last one shorter, one
    block empty) and give the dense products' numbers."""
    import jsae.saes.sparse_relu as sr

    monkeypatch.setattr(sr, "ROW_BLOCK_BYTES", 7 * 8 * 4)
    g = torch.Generator().manual_seed(5)
    pre = torch.randn(12, 40, generator=g)
    pre[:, 7:14] = -1.0  # the second block holds no entry
    codes, values = relu_codes(pre.clone())
    W, grad_out = torch.randn(40, 8, generator=g), torch.randn(12, 8, generator=g)
    blocks = sr.row_blocks(codes, W)
    assert blocks is not None and blocks.size == 7 and blocks.bounds[1] == blocks.bounds[2]
    assert blocks.bounds[-1] == codes.rows.numel() and len(blocks.bounds) == 7  # ceil(40 / 7) blocks
    z = pre.clamp(min=0)
    torch.testing.assert_close(sr._decode(values, W, codes, blocks), z @ W)
    torch.testing.assert_close(sr._sampled(grad_out, W, codes, blocks), (grad_out @ W.t())[codes.rows, codes.cols])
    assert sr.row_blocks(codes, torch.zeros(14, 8)) is None  # two blocks or fewer: W is read whole
