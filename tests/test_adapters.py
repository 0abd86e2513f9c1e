"""Adapters on tiny random-config models of all four classes, and on the paper's real configs (meta)."""

from __future__ import annotations

import sys
import time

import pytest
import torch
import transformers as T
from conftest import CAPTIONS, build_hf, build_processor, make_image, tiny_vlm
from nnsight import NNsight

import jsae.adapters as A
from jsae.adapters.base import unwrap
from jsae.vlm import load_vlm


# ---- choosing an adapter --------------------------------------------------------------------------
@pytest.mark.parametrize("kind, cls", [("llava", A.LlavaAdapter), ("llava_next", A.LlavaAdapter),
                                       ("qwen3_vl", A.Qwen3VLAdapter), ("qwen3_vl_moe", A.Qwen3VLAdapter)])
def test_for_model_picks_family(kind, cls):
    v = tiny_vlm(kind)
    assert type(A.for_model(v.model)) is cls
    assert type(A.for_model(v.hf)) is cls  # a bare transformers model works too
    assert type(v.hf).__name__ in A.supported_models()


def test_unknown_model_error_lists_supported_and_how_to_register():
    lm = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(ValueError, match="no jsae adapter for LlamaForCausalLM") as e:
        A.for_model(NNsight(lm))
    msg = str(e.value)
    assert "\n" not in msg and "LlavaNextForConditionalGeneration" in msg and "Qwen3VLMoeForConditionalGeneration" in msg
    assert "register_adapter" in msg and "jsae.adapters" in msg


def test_register_adapter_and_entry_point(tmp_path, monkeypatch):
    hf = tiny_vlm("llava").hf

    class MyLlava(T.LlavaForConditionalGeneration):
        pass

    class MyAdapter(A.LlavaAdapter):
        model_classes = ("MyLlava",)

    mine = MyLlava(hf.config)
    assert type(A.for_model(mine)) is A.LlavaAdapter  # found through the class's MRO
    # an entry point in an installed distribution registers its adapter
    pkg = tmp_path / "jsae_test_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "adapters.py").write_text(
        "from jsae.adapters import LlavaAdapter\nclass PluginAdapter(LlavaAdapter):\n    model_classes = ('MyLlava',)\n")
    dist = tmp_path / "jsae_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: jsae-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[jsae.adapters]\nplugin = jsae_test_plugin.adapters:PluginAdapter\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from jsae.adapters import base

    base._load_entry_points.cache_clear()
    try:
        assert type(A.for_model(mine)).__name__ == "PluginAdapter"
        A.register_adapter(MyAdapter)
        assert type(A.for_model(mine)) is MyAdapter
    finally:
        base._REGISTRY.pop("MyLlava", None)
        base._load_entry_points.cache_clear()
        sys.modules.pop("jsae_test_plugin.adapters", None)
    with pytest.raises(TypeError, match="VLMAdapter subclass"):
        A.register_adapter(int)


def test_adapter_class_and_plain_prompt_without_a_model():
    """The adapter class of a model class (a name, or a class along its MRO) and its plain prompt, no model built."""

    class MyQwen(T.Qwen3VLMoeForConditionalGeneration):
        pass

    assert A.adapter_class("LlavaForConditionalGeneration") is A.LlavaAdapter
    assert A.adapter_class(T.LlavaNextForConditionalGeneration) is A.LlavaAdapter
    assert A.adapter_class(MyQwen) is A.Qwen3VLAdapter
    with pytest.raises(ValueError, match="no jsae adapter for LlamaForCausalLM; supported: .*register_adapter"):
        A.adapter_class(T.LlamaForCausalLM)
    assert A.LlavaAdapter.plain_prompt("") == "<image>"
    assert A.LlavaAdapter.plain_prompt("a cat", 2) == "<image> <image> a cat"
    q = "<|vision_start|><|image_pad|><|vision_end|>"
    assert A.Qwen3VLAdapter.plain_prompt("") == q and A.Qwen3VLAdapter.plain_prompt("a cat") == f"{q} a cat"
    # an instance gives the same prompt; a processor's own image token wins where the family has no markers
    assert tiny_vlm("qwen3_vl").adapter.plain_prompt("a cat", processor=build_processor("qwen3_vl")) == f"{q} a cat"
    assert tiny_vlm("llava").adapter.plain_prompt("a cat", processor=build_processor("llava")) == "<image> a cat"

    class Tagged:
        image_token = "<img>"

    assert A.LlavaAdapter.plain_prompt("a cat", processor=Tagged()) == "<img> a cat"


