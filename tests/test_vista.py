"""VISTA: composing a VLM from any encoder + any LM, the projector loss (from scratch, both forms), text-derived
labels (top examples; Neuronpedia explanations), JumpReLU SAEs in Gemma Scope's format, the matching rate and
localisation, patch-local edits, bad inputs, CLI.

Real objects throughout: tiny real transformers encoders / LMs (Dinov2Model, CLIPVisionModel, SiglipVisionModel,
Gemma2ForCausalLM, LlamaForCausalLM), the shipped toy LLaVA and its parts (text-only LM, vision tower), the
shipped text-SAE releases, and a locally built JumpReLU SAE."""

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
from jsae.vista.experiment import LLAVA_RELEASE

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
    return load_text_sae(LLAVA_RELEASE, "model.language_model.layers.4")


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
    assert r.exit_code == 2 and "'--lam': must be at least 0" in r.output
    r = runner.invoke(app, ["vista", "train", "--out", str(tmp_path / "x"), "--layers", "4,x"])
    assert r.exit_code == 2 and "comma-separated" in r.output


# ---- composing a VLM from any encoder and any LM -------------------------------------------------------

def _tiny_encoder(kind: str):
    from transformers import (CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, SiglipVisionConfig,
                              SiglipVisionModel)

    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=48, patch_size=8)
    torch.manual_seed(1)
    cls = {"dinov2": (Dinov2Model, Dinov2Config), "clip": (CLIPVisionModel, CLIPVisionConfig),
           "siglip": (SiglipVisionModel, SiglipVisionConfig)}[kind]
    return cls[0](cls[1](**kw)).eval()


def _tiny_lm(kind: str, vocab: int):
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(2)
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                              num_attention_heads=2, num_key_value_heads=1, head_dim=24)).eval()
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()


@pytest.fixture(scope="module")
def toy_parts():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from jsae.world import world_dataset
    from jsae.world.processors import IMAGE_MEAN, IMAGE_STD, build_tokenizer

    tok = build_tokenizer()
    ip = CLIPImageProcessorPil(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48}, image_mean=IMAGE_MEAN,
                               image_std=IMAGE_STD)
    return tok, ip, world_dataset("validation", 3, 0)


