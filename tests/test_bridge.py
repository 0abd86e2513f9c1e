"""TransformerLens users, first class: JSAEs on TransformerLens's ``TransformerBridge`` through SAELens's
``SAETransformerBridge``, on both shipped toy VLMs.

A JSAE names its hook every way (module path, ``blocks.L.hook_out``, ``blocks.L.hook_resid_post``);
``add_sae`` attaches a shipped release without edits and fails loudly otherwise; inside ``sae.routing(mask)``
image tokens go through the vision branch and text through the text branch in one forward (codes equal the
branches' own ``encode`` on the same rows); steering and clamping through the bridge caption as jsae's nnsight
interventions do; ``jsae.load_bridge`` leaves jsae's own model unchanged and reads what nnsight reads; SAELens's
own evals run on a JSAE through the bridge and match a hand computation."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from sae_lens import SAE, SAETransformerBridge

import jsae
from jsae.activations import read_layers
from jsae.saes import JointSAE, JointSAEConfig
from jsae.world import world_dataset
from jsae.world.processors import CAPTION_PROMPT

MODELS = ("llava", "qwen3-vl-moe")
LAYER = 4


# ---- hook names and routing on a bare JSAE ----------------------------------------------------------


def test_a_jsae_names_its_hook_every_way(tmp_path: Path) -> None:
    sae = JointSAE(JointSAEConfig(d_in=8, d_sae=16, metadata={"hook_name": "model.language_model.layers.3"}))  # type: ignore[arg-type]
    assert (sae.cfg.metadata.hook_name, sae.cfg.metadata.hf_hook_name, sae.cfg.metadata.layer) == \
        ("blocks.3.hook_out", "model.language_model.layers.3", 3)
    assert sae.hook_names == {"hf": "model.language_model.layers.3", "bridge": "blocks.3.hook_out",
                              "hooked_transformer": "blocks.3.hook_resid_post"}
    sae.cfg.metadata.hook_name = "model.language_model.layers.5"   # set by hand after construction, as SAELens code does
    sae.cfg.metadata.hf_hook_name = sae.cfg.metadata.layer = None
    sae.save_model(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "cfg.json").read_text())["metadata"]
    assert (meta["hook_name"], meta["hf_hook_name"], meta["layer"]) == ("blocks.5.hook_out", "model.language_model.layers.5", 5)
    # a cfg.json naming HookedTransformer's hook keeps it (HookedSAETransformer attaches there) and knows the others
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    cfg["metadata"].update(hook_name="blocks.5.hook_resid_post", hf_hook_name=None)
    (tmp_path / "s" / "cfg.json").write_text(json.dumps(cfg))
    back = SAE.load_from_disk(str(tmp_path / "s"))
    assert back.cfg.metadata.hook_name == "blocks.5.hook_resid_post"
    assert back.hook_names == {"hf": None, "bridge": "blocks.5.hook_out", "hooked_transformer": "blocks.5.hook_resid_post"}


@pytest.mark.parametrize("name", MODELS)
def test_shipped_releases_carry_what_saelens_reads(name: str) -> None:
    """Bridge hook name, module path and SAELens's evals metadata, as stored in the shipped cfg.json itself."""
    sae = SAE.from_pretrained(f"jsae-shapes-{name}-l{LAYER}")
    raw = json.loads((jsae.releases.registry.release_file(f"jsae-shapes-{name}-l{LAYER}", filename="cfg.json")).read_text())
    vlm_cls = jsae.adapters.adapter_class(raw["metadata"]["model_class"]).model_classes
    assert raw["metadata"]["hook_name"] == f"blocks.{LAYER}.hook_out" == sae.cfg.metadata.hook_name
    assert raw["metadata"]["hf_hook_name"] == f"model.language_model.layers.{LAYER}"
    assert raw["metadata"]["model_class"] in vlm_cls
    assert raw["metadata"]["prepend_bos"] is True and isinstance(raw["metadata"]["context_size"], int)


