"""Interventions against hand-written torch forward hooks, on batches of 2 different rows, all four classes."""

from __future__ import annotations

import pytest
import torch
from conftest import KINDS, tiny_vlm
from sae_lens import StandardSAE, StandardSAEConfig

import jsae
from jsae.interventions import Ablate, Clamp, Patches, Steer, generate, intervene

LAYER = 1
CELLS = ((0, 1), (1, 0))


def _enc(v, generation=False):
    return v.adapter.build_inputs(v.processor, v.images(2, start=1), ["the red square and a blue circle", "a dog"],
                                  add_generation_prompt=generation)


def _logits(v, enc):
    with torch.no_grad():
        return v.hf(**v.adapter.model_kwargs(enc)).logits


def _manual_mask(v, enc, positions):
    """The positions, worked out here from the raw encoding (not through the adapter)."""
    ids = enc["input_ids"]
    image = ids == v.hf.config.image_token_id
    if positions == "image":
        return image
    if positions == "text":
        return enc["caption_mask"]
    if positions == "all":
        return enc["attention_mask"].bool()
    if positions == "generated":
        return torch.zeros_like(image)
    mask = torch.zeros_like(image)  # Patches(CELLS) of region 0: cell (r, c) is image token r * width + c
    for b in range(ids.shape[0]):
        width = 4 if v.kind.startswith("llava") else int(enc["image_grid_thw"][b, 2]) // 2
        where = image[b].nonzero().flatten()
        for r, c in CELLS:
            mask[b, where[r * width + c]] = True
    return mask


def _manual_hooks(v, layer, prefill_fn, step_fn=None):
    state = {"step": 0}

    def hook(module, args, output):
        state["step"] += 1
        if state["step"] == 1:
            return prefill_fn(output)
        return step_fn(output) if step_fn else output

    return v.hf.model.language_model.layers[layer].register_forward_hook(hook)


def _positions(name):
    return Patches(CELLS) if name == "patches" else name


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["image", "text", "all", "patches"])
def test_steer_prefill_equals_manual_hook_on_both_rows(kind, where):
    v = tiny_vlm(kind)
    enc = _enc(v)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(1))
    base = _logits(v, enc)
    with intervene(v.model, [Steer(LAYER, _positions(where), direction=direction, strength=3.0)], enc):
        got = _logits(v, enc)
    mask = _manual_mask(v, enc, _positions(where))
    h = _manual_hooks(v, LAYER, lambda o: o + 3.0 * direction * mask[..., None])
    try:
        want = _logits(v, enc)
    finally:
        h.remove()
    assert torch.equal(got, want)
    for b in range(2):  # both rows changed (the output[0] trap edits batch row 0 only)
        assert not torch.allclose(got[b], base[b])
    assert torch.equal(_logits(v, enc), base)  # hooks gone


@pytest.mark.parametrize("kind", KINDS)
def test_generate_composed_every_step_and_prefill(kind):
    v = tiny_vlm(kind)
    enc = _enc(v, generation=True)
    g = torch.Generator().manual_seed(2)
    d1, d2, d3 = (torch.randn(32, generator=g) * 4 for _ in range(3))
    ivs = [Steer(0, "image", timing="prefill", direction=d1),
           Steer(LAYER, "all", timing="every_step", direction=d2, strength=0.5),
           Steer(LAYER, "generated", direction=d3, strength=2.0)]
    ids = generate(v.model, enc, ivs, max_new_tokens=4, return_ids=True)
    image, am = _manual_mask(v, enc, "image"), enc["attention_mask"].bool()
    hooks = [_manual_hooks(v, 0, lambda o: o + d1 * image[..., None]),
             _manual_hooks(v, LAYER, lambda o: o + 0.5 * d2 * am[..., None], lambda o: o + 0.5 * d2 + 2.0 * d3)]
    try:
        with torch.no_grad():
            kw = v.adapter.model_kwargs(enc)
            want = v.hf.generate(**kw, max_new_tokens=4, do_sample=False, pad_token_id=0)[:, kw["input_ids"].shape[1]:]
    finally:
        for h in hooks:
            h.remove()
    assert torch.equal(ids, want)
    text = generate(v.model, enc, ivs, max_new_tokens=4, processor=v.processor)
    assert isinstance(text, list) and len(text) == 2 and all(isinstance(t, str) for t in text)