# ---- structure ------------------------------------------------------------------------------------
def test_structure(vlm):
    a, hf = vlm.adapter, vlm.hf
    assert a.n_layers == 3 == len(a.layers) and a.d_in == 32
    assert unwrap(a.layers[1]) is hf.model.language_model.layers[1] is a.layer_module(1)
    if vlm.kind.startswith("llava"):
        assert unwrap(a.vision_tower) is hf.model.vision_tower and unwrap(a.projector) is hf.model.multi_modal_projector
    else:
        assert unwrap(a.vision_tower) is hf.model.visual and unwrap(a.projector) is hf.model.visual.merger
    assert dict(hf.named_modules())[a.hook_name(2)] is hf.model.language_model.layers[2]


def test_layer_out_of_range(vlm):
    for bad in (-1, 3, 1.0, True):
        with pytest.raises(ValueError, match="out of range"):
            vlm.adapter.check_layer(bad)


# ---- vision features ------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llava", "qwen3_vl", "qwen3_vl_moe"])
def test_patch_features_are_what_the_model_writes_at_its_image_tokens(kind):
    """One vector per image token of each image: the model's own image features are their projection
    (LLaVA: CLIP patches before the projector) or themselves (Qwen3-VL: its merger is inside the tower)."""
    v = tiny_vlm(kind)
    images = [make_image(16, 16, seed) for seed in range(3)]
    enc = v.adapter.build_inputs(v.processor, images, CAPTIONS[:3])
    per_image = v.adapter.image_token_mask(enc).sum(1)
    feats = v.adapter.patch_features(enc)
    assert feats.shape == (3, int(per_image[0]), v.adapter.d_vision) and bool((per_image == per_image[0]).all())
    assert feats.requires_grad  # the tower can be trained on them (the world's vision pretraining does)
    with torch.no_grad():
        if kind == "llava":
            own = v.hf.model.get_image_features(enc["pixel_values"], vision_feature_layer=-1,
                                                vision_feature_select_strategy="default").pooler_output
            torch.testing.assert_close(v.adapter.projector(feats), torch.stack(list(own)))
        else:
            own = v.hf.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output
            assert torch.equal(feats.detach(), torch.stack(list(own)))
    # LLaVA reads the layer its projector reads: vision_feature_layer -2, or several layers concatenated
    if kind == "llava":
        hf = build_hf("llava")
        hf.config.vision_feature_layer = -2
        a = A.for_model(hf)
        with torch.no_grad():
            own = hf.model.get_image_features(enc["pixel_values"], vision_feature_layer=-2,
                                              vision_feature_select_strategy="default").pooler_output
            torch.testing.assert_close(a.projector(a.patch_features(enc)), torch.stack(list(own)))
            hf.config.vision_feature_layer = [-2, -1]
            assert a.patch_features(enc).shape == (3, 16, 64) and a.d_vision == 64


def test_patch_features_refuse_what_has_no_single_grid():
    with pytest.raises(NotImplementedError, match="LLaVA-NeXT"):
        tiny_vlm("llava_next").adapter.patch_features(tiny_vlm("llava_next").inputs(1))
    v = tiny_vlm("qwen3_vl")
    with pytest.raises(ValueError, match=r"different numbers of tokens \(\[4, 8\]\)"):
        v.adapter.patch_features(v.inputs(2))  # 16x16 and 16x32 images
    with pytest.raises(ValueError, match="needs 'pixel_values' and 'image_grid_thw'"):
        v.adapter.patch_features({"input_ids": torch.zeros(1, 3, dtype=torch.long)})


# ---- positions ------------------------------------------------------------------------------------
@pytest.mark.parametrize("chat_template", [True, False])
def test_masks_on_a_batch_with_different_rows(vlm, chat_template):
    processor = build_processor(vlm.kind, chat_template=chat_template)
    images, texts = vlm.images(2, start=1), [CAPTIONS[3], CAPTIONS[0]]
    enc = vlm.adapter.build_inputs(processor, images, texts)
    ids, img, cap = enc["input_ids"], vlm.adapter.image_token_mask(enc), vlm.adapter.caption_token_mask(enc)
    tok = processor.tokenizer
    for b in range(2):
        assert tok.decode(ids[b][cap[b]]) == texts[b]  # exactly the caption: no template or special token
        assert int(img[b].sum()) == vlm.adapter.num_image_tokens(images[b].height, images[b].width, processor)
    assert not bool((img & cap).any())
    assert int(enc["attention_mask"].sum(1).ne(ids.shape[1]).sum()) >= 1  # rows of different length: padded
    with torch.no_grad():  # the model itself accepts the encoding (its own token/feature count check)
        vlm.hf(**vlm.adapter.model_kwargs(enc))
    # without the exact mask, the fallback equals it for the plain layout
    fallback = vlm.adapter.caption_token_mask({k: v for k, v in enc.items() if k != "caption_mask"})
    if not chat_template:
        assert torch.equal(fallback, cap)