@pytest.mark.parametrize("encoder", ["dinov2", "clip", "siglip"])
@pytest.mark.parametrize("lm_kind", ["gemma2", "llama"])
def test_compose_any_encoder_with_any_lm(toy_parts, encoder, lm_kind):
    from transformers import LlavaForConditionalGeneration

    from jsae.activations import read_layers
    from jsae.vista import compose

    tok, ip, ds = toy_parts
    vision, lm = _tiny_encoder(encoder), _tiny_lm(lm_kind, len(tok))
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    model, processor, adapter = compose(vision, lm, image_processor=ip, tokenizer=tok, projector_seed=3)
    hf = adapter.hf_model
    assert type(hf) is LlavaForConditionalGeneration
    assert hf.config.vision_feature_select_strategy == ("full" if encoder == "siglip" else "default")
    # the LM is the given one: shared weights, frozen, text logits identical (Gemma-2's soft-cap included)
    assert hf.model.language_model.embed_tokens.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    assert not any(p.requires_grad for p in hf.model.language_model.parameters())
    text = tok(["a red circle on the left"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(hf(**text).logits, lm(**text).logits, atol=1e-5, rtol=1e-5)
    # one image token per patch (no CLS), in the patch grid the adapter reports
    enc = adapter.build_inputs(processor, list(ds["image"]), list(ds["caption"]))
    assert adapter.image_token_mask(enc).sum(1).tolist() == [36, 36, 36]
    assert adapter.patch_grid(enc)[adapter.image_token_mask(enc)][:, -2:].amax(0).tolist() == [5, 5]
    # the projector reads exactly the encoder's patch tokens
    with torch.no_grad():
        own = vision(enc["pixel_values"], output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(adapter.patch_features(enc), own[:, 0 if encoder == "siglip" else 1:])
    # states at a decoder layer through jsae's reader; the composed model trains only the projector
    got = read_layers(model, adapter, enc, [1])
    assert got[1].shape[:2] == enc["input_ids"].shape
    proj = check_projector(adapter)
    again = compose(vision, lm, image_processor=ip, tokenizer=tok, projector_seed=3).adapter
    other = compose(vision, lm, image_processor=ip, tokenizer=tok, projector_seed=4).adapter
    w = proj.linear_1.weight
    assert torch.equal(w, check_projector(again).linear_1.weight) and not torch.equal(w, check_projector(other).linear_1.weight)
    hist = train_projector(model, processor, adapter, {}, list(ds["image"]), list(ds["caption"]),
                           VistaConfig(lam=0.0, layers=(), steps=2, batch_size=3), progress=False)
    assert len(hist["history"]) == 2
    assert all(torch.equal(v, lm.state_dict()[k]) for k, v in before.items())  # untouched


def test_compose_adds_a_missing_image_token_and_refuses_bad_models(toy_parts):
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    from jsae.vista import compose
    from jsae.world.processors import build_tokenizer

    tok, ip, ds = toy_parts
    vision, lm = _tiny_encoder("clip"), _tiny_lm("llama", len(tok))
    bare = build_tokenizer()
    bare_vocab = set(bare.get_vocab())
    # a tokenizer without "<img>": added to a copy; the composed model gets one new embedding row, the LM none
    model, processor, adapter = compose(vision, lm, image_processor=ip, tokenizer=bare, image_token="<img>")
    assert "<img>" not in bare_vocab and set(bare.get_vocab()) == bare_vocab
    assert adapter.hf_model.config.image_token_id == len(bare) and lm.model.embed_tokens.weight.shape[0] == len(tok)
    enc = adapter.build_inputs(processor, [ds["image"][0]], [ds["caption"][0]])
    assert int(adapter.image_token_mask(enc).sum()) == 36
    adapter.hf_model(**adapter.model_kwargs(enc))
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=48, patch_size=8)
    for bad, match in [(CLIPModel(CLIPConfig(vision_config=CLIPVisionConfig(**small).to_dict(),
                                             text_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                                                          "intermediate_size": 64})), "vision half"),
                       (Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**small, num_register_tokens=4)), "registers")]:
        with pytest.raises((TypeError, ValueError)) as exc:
            compose(bad, lm, image_processor=ip, tokenizer=tok)
        assert match in _one_line(exc)
    with pytest.raises(TypeError) as exc:
        compose(vision, lm.model, image_processor=ip, tokenizer=tok)
    assert "ForCausalLM" in _one_line(exc)