def test_routing_codes_equal_each_branchs_own_encode() -> None:
    torch.manual_seed(0)
    sae = JointSAE(JointSAEConfig(d_in=12, d_sae=40, activation="topk", k=5))
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_()
    x, extra = torch.randn(3, 7, 12), torch.randn(3, 2, 12)
    image = torch.zeros(3, 7, dtype=torch.bool)
    image[0, 1:4], image[1, :5], image[2, 6] = True, True, True
    with sae.routing(image):
        z = sae.encode(x)
        recon = sae.decode(z)
        out = sae(x)
        z_more = sae.encode(torch.cat([x, extra], dim=1))   # prompt + 2 generated tokens, no KV cache
        z_step = sae.encode(x[:, -1:])                      # one decode step with the cache
    assert torch.equal(z[image], sae.encode(x[image], "vision")) and torch.equal(z[~image], sae.encode(x[~image], "text"))
    assert torch.equal(recon[image], sae.decode(z[image], "vision")) and torch.equal(recon[~image], sae.decode(z[~image], "text"))
    assert not torch.equal(z[image], sae.encode(x[image], "text"))           # the routing is not a no-op
    torch.testing.assert_close(out, recon)
    assert torch.equal(z_more[:, :7], z) and torch.equal(z_more[:, 7:], sae.encode(extra, "text"))
    assert torch.equal(z_step, sae.encode(x[:, -1:], "text"))
    assert torch.equal(sae.encode(x), sae.encode(x, "text"))                  # routing ends with the block
    with pytest.raises(ValueError, match=r"needs \[batch=3, seq, d\] states"), sae.routing(image):
        sae.encode(x[:2])
    with pytest.raises(TypeError, match="bool image-token mask"), sae.routing(image.long()):  # type: ignore[arg-type]
        pass


# ---- the bridge on the toy VLMs ------------------------------------------------------------------


@pytest.fixture(scope="module", params=MODELS)
def bridged(request: pytest.FixtureRequest):
    vlm = jsae.load_vlm(request.param)
    return request.param, vlm, jsae.load_bridge(vlm)


def _images(n: int, seed: int) -> list:
    return [e["image"] for e in world_dataset("test", n, seed=seed)]


@pytest.mark.slow
def test_load_bridge_leaves_jsaes_model_as_it_was_and_reads_what_nnsight_reads(bridged) -> None:
    name, vlm, bridge = bridged
    hf = vlm.hf_model
    assert isinstance(bridge, SAETransformerBridge) and bridge.processor is vlm.processor
    assert hf.config._attn_implementation != "eager" and bridge.original_model.config._attn_implementation == "eager"
    assert type(hf.model.language_model.layers[LAYER]).__name__.endswith("DecoderLayer")     # no bridge component in it
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(hf.parameters(), bridge.original_model.parameters()))
    assert importlib.util.find_spec("torchvision") is None      # TransformerLens's processor fallback did not run pip
    ex = world_dataset("test", 3, seed=0)
    inputs = bridge.build_inputs([e["image"] for e in ex], [e["caption"] for e in ex])
    tokens, kwargs = bridge.split_inputs(inputs)
    logits, cache = bridge.run_with_cache(tokens, **kwargs)
    ref = read_layers(vlm.model, vlm.adapter, inputs, [LAYER], logits=True)
    attended = kwargs["attention_mask"].bool()
    h = cache[f"blocks.{LAYER}.hook_out"]
    diff = (h - ref[LAYER])[attended].abs().max().item()
    scale = ref[LAYER][attended].abs().max().item()
    print(f"{name}: bridge vs nnsight read of layer {LAYER}: max |diff| {diff:.2e} (states up to {scale:.1f})")
    torch.testing.assert_close(h[attended], ref[LAYER][attended], atol=1e-4 * scale, rtol=1e-4)
    torch.testing.assert_close(logits[attended], ref["logits"][attended], atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_add_sae_attaches_a_shipped_release_and_routes_image_tokens_to_the_vision_branch(bridged) -> None:
    name, vlm, bridge = bridged
    sae = SAE.from_pretrained(f"jsae-shapes-{name}-l{LAYER}")
    ex = world_dataset("test", 3, seed=2)
    inputs = bridge.build_inputs([e["image"] for e in ex], [e["caption"] for e in ex])
    tokens, kwargs = bridge.split_inputs(inputs)
    image = bridge.image_token_mask(inputs)
    plain = bridge(tokens, **kwargs)
    with sae.routing(image):
        logits, cache = bridge.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True, **kwargs)
    assert bridge.get_sae_hook_name(sae) == f"blocks.{LAYER}.hook_out.hook_sae_acts_post"
    z, x = cache[bridge.get_sae_hook_name(sae)], cache[f"blocks.{LAYER}.hook_out.hook_sae_input"]
    assert torch.equal(z[image], sae.encode(x[image], "vision")) and torch.equal(z[~image], sae.encode(x[~image], "text"))
    assert bool((z[image] > 0).any()) and bool((z[~image] > 0).any())
    torch.testing.assert_close(logits, plain, atol=1e-4, rtol=1e-5)         # error term kept: the model's own output
    _, unrouted = bridge.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True, **kwargs)
    z_text_everywhere = unrouted[bridge.get_sae_hook_name(sae)]
    assert torch.equal(z_text_everywhere[image], sae.encode(x[image], "text"))
    assert not torch.allclose(z_text_everywhere[image], z[image])            # what routing changes
    assert bridge.acts_to_saes == {}                                         # removed after the run