def test_prefill_only_differs_from_every_step():
    """Prefill-only equals a hook on the prefill alone, for every direction tried, and differs from every-step
    for some: the tokens depend on the random tiny model (its initialisation changes across transformers
    versions), and a strong steer can make the token it leads to a fixed point of the unsteered steps, so one
    direction alone may give equal tokens both ways."""
    v = tiny_vlm("llava")
    enc = _enc(v, generation=True)
    am = enc["attention_mask"].bool()
    differ = []
    for seed in (3, 4, 5):
        d = torch.randn(32, generator=torch.Generator().manual_seed(seed)) * 6
        every = generate(v.model, enc, [Steer(LAYER, "all", direction=d)], max_new_tokens=4, return_ids=True)
        once = generate(v.model, enc, [Steer(LAYER, "all", timing="prefill", direction=d)], max_new_tokens=4, return_ids=True)
        h = _manual_hooks(v, LAYER, lambda o, d=d: o + d * am[..., None])
        try:
            want = generate(v.model, enc, [], max_new_tokens=4, return_ids=True)
        finally:
            h.remove()
        assert torch.equal(once, want), seed
        differ.append(not torch.equal(once, every))
    assert any(differ)


def _jsae():
    torch.manual_seed(0)
    return jsae.JointSAE(jsae.JointSAEConfig(d_in=32, d_sae=64))


@pytest.mark.parametrize("kind", KINDS)
def test_sae_clamp_and_ablate_equal_manual_reconstruction(kind):
    v = tiny_vlm(kind)
    enc = _enc(v)
    sae = _jsae()
    base = _logits(v, enc)
    ivs = [Clamp(LAYER, "text", sae=sae, features=[3, 7], strength=5.0), Ablate(LAYER, "image", sae=sae, features=range(0, 64, 2))]
    with intervene(v.model, ivs, enc):
        got = _logits(v, enc)
    text, image = _manual_mask(v, enc, "text"), _manual_mask(v, enc, "image")

    def edit(o):
        o = o.clone()
        for mask, modality, feats, value in ((text, "text", [3, 7], 5.0), (image, "vision", list(range(0, 64, 2)), 0.0)):
            x = o[mask]
            z = sae.encode(x, modality)
            z2 = z.clone()
            z2[:, feats] = value
            o[mask] = sae.decode(z2, modality) + (x - sae.decode(z, modality))
        return o

    h = _manual_hooks(v, LAYER, edit)
    try:
        want = _logits(v, enc)
    finally:
        h.remove()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for b in range(2):
        assert not torch.allclose(got[b], base[b])


def test_sae_edit_without_code_change_is_bitwise_identity():
    v = tiny_vlm("qwen3_vl")
    enc = _enc(v)
    sae = _jsae()
    acts = {}
    h = v.hf.model.language_model.layers[LAYER].register_forward_hook(lambda m, a, o: acts.setdefault("h", o))
    try:
        base = _logits(v, enc)
    finally:
        h.remove()
    z = sae.encode(acts["h"][enc["caption_mask"]], "text")
    dead = [int(f) for f in (z.amax(0) == 0).nonzero().flatten()]
    assert dead, "expected some features inactive on the caption tokens"
    with intervene(v.model, [Ablate(LAYER, "text", sae=sae, features=dead)], enc):
        assert torch.equal(_logits(v, enc), base)  # untouched features: the state is kept bit for bit


def test_plain_saelens_sae_and_nnsight_trace_equivalence():
    v = tiny_vlm("llava_next")
    enc = _enc(v)
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=32, d_sae=48))
    iv = Clamp(LAYER, "image", sae=sae, features=[5], strength=4.0)
    with intervene(v.model, iv, enc):
        hooked = _logits(v, enc)
    mask = v.adapter.image_token_mask(enc)
    with torch.no_grad(), v.model.trace(**v.adapter.model_kwargs(enc)):  # the same edit as an nnsight edit
        v.adapter.layers[LAYER].output = iv.apply(v.adapter.layers[LAYER].output, mask)
        traced = v.model.output.logits.save()
    assert torch.equal(hooked, traced)
    assert not torch.equal(hooked, _logits(v, enc))