def test_qwen_model_kwargs_add_mm_token_type_ids():
    v = tiny_vlm("qwen3_vl")
    enc = v.inputs(2)
    bare = {k: x for k, x in enc.items() if k not in ("mm_token_type_ids", "caption_mask")}
    kw = v.adapter.model_kwargs(bare)
    assert torch.equal(kw["mm_token_type_ids"], enc["mm_token_type_ids"].int())
    with torch.no_grad():
        v.hf(**kw)


def test_patch_grid(vlm):
    enc = vlm.inputs(2, start=1)  # images 16x32 and 32x16
    grid = vlm.adapter.patch_grid(enc)
    img = vlm.adapter.image_token_mask(enc)
    assert torch.equal(grid[..., 0] >= 0, img)
    for b in range(2):
        g = grid[b][img[b]]
        base = g[g[:, 1] == 0]
        if vlm.kind == "llava":  # 16 px / patch 4 -> 4x4, row-major
            assert base[:, 2:].tolist() == [[r, c] for r in range(4) for c in range(4)]
        elif vlm.kind == "llava_next":
            assert base[:, 2:].tolist() == [[r, c] for r in range(4) for c in range(4)]
            hi = g[g[:, 1] == 1]
            rows, cols = (4, 8) if b == 0 else (8, 4)  # 16x32 image: 1x2 tiles of 4x4 patches (no padding)
            assert hi[:, 2:].tolist() == [[r, c if c < cols else -1] for r in range(rows) for c in range(cols + 1)]
        else:  # Qwen: merged patches of image_grid_thw (h/2, w/2), row-major
            t, h, w = enc["image_grid_thw"][b].tolist()
            assert base[:, 2:].tolist() == [[r, c] for r in range(h // 2) for c in range(w // 2)]


def test_llava_next_grid_is_unpadded():
    v = tiny_vlm("llava_next")
    # a 16x24 image is resized into the 16x32 tile pair and padded; the unpadded grid drops the padding
    rows, cols = v.adapter._next_hires_shape(16, 24)
    assert (rows, cols) == (4, 6)
    enc = v.adapter.build_inputs(v.processor, [make_image(16, 24, 0)], ["a red cat"])
    assert int(v.adapter.image_token_mask(enc).sum()) == 16 + rows * (cols + 1)
    with torch.no_grad():
        v.hf(**v.adapter.model_kwargs(enc))


# ---- bad input ------------------------------------------------------------------------------------
def test_bad_inputs_are_one_line_errors(vlm):
    a = vlm.adapter
    enc = vlm.inputs(2)
    ids = enc["input_ids"]

    def expect(match, inputs):
        with pytest.raises(ValueError, match=match) as e:
            a.check_inputs(inputs)
        assert "\n" not in str(e.value)

    no_image = {**enc, "input_ids": torch.where(ids == a.image_token_id, torch.full_like(ids, 5), ids)}
    expect("sample 0 has no image token", no_image)
    fewer = ids.clone()
    fewer[0, (ids[0] == a.image_token_id).nonzero()[0]] = 5  # one image token short
    expect("fewer than the", {**enc, "input_ids": fewer})
    # more images than image slots: the same two prompts with a third image
    images = vlm.images(3)
    if vlm.kind.startswith("qwen"):
        px = vlm.processor.image_processor(images=images, return_tensors="pt")
        more = {**enc, "pixel_values": px["pixel_values"], "image_grid_thw": px["image_grid_thw"]}
    elif vlm.kind == "llava_next":
        px = vlm.processor.image_processor(images=images[:2] + [images[1]], return_tensors="pt")
        more = {**enc, **px}
    else:
        more = {**enc, "pixel_values": torch.cat([enc["pixel_values"], enc["pixel_values"][:1]])}
    expect("3 images were given but the prompts have only 2 image slots", more)
    with pytest.raises(ValueError, match="caption 1 .* is empty"):
        a.build_inputs(vlm.processor, vlm.images(2), ["a cat", ""])
    with pytest.raises(ValueError, match="2 images for 1 texts"):
        a.build_inputs(vlm.processor, vlm.images(2), ["a cat"])


# ---- the paper's models, real configurations on the meta device -----------------------------------
CLIP_L_336 = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _llava_v16_mistral_7b():
    return T.LlavaNextForConditionalGeneration, T.LlavaNextConfig(
        vision_config=CLIP_L_336, image_token_index=32000, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        text_config=dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=32064, max_position_embeddings=32768,
                         rope_theta=1e6, sliding_window=None))


def _llama3_llava_next_8b():
    return T.LlavaNextForConditionalGeneration, T.LlavaNextConfig(
        vision_config=CLIP_L_336, image_token_index=128256, image_grid_pinpoints=PINPOINTS, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
        text_config=dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128320, max_position_embeddings=8192,
                         rope_theta=5e5))