@pytest.mark.slow
def test_a_failed_attach_is_an_error_and_hooks_survive_sae_removal(bridged) -> None:
    name, vlm, bridge = bridged
    sae = SAE.from_pretrained(f"jsae-shapes-{name}-l{LAYER}")
    sae.cfg.metadata.hook_name = f"blocks.{bridge.cfg.n_layers + 3}.hook_out"
    with pytest.raises(ValueError, match=r"is not a hook of this bridge \(this bridge has blocks 0\.\.\d+\)"):
        bridge.add_sae(sae)
    sae.cfg.metadata.hook_name = "blocks.2.attn.nowhere"
    with pytest.raises(ValueError, match="is not a hook of this bridge"):
        bridge.run_with_cache_with_saes(torch.ones(1, 3, dtype=torch.long), saes=[sae])
    assert bridge.acts_to_saes == {}
    # after an SAE is attached and removed, a plain hook on that point still fires
    ok = SAE.from_pretrained(f"jsae-shapes-{name}-l{LAYER}")
    inputs = bridge.build_inputs(_images(1, 3), ["a cat"])
    tokens, kwargs = bridge.split_inputs(inputs)
    bridge.run_with_cache_with_saes(tokens, saes=[ok], **kwargs)
    base = bridge(tokens, **kwargs)
    zeroed = bridge.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.hook_out", lambda t, hook: t * 0)], **kwargs)
    assert not torch.allclose(zeroed, base)


def _concept_features(sae: JointSAE, n: int = 2) -> list[int]:
    labels = jsae.load_labels(sae)
    kinds = ("shared", "vision-only")
    concept = max({lab.label for lab in labels.labels if lab.kind in kinds},
                  key=lambda c: len(labels.features_for(c, kinds)))
    return labels.features_for(concept, kinds)[:n]


@pytest.mark.slow
def test_steering_and_clamping_through_the_bridge_caption_as_jsaes_interventions(bridged) -> None:
    name, vlm, bridge = bridged
    model, processor, adapter = vlm
    sae = SAE.from_pretrained(f"jsae-shapes-{name}-l{LAYER}")
    images = _images(4, seed=5)
    inputs = adapter.build_inputs(processor, images, [CAPTION_PROMPT] * len(images), add_generation_prompt=True)
    image = adapter.image_token_mask(inputs)
    n_new = 10
    plain = jsae.generate(model, inputs, max_new_tokens=n_new, processor=processor)
    assert bridge.generate_from_inputs(inputs, n_new) == plain

    feats = _concept_features(sae)
    h = read_layers(model, adapter, inputs, [LAYER])[LAYER]
    norm = float(h[image].norm(dim=-1).mean())
    direction = sae.W_dec_of("vision")[feats[0]].detach()
    direction = direction / direction.norm()
    strength = 1.5 * norm
    steered = jsae.generate(model, inputs, [jsae.Steer(LAYER, "image", direction=direction, strength=strength,
                                                       timing="prefill")], max_new_tokens=n_new, processor=processor)

    def steer(t: torch.Tensor, hook: object) -> torch.Tensor:    # the prompt's image tokens, at every (uncached) step
        mask = torch.cat([image, image.new_zeros(t.shape[0], t.shape[1] - image.shape[1])], dim=1)
        return t + strength * direction * mask[..., None]

    with bridge.hooks(fwd_hooks=[(f"blocks.{LAYER}.hook_out", steer)]):
        assert bridge.generate_from_inputs(inputs, n_new) == steered
    assert steered != plain

    with torch.no_grad():
        value = 4.0 * float(sae.encode(h[image], "vision")[:, feats].max())
    clamped = jsae.generate(model, inputs, [jsae.Clamp(LAYER, "image", sae=sae, features=feats, strength=value,
                                                       timing="prefill")], max_new_tokens=n_new, processor=processor)

    def clamp(z: torch.Tensor, hook: object) -> torch.Tensor:
        mask = torch.cat([image, image.new_zeros(z.shape[0], z.shape[1] - image.shape[1])], dim=1)
        z = z.clone()
        z[..., feats] = torch.where(mask[..., None], torch.full_like(z[..., feats], value), z[..., feats])
        return z

    with sae.routing(image), bridge.saes(saes=[sae], use_error_term=True), \
            bridge.hooks(fwd_hooks=[(bridge.get_sae_hook_name(sae), clamp)]):
        assert bridge.generate_from_inputs(inputs, n_new) == clamped
    assert clamped != plain
    print(f"{name}: plain {plain[:2]}\n  steered {steered[:2]}\n  clamped {clamped[:2]}")