def test_toy_parts_are_the_text_only_lm_and_the_tower(world):
    from transformers import AutoModelForCausalLM

    from jsae.vista import compose_toy
    from jsae.world.training import part_dir, save_parts

    model, processor, adapter = compose_toy("text-only")
    lm = AutoModelForCausalLM.from_pretrained(str(part_dir("lm")), local_files_only=True, dtype=torch.float32)
    text = processor.tokenizer(["a small red circle on the left"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(adapter.hf_model(**text).logits, lm(**text).logits)
        # ... and not the shipped VLM's LM, which was fine-tuned with images afterwards
        vlm_logits = world[2].hf_model(**text).logits
    assert (vlm_logits - lm(**text).logits).abs().max() > 1e-2
    # compose_toy("vlm"): the toy LLaVA's own tower and LM recomposed with a new projector computes the VLM's text
    _, _, recomposed = compose_toy("vlm")
    with torch.no_grad():
        torch.testing.assert_close(recomposed.hf_model(**text).logits, vlm_logits)
    assert not torch.equal(check_projector(recomposed).linear_1.weight, check_projector(world[2]).linear_1.weight)
    # save_parts writes a VLM's LM and tower as standalone transformers models that compute the same
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        written = save_parts(world[2].hf_model, world[1], d, {"test": True}, dtype=torch.float32)
        back = AutoModelForCausalLM.from_pretrained(str(written["lm"]), local_files_only=True, dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(back(**text).logits, vlm_logits)
        assert (written["vision"] / "preprocessor_config.json").exists()


# ---- the VISTA loss from scratch, on the composed toy --------------------------------------------------

@pytest.fixture(scope="module")
def composed():
    from jsae.vista import compose_toy
    from jsae.world import world_dataset

    model, processor, adapter = compose_toy("vlm")
    sae = load_text_sae(RELEASE_TEXT_LM, "model.language_model.layers.4")
    return model, processor, adapter, sae, world_dataset("validation", 48, 0)


RELEASE_TEXT_LM = "jsae-vista-toy-lm-text-sae"


@pytest.mark.slow
@pytest.mark.parametrize("form", ["normalised", "mse"])
def test_vista_from_scratch_lowers_text_sae_error(composed, form):
    model, processor, adapter, sae, ds = composed
    images, caps = list(ds["image"]), [c[0] for c in ds["captions"]]
    held = _batches(adapter, processor, images[32:], caps[32:], 16)
    errs = {}
    for lam in (0.0, 5.0):  # both from the same seeded re-initialisation
        train_projector(model, processor, adapter, {4: sae}, images[:32], caps[:32],
                        VistaConfig(lam=lam, layers=(4,), steps=8, batch_size=16, lr=2e-3, loss_form=form), progress=False)
        errs[lam] = recon_error_on_images(model, adapter, {4: sae}, held, form)
    # the error the loss is written in falls (the raw MSE can fall by shrinking the image-token states: on the
    # retrained world its normalised error rises meanwhile, which is why "normalised" is the default)
    assert errs[5.0][4] < errs[0.0][4] - 0.05, errs


def test_vista_config_loss_form():
    assert VistaConfig().reinit is True and VistaConfig().loss_form == "normalised"
    with pytest.raises(ValueError) as exc:
        VistaConfig(loss_form="l1")
    assert "normalised" in _one_line(exc)


def test_raw_and_normalised_sae_error(sae4):
    from jsae.vista import sae_recon_error

    h = torch.randn(5, 128) * 3
    r = sae4.decode(sae4.encode(h))
    torch.testing.assert_close(sae_recon_error(sae4, h, "mse"), (r - h).pow(2).mean())
    torch.testing.assert_close(sae_recon_error(sae4, h), ((r - h).pow(2).sum(-1) / h.pow(2).sum(-1)).mean())


# ---- labels from text ----------------------------------------------------------------------------------

def test_labels_from_top_examples():
    from jsae.vista import label_from_top_examples, label_summary
    from jsae.vista.metrics import context_concepts

    words = ["a", "red", "cat", "and", "a", "blue", "fish"] * 8
    owners = [i // 7 for i in range(len(words))]
    codes = torch.zeros(len(words), 5)
    for t, w in enumerate(words):
        codes[t, 0] = 2.0 if w == "red" else 0.0  # 8 active tokens, all 'red'
        codes[t, 1] = {"cat": 1.0, "fish": 1.1}.get(w, 0.0)  # top 12: 8 fish + 4 cat -> 'animal' lifts most
        codes[t, 2] = 1.0  # fires everywhere: no lift
        codes[t, 3] = 3.0 if w == "cat" else (1.0 if w == "a" else 0.0)  # top 12: 8 cat + 4 'a'
        codes[t, 4] = 1.0 if t < 4 else 0.0  # active on 4 tokens only: too few to label
    concepts = ["cat", "fish", "animal", "red", "blue"]
    labels, purity = label_from_top_examples(codes, context_concepts(words, owners), concepts, top_n=12, min_purity=0.5)
    assert labels == ["red", "animal", None, "cat", None]
    assert purity[0] == 1.0 and purity[1] == 1.0 and purity[3] == pytest.approx(8 / 12)
    s = label_summary(labels, purity)
    assert s["labelled"] == 3 and s["labelled_fraction"] == 0.6 and s["concepts_covered"] == 3
    # context: the token after 'red' also carries 'red'
    ctx = context_concepts(words, owners, window=1)
    assert ctx[2] == {"cat", "animal", "red"} and ctx[7] == set()  # 'a' at a caption start sees nothing before it
    with pytest.raises(ValueError) as exc:
        label_from_top_examples(codes, ctx[:3], concepts)
    assert "one concept set per example" in _one_line(exc)


def test_neuronpedia_explanations(tmp_path):
    import gzip
    import json

    from jsae.vista import labels_from_explanations, load_neuronpedia_explanations

    recs = [{"modelId": "gemma-2-2b", "layer": "4-gemmascope-res-16k", "index": "0", "description": "the color red",
             "explanationModelName": "gpt-4o-mini", "typeName": "oai_token-act-pair"},
            {"modelId": "gemma-2-2b", "layer": "4-gemmascope-res-16k", "index": "2", "description": "Cats and other felines"},
            {"modelId": "gemma-2-2b", "layer": "4-gemmascope-res-16k", "index": "3", "description": "red or blue objects"},
            {"modelId": "gemma-2-2b", "layer": "4-gemmascope-res-16k", "index": "0", "description": "a second explanation"}]
    jl = tmp_path / "explanations.jsonl.gz"
    with gzip.open(jl, "wt") as f:
        f.write("\n".join(json.dumps(r) for r in recs))
    arr = tmp_path / "explanations.json"
    arr.write_text(json.dumps(recs))
    for path in (jl, arr):
        desc = load_neuronpedia_explanations(str(path), d_sae=5)
        assert desc == ["the color red", None, "Cats and other felines", "red or blue objects", None]
    labels = labels_from_explanations(desc, ["cat", "red", "blue"], synonyms={"cats": "cat"})
    assert labels == ["red", None, "cat", None, None]  # two concepts named: ambiguous, unlabelled
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"idx": 1}]))
    with pytest.raises(ValueError) as exc:
        load_neuronpedia_explanations(str(bad))
    assert "'index' and 'description'" in _one_line(exc)
    with pytest.raises(ValueError) as exc:
        load_neuronpedia_explanations(str(arr), d_sae=2)
    assert "latent 2" in _one_line(exc)