def _qwen3_vl_30b_a3b():
    return T.Qwen3VLMoeForConditionalGeneration, T.Qwen3VLMoeConfig(
        text_config=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                         num_key_value_heads=4, head_dim=128, moe_intermediate_size=768, num_experts=128,
                         num_experts_per_tok=8, vocab_size=151936, max_position_embeddings=262144,
                         rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                          "mrope_interleaved": True}),
        vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, patch_size=16,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=2048, num_position_embeddings=2304,
                           deepstack_visual_indexes=[8, 16, 24]),
        image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)


@pytest.mark.parametrize("build, n_layers, d_in, tokens_672, tokens_336x1008", [
    (_llava_v16_mistral_7b, 32, 4096, 2928, 576 + 24 * 73),   # 336x1008 -> 1x3 tiles, 24x72 grid + newlines
    (_llama3_llava_next_8b, 32, 4096, 2928, 576 + 24 * 73),
    (_qwen3_vl_30b_a3b, 48, 2048, 441, None),  # 672 px / (16 px patches) = 42x42 patches, merged 2x2
])
def test_real_configs_on_meta(build, n_layers, d_in, tokens_672, tokens_336x1008):
    from transformers.initialization import no_init_weights

    cls, config = build()
    t = time.perf_counter()
    with torch.device("meta"), no_init_weights():
        hf = cls(config)
    built = time.perf_counter() - t
    assert built < 2.0, f"meta build took {built:.2f}s"  # about 0.1-0.5 s here; slack for a shared CPU
    a = A.for_model(NNsight(hf))
    assert (a.n_layers, a.d_in, len(a.layers)) == (n_layers, d_in, n_layers)
    assert a.num_image_tokens(672, 672) == tokens_672
    if cls is T.LlavaNextForConditionalGeneration:
        assert a.num_image_tokens(336, 1008) == tokens_336x1008
        # the count agrees with the model's own packing of the projected features (meta tensors, no compute)
        feats = [torch.empty(1 + 4, 576, d_in, device="meta")]
        packed, lens = hf.model.pack_image_features(feats, torch.tensor([[672, 672]]), "default", hf.model.image_newline)
        assert packed[0].shape[0] == 2928


# ---- loading ----------------------------------------------------------------------------------------
def test_load_vlm_from_a_saved_directory(tmp_path):
    v = tiny_vlm("llava")
    v.hf.save_pretrained(tmp_path / "tiny-llava")
    v.processor.save_pretrained(tmp_path / "tiny-llava")
    model, processor, adapter = load_vlm(str(tmp_path / "tiny-llava"), dtype="float32")
    assert isinstance(adapter, A.LlavaAdapter) and adapter.n_layers == 3
    enc = adapter.build_inputs(processor, v.images(2), CAPTIONS[:2])
    with torch.no_grad():
        a = model._module(**adapter.model_kwargs(enc)).logits
        b = v.hf(**adapter.model_kwargs(enc)).logits
    assert torch.equal(a, b)


def test_load_vlm_remote_builds_on_meta(tmp_path, monkeypatch):
    """remote=True: an undispatched nnsight TransformersModel (weights stay on NDIF); jsae's local-hook
    interventions refuse it clearly.  (The NDIF round trip itself cannot run here.)"""
    import huggingface_hub.constants
    from nnsight import TransformersModel

    from jsae.interventions import Steer, generate, intervene

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    v = tiny_vlm("llava")
    v.hf.save_pretrained(tmp_path / "m")
    v.processor.save_pretrained(tmp_path / "m")
    model, processor, adapter = load_vlm(str(tmp_path / "m"), remote=True)
    assert isinstance(model, TransformersModel) and adapter.remote
    assert next(adapter.hf_model.parameters()).device.type == "meta"
    enc = adapter.build_inputs(processor, v.images(1), CAPTIONS[:1])
    with pytest.raises(NotImplementedError, match="remote"):
        with intervene(model, [Steer(1, "all", direction=torch.zeros(32))], enc):
            pass
    with pytest.raises(NotImplementedError, match="remote"):
        generate(model, enc, [], processor=processor)


def test_load_vlm_offline_missing_model_is_one_clear_line(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(OSError, match="not in the Hugging Face cache.*offline") as e:
        load_vlm("nobody/not-a-cached-model")
    assert "\n" not in str(e.value) and e.value.__cause__ is None
    with pytest.raises(ValueError, match="unknown dtype"):
        load_vlm("nobody/x", dtype="float7")