def _hooks(v):
    return [list(layer._forward_hooks) for layer in v.hf.model.language_model.layers]


def test_exception_inside_leaves_model_bitwise_unchanged():
    v = tiny_vlm("qwen3_vl_moe")
    enc = _enc(v, generation=True)
    hooks = _hooks(v)  # nnsight may keep its own hooks on the modules; jsae must leave none of its own
    before = _logits(v, enc)
    before_ids = generate(v.model, enc, [], max_new_tokens=3, return_ids=True)
    d = torch.ones(32)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(v.model, [Steer(LAYER, "all", direction=d), Steer(2, "image", direction=d)], enc):
            _logits(v, enc)
            raise RuntimeError("boom")

    class Exploding(StandardSAE):
        calls = 0

        def encode(self, x):
            Exploding.calls += 1
            if Exploding.calls == 3:  # fails in the middle of generation
                raise RuntimeError("sae exploded")
            return super().encode(x)

    sae = Exploding(StandardSAEConfig(d_in=32, d_sae=16))
    with pytest.raises(RuntimeError, match="sae exploded"):
        generate(v.model, enc, [Clamp(LAYER, "all", sae=sae, features=[1], strength=2.0)], max_new_tokens=5, return_ids=True)
    assert _hooks(v) == hooks
    assert torch.equal(_logits(v, enc), before)
    assert torch.equal(generate(v.model, enc, [], max_new_tokens=3, return_ids=True), before_ids)


def test_bad_interventions_are_one_line_errors():
    v = tiny_vlm("llava")
    enc = _enc(v)
    sae = _jsae()
    hooks = _hooks(v)

    def expect(match, ivs, exc=ValueError):
        with pytest.raises(exc, match=match) as e:
            with intervene(v.model, ivs, enc):
                pass
        assert "\n" not in str(e.value)

    with pytest.raises(ValueError, match="unknown positions 'caption'"):
        Steer(1, "caption", direction=torch.zeros(32))
    with pytest.raises(ValueError, match="unknown timing"):
        Steer(1, "all", timing="always", direction=torch.zeros(32))
    with pytest.raises(ValueError, match="nothing to edit at the prefill"):
        Steer(1, "generated", timing="prefill", direction=torch.zeros(32))
    expect("layer 3 is out of range", Steer(3, "all", direction=torch.zeros(32)))
    expect("direction has size 16 but the model's hidden size is 32", Steer(1, "all", direction=torch.zeros(16)))
    expect(r"patch \(4, 0\) is outside the 4×4 grid", Steer(1, Patches(((4, 0),)), direction=torch.zeros(32)))
    expect("no image 1 with grid region 0", Steer(1, Patches(((0, 0),), image=1), direction=torch.zeros(32)))
    expect("feature index 64 is out of range: the SAE has features 0..63", Clamp(1, "text", sae=sae, features=[2, 64]))
    small = jsae.JointSAE(jsae.JointSAEConfig(d_in=16, d_sae=8))
    expect("the SAE has d_in=16 but the model's hidden size is 32", Ablate(1, "image", sae=small, features=[0]))
    expect("Intervention objects", ["steer"], TypeError)
    no_caption = {**enc, "caption_mask": torch.zeros_like(enc["caption_mask"])}
    with pytest.raises(ValueError, match="prompt 0 has no text tokens"):
        with intervene(v.model, Steer(1, "text", direction=torch.zeros(32)), no_caption):
            pass
    assert _hooks(v) == hooks


def test_patches_in_llava_next_high_resolution_grid():
    v = tiny_vlm("llava_next")
    enc = _enc(v)  # images 16x32 (4x8 hi-res grid) and 32x16 (8x4)
    d = torch.randn(32, generator=torch.Generator().manual_seed(4))
    iv = Steer(LAYER, Patches(((3, 2), (0, 3)), region=1), direction=d)
    with intervene(v.model, iv, enc):
        got = _logits(v, enc)
    image = enc["input_ids"] == v.hf.config.image_token_id
    mask = torch.zeros_like(image)
    for b, cols in ((0, 8), (1, 4)):  # base tile: 16 tokens, then rows of (cols + newline)
        where = image[b].nonzero().flatten()
        for r, c in ((3, 2), (0, 3)):
            mask[b, where[16 + r * (cols + 1) + c]] = True
    h = _manual_hooks(v, LAYER, lambda o: o + d * mask[..., None])
    try:
        want = _logits(v, enc)
    finally:
        h.remove()
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match=r"patch \(3, 5\) is outside the 8×4 grid of prompt 1"):
        with intervene(v.model, Steer(LAYER, Patches(((3, 5),), region=1), direction=d), enc):
            pass


