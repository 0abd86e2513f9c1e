"""jsae's core metrics (:class:`jsae.releases.saebench.CoreMetrics`, what ``jsae release core-metrics`` reports)
against SAELens's own evaluation (``sae_lens.evals``) on the same activations: a tiny ``HookedTransformer`` built
from its config (no hub), SAELens's ``ActivationsStore`` over an in-memory token dataset, a standard SAELens SAE.

Every metric is SAELens's definition, so the two agree to float rounding (relative 1e-5), with one documented
difference: jsae pools ``relative_reconstruction_bias`` over all tokens (Σ‖x̂‖² / Σ x·x̂) where SAELens averages
each batch's ratio; they agree for one batch, and for several the test asserts each side's own formula."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.evals import get_downstream_reconstruction_metrics, get_sparsity_and_variance_metrics
from sae_lens.saes.sae import SAEMetadata
from sae_lens.training.activation_scaler import ActivationScaler
from sae_lens.training.activations_store import ActivationsStore
from transformer_lens import HookedTransformer, HookedTransformerConfig

from jsae.releases.saebench import CoreMetrics

HOOK, CTX, D, VOCAB = "blocks.0.hook_resid_post", 12, 16, 40
REL = 1e-5


class RecordingStore:
    """SAELens's store, recording the token batches SAELens's evaluation draws (for jsae to read the same)."""

    def __init__(self, store: ActivationsStore) -> None:
        self.store, self.batches = store, []

    def get_batch_tokens(self, batch_size: int | None = None, **kwargs) -> torch.Tensor:
        tokens = self.store.get_batch_tokens(batch_size, **kwargs)
        self.batches.append(tokens)
        return tokens


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=D, n_ctx=CTX, d_head=4, n_heads=4, d_mlp=32,
                                                      d_vocab=VOCAB, act_fn="relu", normalization_type="LN", seed=0))
    g = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"input_ids": torch.randint(0, VOCAB, (24, CTX), generator=g).tolist()})
    store = ActivationsStore(model, data, streaming=False, hook_name=HOOK, hook_head_index=None, context_size=CTX,
                             d_in=D, n_batches_in_buffer=2, total_training_tokens=24 * CTX, store_batch_size_prompts=4,
                             train_batch_size_tokens=32, prepend_bos=False, normalize_activations="none",
                             device=torch.device("cpu"), dtype="float32")
    with torch.no_grad():
        scale = float(model.run_with_cache(torch.tensor(data["input_ids"][:4]), names_filter=[HOOK])[1][HOOK].std())
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=48, metadata=SAEMetadata(hook_name=HOOK)))
    with torch.no_grad():  # latents ±e_i with a threshold (a good but lossy reconstruction) and 16 random ones
        eye = torch.eye(D)
        sae.W_enc.copy_(torch.cat([eye, -eye, torch.randn(D, 16, generator=g) / D ** 0.5], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye, torch.randn(16, D, generator=g) * 0.1]))
        sae.b_enc.copy_(torch.cat([torch.full((2 * D,), -0.3 * scale), torch.randn(16, generator=g) * scale]))
    return model, RecordingStore(store), sae


def jsae_metrics(model: HookedTransformer, sae: StandardSAE, batches: list[torch.Tensor], downstream: bool) -> dict:
    """jsae's :class:`CoreMetrics` on the hook's activations of ``batches`` (every position, as SAELens reads them)."""
    acc = CoreMetrics()
    for tokens in batches:
        with torch.no_grad():
            clean, cache = model.run_with_cache(tokens, names_filter=[HOOK])
            x = cache[HOOK].flatten(0, 1)
            z = sae.encode(x)
            acc.add_reconstruction(x, z, sae.decode(z))
            if downstream:
                spliced = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: sae.decode(sae.encode(a)))])
                ablated = model.run_with_hooks(tokens, fwd_hooks=[(HOOK, lambda a, hook: torch.zeros_like(a))])
                every = torch.ones_like(tokens, dtype=torch.bool)
                acc.add_downstream(tokens, every, every, clean, spliced, ablated)
    return acc.compute()


@pytest.mark.parametrize("n_batches", [1, 3])
def test_sparsity_and_variance_metrics_agree_with_saelens(setup, n_batches):
    model, store, sae = setup
    store.batches.clear()
    theirs, _ = get_sparsity_and_variance_metrics(
        sae, model, store, ActivationScaler(), n_batches=n_batches, compute_l2_norms=True, compute_sparsity_metrics=True,
        compute_variance_metrics=True, compute_featurewise_density_statistics=False, eval_batch_size_prompts=4,
        model_kwargs={})
    assert len(store.batches) == n_batches
    ours = jsae_metrics(model, sae, store.batches, downstream=False)
    keys = ("l2_norm_in", "l2_norm_out", "l2_ratio", "l0", "l1", "mse", "cossim", "explained_variance",
            "explained_variance_legacy")
    assert set(keys) < set(theirs)
    for k in keys:
        assert ours[k] == pytest.approx(theirs[k], rel=REL), k
    assert 0 < ours["l0"] < 48 and 0 < ours["explained_variance"] < 1  # a case where the metrics say something
    assert ours["total_tokens_eval_sparsity_variance"] == n_batches * 4 * CTX
    # relative reconstruction bias: SAELens averages each batch's ratio, jsae pools the sums over every token
    per_batch = []
    num = den = 0.0
    for tokens in store.batches:
        with torch.no_grad():
            x = model.run_with_cache(tokens, names_filter=[HOOK])[1][HOOK].flatten(0, 1)
            x_hat = sae.decode(sae.encode(x))
        per_batch.append(float(x_hat.pow(2).sum(-1).mean() / (x * x_hat).sum(-1).mean()))
        num, den = num + float(x_hat.pow(2).sum()), den + float((x * x_hat).sum())
    assert theirs["relative_reconstruction_bias"] == pytest.approx(sum(per_batch) / n_batches, rel=REL)
    assert ours["relative_reconstruction_bias"] == pytest.approx(num / den, rel=REL)
    if n_batches == 1:
        assert ours["relative_reconstruction_bias"] == pytest.approx(theirs["relative_reconstruction_bias"], rel=REL)
    else:  # the two definitions differ here, so the check above can tell them apart
        assert ours["relative_reconstruction_bias"] != pytest.approx(theirs["relative_reconstruction_bias"], rel=1e-4)


def test_downstream_metrics_agree_with_saelens(setup):
    """CE with and without the SAE and with the hook zero-ablated, KL to the clean run, and their scores."""
    model, store, sae = setup
    store.batches.clear()
    theirs = get_downstream_reconstruction_metrics(sae, model, store, ActivationScaler(), compute_kl=True,
                                                   compute_ce_loss=True, n_batches=2, eval_batch_size_prompts=4)
    ours = jsae_metrics(model, sae, store.batches, downstream=True)
    for k in ("kl_div_with_sae", "kl_div_with_ablation", "kl_div_score", "ce_loss_with_sae", "ce_loss_without_sae",
              "ce_loss_with_ablation", "ce_loss_score"):
        assert ours[k] == pytest.approx(theirs[k], rel=REL), k
    assert 0 < ours["kl_div_with_sae"] < ours["kl_div_with_ablation"]  # the SAE keeps more than zero-ablation