def test_jumprelu_sae_in_gemma_scope_format(tmp_path, composed):
    """A JumpReLU SAE saved as Gemma Scope's SAELens folders are (architecture jumprelu, threshold, hook
    blocks.L.hook_resid_post, no b_dec on the input), built from the toy text SAE: it loads, checks, is
    labelled from text, and the VISTA loss reaches the projector through it."""
    import json

    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    from jsae.vista import collect_text_states, vista_losses
    from jsae.vista.experiment import label_text_sae, world_concept_names

    model, processor, adapter, topk, ds = composed
    caps = [c for cs in ds["captions"] for c in cs]
    states, owners, ids = collect_text_states(model, processor, adapter, caps, [4], progress=False)
    x = states[4]
    cfg = JumpReLUSAEConfig(d_in=128, d_sae=topk.cfg.d_sae, apply_b_dec_to_input=False)
    cfg.metadata.hook_name = "blocks.4.hook_resid_post"
    cfg.metadata.model_name = "toy-composed"  # the model these weights were trained on (its provenance is checked)
    cfg.metadata.neuronpedia_id = "jsae-toy-text-lm/4-local-res"
    sae = JumpReLUSAE(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(topk.W_enc)
        sae.W_dec.copy_(topk.W_dec)
        sae.b_dec.copy_(topk.b_dec)
        sae.b_enc.copy_(topk.b_enc - topk.b_dec @ topk.W_enc)
        pre = x @ sae.W_enc + sae.b_enc
        sae.threshold.copy_(pre.clamp(min=0).quantile(0.9, dim=0).clamp(min=1e-3))
    sae.save_model(str(tmp_path / "blocks.4.hook_resid_post"))
    saved = json.loads((tmp_path / "blocks.4.hook_resid_post" / "cfg.json").read_text())
    assert saved["architecture"] == "jumprelu" and saved["apply_b_dec_to_input"] is False
    loaded = load_text_sae(str(tmp_path / "blocks.4.hook_resid_post"))
    assert type(loaded).__name__ == "JumpReLUSAE"
    check_text_sae(loaded, adapter, 4)
    with pytest.raises(ValueError):
        check_text_sae(loaded, adapter, 5)
    with torch.no_grad():
        fvu = float((loaded.decode(loaded.encode(x)) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert fvu < 0.5
    got = label_text_sae(loaded, x, processor.tokenizer.convert_ids_to_tokens(ids), owners.tolist(), world_concept_names())
    assert got["summary"]["labelled"] > 10 and got["summary"]["mean_purity"] > 0.6
    enc = adapter.build_inputs(processor, list(ds["image"][:4]), [c[0] for c in ds["captions"][:4]])
    proj = check_projector(adapter)
    proj.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for p in proj.parameters():
            p.requires_grad_(True)
        ce, errs = vista_losses(model, adapter, {4: loaded}, enc)
        errs[4].backward()
    assert proj.linear_1.weight.grad is not None and proj.linear_1.weight.grad.abs().sum() > 0
    for p in proj.parameters():
        p.requires_grad_(False)
        p.grad = None


def test_cli_train_defaults_and_bad_inputs(tmp_path):
    from jsae.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["vista", "train", "--help"])
    assert r.exit_code == 0 and "toy-composed" in r.output and "--from-scratch" in r.output
    r = runner.invoke(app, ["vista", "train", "--out", str(tmp_path / "x"), "--model", "bogus"])
    assert r.exit_code == 2 and "toy-composed" in r.output
    r = runner.invoke(app, ["vista", "train", "--out", str(tmp_path / "x"), "--layers", "4", "--loss-form", "l1"])
    assert r.exit_code == 2 and "loss_form" in r.output
    r = runner.invoke(app, ["vista", "train", "--out", str(tmp_path / "x"), "--text-layers", "2,3", "--edit-layer", "4"])
    assert r.exit_code == 2 and "edit layer 4 has no text SAE" in r.output
    r = runner.invoke(app, ["vista", "toy-parts", "--out", str(tmp_path / "p"), "--stages", "vlm"])
    assert r.exit_code == 2 and "--stages takes lm, vision and / or dino" in r.output


@pytest.mark.slow
def test_world_run_end_to_end_small(tmp_path):
    """`jsae vista train` (from scratch on the composed toy, shipped text SAEs) then eval, at toy sizes: the run
    directory holds every artefact and the report every section, with three edit methods."""
    import json

    from jsae.cli import app
    from jsae.vista.experiment import EvalConfig, eval_world

    runner = CliRunner()
    out = tmp_path / "run"
    r = runner.invoke(app, ["vista", "train", "--out", str(out), "--text-sae", RELEASE_TEXT_LM, "--text-layers", "3,4,5",
                            "--steps", "3", "--n-train", "32"])
    assert r.exit_code == 0, r.output
    train = json.loads((out / "train.json").read_text())
    assert train["config"]["model"] == "toy-composed" and train["config"]["reinit"] is True
    assert [s[0] for s in train["config"]["settings"]] == ["baseline", "vista-l4", "vista-l34", "vista-l3-5", "vista-l4-mse"]
    assert "latents labelled from text" in r.output
    lab = json.loads((out / "text_sae" / "model.language_model.layers.4" / "labels.json").read_text())
    assert 0 < lab["summary"]["labelled_fraction"] <= 1 and len(lab["labels"]) == 256
    m = eval_world(out, EvalConfig(n_eval=24, vision_steps=30, n_calib=2, gains=(1.0,), max_new_tokens=20), progress=False)
    assert set(m["edits"]) >= {"vista", "vision-only", "vision-only-masks"}
    assert set(m["vision_only_sae"]) == {"vision-only", "vision-only-masks"}
    report = (out / "report.md").read_text()
    for section in ("## Text SAEs", "## Matching rate", "## Task performance", "## Vision-only SAE", "## Patch-local edits"):
        assert section in report




def test_edit_scoring_by_hand():
    """eval_world's scoring of one patch-local edit on real world captions: removal succeeds only when the target is
    gone and every other object is still named; replacement also needs the new type, and is in place when the new
    type is named at the removed object's position."""
    import numpy as np

    from jsae.vista.experiment import _score_edits, edit_gains

    objects = [[{"name": "apple", "position": "bottom left", "category": "food"},
                {"name": "cake", "position": "bottom right", "category": "food"}]]
    plan = [{"image": 0, "target": 0, "new": "fish"}]
    caps = ["a small green cake at the bottom right",                                           # apple gone, cake kept
            "a small red apple at the bottom left and a small green cake at the bottom right",  # nothing removed
            "a small green fish at the bottom right",                                           # cake lost
            "a small red fish at the bottom left and a small green cake at the bottom right",   # replaced in place
            "a small red fish at the top left and a small green cake at the bottom right"]      # replaced elsewhere
    removal = [_score_edits(plan, objects, [c], "remove") for c in caps]
    assert [float(r["success"][0]) for r in removal] == [1.0, 0.0, 0.0, 1.0, 1.0]
    replace = [_score_edits(plan, objects, [c], "replace") for c in caps]
    assert [float(r["success"][0]) for r in replace] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert [float(r["in_place"][0]) for r in replace] == [0.0, 0.0, 0.0, 1.0, 0.0]
    both = _score_edits(plan * 2, objects, caps[3:5], "replace")
    assert both["success"].tolist() == [1.0, 1.0] and both["in_place"].tolist() == [1.0, 0.0]

    # VISTA against each vision-only reference: means, paired difference, relative gain
    per_image = {"vista": {"removal": np.array([1.0, 1.0, 0.0, 1.0]), "replacement": np.array([1.0, 0.0, 0.0, 0.0])},
                 "vision-only": {"removal": np.array([1.0, 0.0, 0.0, 1.0]), "replacement": np.zeros(4)},
                 "vision-only-masks": {"removal": np.array([1.0, 1.0, 1.0, 1.0]), "replacement": np.array([1.0, 0.0, 0.0, 0.0])}}
    edits = {k: {m: {"mean": float(v.mean())} for m, v in d.items()} for k, d in per_image.items()}
    g = edit_gains(edits, per_image)
    r = g["vision-only"]["removal"]
    assert (r["vista"], r["reference"], r["absolute_gain"], r["relative_gain"]) == (0.75, 0.5, 0.25, 0.5)
    assert r["absolute_gain_interval"]["mean"] == 0.25 and r["absolute_gain_interval"]["n"] == 4
    assert g["vision-only"]["replacement"]["relative_gain"] == float("inf")  # only VISTA succeeds
    assert g["vision-only-masks"]["replacement"]["relative_gain"] == 0.0 and g["vision-only-masks"]["removal"]["relative_gain"] == -0.25
    # nothing scored (no eligible image): every gain is undefined, not 0
    empty = {k: {m: {"mean": float("nan")} for m in ("removal", "replacement")} for k in per_image}
    none = edit_gains(empty, {k: {m: np.zeros(0) for m in ("removal", "replacement")} for k in per_image})
    assert all(np.isnan(none[ref][m]["relative_gain"]) for ref in none for m in ("removal", "replacement"))


def test_vista_report_without_scored_edits_says_so():
    """A model whose captions name too few objects for any edit (the DINOv2-style tower's run) gets a sentence,
    not a table of NaNs."""
    import json
    from pathlib import Path

    from jsae.report.markdown import vista_world_report

    m = json.loads((Path(__file__).parents[1] / "benchmarks/results/vista_world_dino_text_lm_l1/metrics.json").read_text())
    assert m["edits"]["n_scored"] == 0
    text = vista_world_report(m, figure=False)
    assert "nan" not in text.lower() and "No image was scored" in text
    assert "| vista-l1 | 1.000 | [1] | 1 |" in text  # the matching-rate table is still there


def test_vista_settings_are_records():
    from jsae.vista.experiment import VistaSetting, WorldVistaConfig, default_settings

    got = default_settings((3, 4, 5), 2.0, 4)
    assert [(s.name, s.lam, s.layers, s.loss_form) for s in got] == [
        ("baseline", 0.0, (), "normalised"), ("vista-l4", 2.0, (4,), "normalised"), ("vista-l34", 2.0, (3, 4), "normalised"),
        ("vista-l3-5", 2.0, (3, 4, 5), "normalised"), ("vista-l4-mse", 2.0, (4,), "mse")]
    cfg = WorldVistaConfig(text_layers=(3, 4), edit_layer=4, settings=(("baseline", 0, []), ("v", 1, [4], "mse")))
    assert cfg.settings == (VistaSetting("baseline", 0.0), VistaSetting("v", 1.0, (4,), "mse"))
    assert VistaSetting.of(cfg.settings[1].record()) == cfg.settings[1] == VistaSetting.of(
        {"name": "v", "lam": 1, "layers": [4], "loss_form": "mse"})
    with pytest.raises(ValueError, match="no text SAE"):
        WorldVistaConfig(text_layers=(3, 4), edit_layer=4, settings=(("baseline", 0, []), ("v", 1, [5])))
    with pytest.raises(ValueError, match="baseline with λ = 0"):
        WorldVistaConfig(text_layers=(3, 4), edit_layer=4, settings=(("v", 1, [4]),))
    with pytest.raises(ValueError, match="a setting is"):
        VistaSetting.of(("v", 1))