@pytest.mark.parametrize("kind", ["llava", "qwen3_vl"])
def test_per_prompt_steer_equals_one_steer_per_row(kind):
    """One batch holding two (direction, strength) cells gives exactly what each row gets alone."""
    v = tiny_vlm(kind)
    enc = _enc(v)
    g = torch.Generator().manual_seed(5)
    D = torch.randn(2, 32, generator=g)
    S = torch.tensor([2.0, -1.5])
    with intervene(v.model, [Steer(LAYER, "image", direction=D, strength=S)], enc):
        got = _logits(v, enc)
    mask = _manual_mask(v, enc, "image")
    h = _manual_hooks(v, LAYER, lambda o: o + (S[:, None] * D)[:, None, :] * mask[..., None])
    try:
        want = _logits(v, enc)
    finally:
        h.remove()
    assert torch.allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="3 strengths for 2 per-prompt directions"):
        Steer(LAYER, "image", direction=D, strength=[1.0, 2.0, 3.0])


def test_project_out_and_the_last_positions():
    """ProjectOut leaves no component along the direction; 'last' is the last prompt token of each row (left
    padding), 'image_but_last' every image token but the last."""
    from jsae.interventions import ProjectOut, _prefill_mask

    v = tiny_vlm("llava")
    enc = _enc(v)
    u = torch.randn(32, generator=torch.Generator().manual_seed(6))
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(7))
    m = torch.zeros(2, 5, dtype=torch.bool)
    m[:, 1:3] = True
    y = ProjectOut(LAYER, "image", direction=u).apply(x, m)
    assert torch.allclose((y[m] @ (u / u.norm())), torch.zeros(4), atol=1e-5) and torch.equal(y[~m], x[~m])
    last = _prefill_mask(Steer(LAYER, "last", direction=u), v.adapter, enc, {})
    am = enc["attention_mask"].bool()
    assert last.sum(1).tolist() == [1, 1] and bool(am[last].all())
    assert all(int(last[b].nonzero()) == int(am[b].nonzero().max()) for b in range(2))
    img = _manual_mask(v, enc, "image")
    but = _prefill_mask(Steer(LAYER, "image_but_last", direction=u), v.adapter, enc, {})
    assert (but.sum(1) == img.sum(1) - 1).all() and not (but & ~img).any()
    with pytest.raises(ValueError, match="non-zero direction"):
        ProjectOut(LAYER, "image", direction=torch.zeros(32))


def test_caption_helper_is_the_protocols_captioner():
    """jsae.caption (the public helper) gives what Captioner gives, with and without interventions; jsae.world is
    reachable after a bare import jsae."""
    from jsae.interventions import Captioner

    v = tiny_vlm("llava")
    vlm = (v.model, v.processor, v.adapter)
    imgs = v.images(2, start=1)
    d = torch.randn(32, generator=torch.Generator().manual_seed(9)) * 50
    ivs = [Steer(LAYER, "image", timing="prefill", direction=d)]
    want = Captioner(v.model, v.processor, v.adapter, prompt="a dog", max_new_tokens=5)(imgs, ivs)
    assert jsae.caption(vlm, imgs, "a dog", ivs, max_new_tokens=5) == want
    assert jsae.caption(vlm, imgs, "a dog", max_new_tokens=5) != want  # the steer reached the captions
    assert jsae.world.MODEL_NAMES == ("llava", "qwen3-vl-moe")


def test_non_finite_steering_is_refused():
    d = torch.ones(32)
    for bad in (dict(direction=d * float("nan")), dict(direction=d, strength=float("inf")),
                dict(direction=torch.ones(2, 32), strength=[1.0, float("nan")])):
        with pytest.raises(ValueError, match="must be finite"):
            Steer(LAYER, "image", **bad)