@pytest.mark.slow
def test_saelens_evals_run_on_a_jsae_through_the_bridge(bridged) -> None:
    """``sae_lens.evals.run_evals`` on the toy language model (captions, no image) through the bridge; its explained
    variance equals one computed by hand on the same token batch from jsae's own nnsight read."""
    from datasets import Dataset
    from sae_lens.evals import EvalConfig, run_evals
    from sae_lens.training.activation_scaler import ActivationScaler
    from sae_lens.training.activations_store import ActivationsStore

    name, vlm, bridge = bridged
    sae = SAE.from_pretrained(f"jsae-shapes-{name}-l{LAYER}")
    tok = vlm.processor.tokenizer
    size = sae.cfg.metadata.context_size
    ids: list[int] = []
    for e in world_dataset("test", 200, seed=0):
        ids += tok(e["caption"]).input_ids
    rows = [ids[i * size:(i + 1) * size] for i in range(4)]
    store = ActivationsStore.from_sae(bridge, sae, dataset=Dataset.from_dict({"input_ids": rows}), streaming=False,
                                      store_batch_size_prompts=4, device="cpu")
    special = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    metrics, _ = run_evals(sae, store, bridge, ActivationScaler(),
                           EvalConfig(compute_variance_metrics=True, compute_sparsity_metrics=True, compute_kl=True,
                                      compute_ce_loss=True, n_eval_reconstruction_batches=1, batch_size_prompts=4),
                           exclude_special_tokens=special)
    tokens = torch.tensor(rows)
    h = read_layers(vlm.model, vlm.adapter, {"input_ids": tokens}, [LAYER])[LAYER]
    keep = ~torch.isin(tokens, torch.tensor(special))
    with torch.no_grad():
        x, z = h[keep], sae.encode(h[keep])
        x_hat = sae.decode(z)
    x, x_hat = x.double(), x_hat.double()
    by_hand = 1 - (x - x_hat).pow(2).sum(-1).mean() / (x.pow(2).sum(-1).mean() - x.mean(0).pow(2).sum())
    assert metrics["reconstruction_quality"]["explained_variance"] == pytest.approx(float(by_hand), abs=1e-5)
    assert metrics["sparsity"]["l0"] == pytest.approx(float((z > 0).sum(-1).float().mean()), abs=1e-3)
    assert metrics["model_performance_preservation"]["ce_loss_without_sae"] > 0
    print(f"{name}: SAELens explained variance {metrics['reconstruction_quality']['explained_variance']:.6f}, "
          f"by hand {float(by_hand):.6f}")


@pytest.mark.slow
def test_saelens_own_bridge_class_attaches_a_shipped_release_unedited() -> None:
    """A user who boots SAELens's ``SAETransformerBridge`` themselves (toy LLaVA: its processor loads from its
    folder, so TransformerLens needs nothing more) attaches the shipped release as it is."""
    vlm = jsae.load_vlm("llava")
    hf = jsae.bridge.weight_sharing_copy(vlm.hf_model)
    bridge = SAETransformerBridge.boot_transformers(hf.name_or_path, hf_model=hf, tokenizer=vlm.processor.tokenizer)
    sae = SAE.from_pretrained(f"jsae-shapes-llava-l{LAYER}")
    bridge.add_sae(sae, use_error_term=True)
    assert list(bridge.acts_to_saes) == [f"blocks.{LAYER}.hook_out"] and bridge.acts_to_saes[f"blocks.{LAYER}.hook_out"] is sae
    inputs = vlm.adapter.build_inputs(vlm.processor, _images(1, 7), ["a cat"])
    kwargs = vlm.adapter.model_kwargs(inputs)
    _, cache = bridge.run_with_cache(kwargs.pop("input_ids"), **kwargs)
    assert cache[f"blocks.{LAYER}.hook_out.hook_sae_acts_post"].shape[-1] == sae.cfg.d_sae
