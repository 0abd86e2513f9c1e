"""The paper's models at real width (issue 15), on the CPU, with random weights.

Five published configurations are kept as JSON test data in ``tests/data/real_configs`` (model config +
processor settings): LLaVA-1.5-7B, LLaVA-v1.6-Mistral-7B, LLaMA3-LLaVA-NeXT-8B, Qwen3-VL-30B-A3B (MoE) and
Qwen3-VL-4B (dense).  What is real here: the transformers classes at their real hidden sizes, heads, KV
heads, experts and vocabularies; the image processors built from the published settings (LLaVA-NeXT's
any-resolution pinpoints, Qwen's patch / merge sizes and pixel limits; PIL backends, no torchvision); the
Mistral SentencePiece tokenizer of ``mistral-common`` (LLaVA-v1.6-Mistral's vocabulary; LLaVA-1.5 uses it as
a stand-in for Vicuna's, the Llama-3 and Qwen families get a word-level vocabulary with their real special-
token ids); scikit-image's sample photographs at their own sizes and aspect ratios.

What is cut, for one CPU thread in a few minutes: models run with 2 decoder layers and 2 vision layers (width,
heads and patch size kept), in bfloat16; the forward tests shrink the *pixel limits* (LLaVA tiles of 28 px
with the pinpoints scaled alike, Qwen at most 24 tokens per image) so that images keep their aspect ratios
and give different token counts per image, but tens rather than thousands of tokens.  The image-token counts
at the published settings are checked through the real processors (no forward needed), and the thousands-of-
tokens precision check runs on the language model alone (Qwen3-VL-30B-A3B's, the cheapest per token).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsae  # noqa: F401  (before nnsight)
import numpy as np
import pytest
import torch
from nnsight import NNsight
from PIL import Image
from typer.testing import CliRunner

from jsae.adapters import for_model
from jsae.capture import capture_pairs, pool, read_layer
from jsae.cost import build_image_processor, build_processor, estimate_capture, instantiate, load_spec, meta_model
from jsae.interventions import Intervention, Steer, generate

CONFIGS = Path(__file__).parent / "data" / "real_configs"
NAMES = ["llava-1.5-7b-hf", "llava-v1.6-mistral-7b-hf", "llama3-llava-next-8b-hf", "qwen3-vl-30b-a3b-instruct",
         "qwen3-vl-4b-instruct"]
PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina", "coffee_portrait"]
CAPTIONS = ["A woman in a white space suit holding a helmet in front of a flag.",
            "Two cups of coffee on a wooden table next to a spoon and a saucer.",
            "An orange tabby cat sitting on a window sill.",
            "A rocket on the launch pad at dusk, with steam rising."]
SHORT = ["Two cups of coffee.", "An astronaut in a space suit."]  # the forward tests' captions (few tokens)
WORDS = sorted({w for c in CAPTIONS + SHORT for w in c.replace(",", " ,").replace(".", " .").split()})
SMALL_TILE = 28  # LLaVA forward tests: 2x2-patch tiles, pinpoints scaled alike
SMALL_QWEN_PIXELS = (4 * 1024, 24 * 1024)  # Qwen forward tests: 4..24 tokens per image (one token = 32x32 px)

pytestmark = pytest.mark.slow


# ================================================================================================
# Real inputs: photographs, tokenizers, processors
# ================================================================================================


@lru_cache(maxsize=None)
def photo(name: str) -> Image.Image:
    """A scikit-image sample photograph as RGB at its own size ("coffee_portrait": coffee turned 90°)."""
    import skimage.data

    if name == "coffee_portrait":
        return photo("coffee").transpose(Image.Transpose.ROTATE_90)
    return Image.fromarray(getattr(skimage.data, name)()).convert("RGB")


@lru_cache(maxsize=None)
def mistral_tokenizer() -> Any:
    """The LLaVA-v1.6-Mistral tokenizer: mistral-common's SentencePiece model (tokenizer.model.v1) loaded as a
    transformers Llama tokenizer, ``<image>`` = 32000 and ``<pad>`` = 32001 added as in llava-hf's."""
    import tempfile

    import mistral_common
    from transformers import LlamaTokenizer

    src = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    folder = tempfile.mkdtemp(prefix="mistral-tok-")
    shutil.copy(src, os.path.join(folder, "tokenizer.model"))
    tok = LlamaTokenizer.from_pretrained(folder, add_bos_token=True, padding_side="left")
    tok.add_tokens(["<image>"], special_tokens=True)
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.image_token = "<image>"
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    return tok


def wordlevel_tokenizer(spec: Any) -> Any:
    """A word-level vocabulary (the captions' words) with the family's special tokens at their real ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    t = spec.raw["tokenizer"]
    special = dict(t["special"])
    vocab = {"<unk>": 0, **{w: i + 1 for i, w in enumerate(WORDS)}, **special}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = {"image_token": t["image_token"]}
    if "<|vision_start|>" in special:
        extra.update(video_token="<|video_pad|>", vision_start_token="<|vision_start|>", vision_end_token="<|vision_end|>")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=t.get("bos_token"), eos_token=t["eos_token"],
                                  unk_token="<unk>", pad_token=t["pad_token"], extra_special_tokens=extra,
                                  padding_side="left")
    tok.add_special_tokens({"additional_special_tokens": [s for s in special if s not in (t.get("bos_token"), t["eos_token"], t["pad_token"])]})
    assert all(tok.convert_tokens_to_ids(s) == i for s, i in special.items())
    return tok


def tokenizer_for(spec: Any) -> Any:
    return mistral_tokenizer() if spec.raw["tokenizer"]["kind"] == "sentencepiece" else wordlevel_tokenizer(spec)


@lru_cache(maxsize=None)
def real_spec(name: str) -> Any:
    return load_spec(CONFIGS / f"{name}.json")


def small_spec(name: str) -> Any:
    """The spec with smaller pixel limits for the forward tests (see the module docstring)."""
    raw = copy.deepcopy(real_spec(name).raw)
    ip, cfg = raw["processor"]["image_processor"], raw["config"]
    if "qwen" in name:
        ip["size"] = {"shortest_edge": SMALL_QWEN_PIXELS[0], "longest_edge": SMALL_QWEN_PIXELS[1]}
    else:
        t = SMALL_TILE
        scale = lambda pins: [[h * t // 336, w * t // 336] for h, w in pins]  # noqa: E731
        cfg["vision_config"] = {**cfg["vision_config"], "image_size": t}
        ip.update(size={"shortest_edge": t}, crop_size={"height": t, "width": t})
        if "image_grid_pinpoints" in cfg:
            cfg["image_grid_pinpoints"] = ip["image_grid_pinpoints"] = scale(cfg["image_grid_pinpoints"])
        else:
            cfg["image_seq_length"] = (t // 14) ** 2
    return load_spec(raw)


@dataclass
class Real:
    """A real-width model (2 decoder layers, 2 vision layers, bf16) with its processor and adapter."""

    name: str
    spec: Any
    hf: Any
    model: Any
    processor: Any
    adapter: Any
    images: list = field(default_factory=list)


@pytest.fixture(scope="module", params=NAMES)
def real(request: Any) -> Any:
    spec = small_spec(request.param)
    hf = instantiate(spec, 2, vision_layers=2, dtype=torch.bfloat16)
    model = NNsight(hf)
    processor = build_processor(spec, tokenizer_for(real_spec(request.param)))
    r = Real(request.param, spec, hf, model, processor, for_model(model), [photo("coffee"), photo("astronaut")])
    yield r
    del r, hf, model
    gc.collect()


# ================================================================================================
# 1. Image-token counts at the published settings (no forward)
# ================================================================================================

# image tokens per photograph at the published processor settings (issue 15's closing note)
EXPECTED_TOKENS = {
    "llava-1.5-7b-hf": dict.fromkeys(PHOTOS, 576),
    "llava-v1.6-mistral-7b-hf": {"astronaut": 2928, "coffee": 2144, "chelsea": 1464, "rocket": 2144,
                                 "hubble_deep_field": 2634, "retina": 2928},
    "qwen3-vl-30b-a3b-instruct": {"astronaut": 256, "coffee": 228, "chelsea": 126, "rocket": 260,
                                  "hubble_deep_field": 837, "retina": 1936},
}
EXPECTED_TOKENS["llama3-llava-next-8b-hf"] = EXPECTED_TOKENS["llava-v1.6-mistral-7b-hf"]
EXPECTED_TOKENS["qwen3-vl-4b-instruct"] = EXPECTED_TOKENS["qwen3-vl-30b-a3b-instruct"]


@pytest.mark.parametrize("name", NAMES)
def test_image_token_counts_equal_the_processors_and_the_models(name):
    """Per photograph, at the published settings: the adapter's count = the tokens the real processor writes
    = what the model's own code packs (LLaVA-NeXT's pack_image_features on the meta device; Qwen's
    image_grid_thw / merge²); and the dry-run estimate reports the same counts."""
    spec = real_spec(name)
    processor = build_processor(spec, tokenizer_for(spec))
    meta = meta_model(spec)
    adapter = for_model(meta)
    images = [photo(p) for p in PHOTOS]
    enc = adapter.build_inputs(processor, images, [CAPTIONS[0]] * len(images))
    per_row = adapter.image_token_mask(enc).sum(1).tolist()
    from_inputs = [t.n_tokens for t in adapter.image_tokens(enc)]
    own = [adapter.num_image_tokens(im.height, im.width, processor) for im in images]
    assert per_row == from_inputs == own
    for p, n in zip(PHOTOS, own):
        assert n == EXPECTED_TOKENS[name].get(p, n), (p, n)
    d = adapter.d_in
    if "image_grid_pinpoints" in spec.raw["config"]:
        assert len(set(own)) >= 4  # any-resolution: the aspect ratio decides the count
        feats = [torch.empty(int(n_tiles), 576, d, device="meta") for n_tiles in (enc["pixel_values"].abs().flatten(2).sum(-1) > 0).sum(1)]
        packed, _ = meta.model.pack_image_features(feats, enc["image_sizes"], "default", meta.model.image_newline)
        assert [int(x.shape[0]) for x in packed] == own
    elif "qwen" in name:
        m = spec.config.vision_config.spatial_merge_size
        assert (enc["image_grid_thw"].prod(-1) // m**2).tolist() == own and max(own) > 1000
    else:
        assert own == [576] * len(images)
    est = estimate_capture(spec, list(zip(images, [CAPTIONS[0]] * len(images))), [3, 7], processor=processor)
    assert list(est.image_tokens) == own and est.d_in == d


def test_caption_masks_on_the_mistral_sentencepiece_tokenizer():
    """The real SentencePiece vocabulary puts a bare '▁' piece before '<image>' and glues the caption's first
    word to the newline: the caption mask still decodes to exactly the caption, for the chat template, the
    plain layout and the reference's raw prompt, in a left-padded batch of photos of different sizes."""
    spec = real_spec("llava-v1.6-mistral-7b-hf")
    tok = mistral_tokenizer()
    processor = build_processor(spec, tok)
    adapter = for_model(meta_model(spec))
    captions = CAPTIONS + ["café au lait, 2 spoons & a 10% tip", " leading space and trailing space "]
    images = [photo(p) for p in ["coffee", "chelsea", "astronaut", "rocket", "coffee_portrait", "chelsea"]]
    for kw in ({}, {"chat_template": False}, {"prompt_template": "[INST] <image>\n{caption} [/INST]"}):
        enc = adapter.build_inputs(processor, images, captions, **kw)
        ids, cap, img = enc["input_ids"], adapter.caption_token_mask(enc), adapter.image_token_mask(enc)
        for b, c in enumerate(captions):
            assert tok.decode(ids[b][cap[b]]) == c.strip(), kw
        assert not bool((cap & img).any()) and bool((enc["attention_mask"] == 0).any())  # padded rows
        if not kw.get("chat_template", True) is False:
            before = ids[0][int(img[0].nonzero()[0]) - 1]
            assert tok.convert_ids_to_tokens(int(before)) == "▁"  # the SentencePiece space piece, not caption
    # the caption never includes the template's own words
    enc = adapter.build_inputs(processor, images[:1], captions[:1], add_generation_prompt=True)
    assert "[/INST]" in tok.decode(enc["input_ids"][0][~adapter.caption_token_mask(enc)[0]])


# ================================================================================================
# 2. Forward behaviour at real width (bf16, 2 layers, small pixel limits)
# ================================================================================================


def test_batch_pools_exactly_as_one_image_at_a_time(real, tmp_path):
    """Two photographs of different sizes (so different image-token counts and a padded row) captured as one
    batch give, per row, the pooled vision and caption vectors of each captured alone (bf16 tolerance)."""
    pairs = list(zip(real.images, SHORT))
    enc = real.adapter.build_inputs(real.processor, real.images, [c for _, c in pairs])
    counts = real.adapter.image_token_mask(enc).sum(1).tolist()
    assert counts[0] != counts[1] or "llava-1.5" in real.name  # LLaVA-1.5: a fixed grid, the captions differ
    assert bool((enc["attention_mask"] == 0).any())
    kw = dict(layers=[0, 1], processor=real.processor, progress=False)
    capture_pairs(real.model, pairs, out_dir=tmp_path / "batch", batch_size=2, **kw)
    capture_pairs(real.model, pairs, out_dir=tmp_path / "alone", batch_size=1, **kw)
    for layer in (0, 1):
        bv, bt, _ = read_layer(tmp_path / "batch", layer)
        av, at, _ = read_layer(tmp_path / "alone", layer)
        assert bv.shape == (2, real.adapter.d_in) and bool(torch.isfinite(bv).all() and torch.isfinite(bt).all())
        for got, want in ((bv, av), (bt, at)):
            scale = want.abs().max().item()
            torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * scale)
        assert not torch.allclose(bv[0], bv[1])  # two different images


@dataclass(frozen=True, eq=False)
class Record(Intervention):
    """Records the states at its positions (``"all"``: every attended prompt token, then each generated one)
    where it sits in the list of interventions of its layer; edits nothing."""

    log: list = field(default_factory=list)

    def edit(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.log.append(x.detach().clone())
        return x


def test_steering_edits_exactly_the_intended_positions_under_generate(real):
    """One greedy ``jsae.generate`` with a KV cache and three edits: +4 at the image tokens of layer 0 and at
    the caption tokens of layer 1 (prefill only), and at every generated token of layer 0 (every step).
    Recorders before and after the edits of each layer show that exactly those positions of every row
    change, that the prefill edits stop after the prompt and that each decode step is one token per row."""
    enc = real.adapter.build_inputs(real.processor, real.images, SHORT, add_generation_prompt=True)
    d = real.adapter.d_in
    push = torch.full((d,), 4.0)
    before = [Record(L, "all") for L in (0, 1)]
    after = [Record(L, "all") for L in (0, 1)]
    ivs = [*before, Steer(0, "image", "prefill", direction=push), Steer(1, "text", "prefill", direction=push),
           Steer(0, "generated", "every_step", direction=push), *after]
    new = 3
    texts = generate(real.model, enc, ivs, max_new_tokens=new, processor=real.processor)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    att = enc["attention_mask"].bool()
    image, caption = real.adapter.image_token_mask(enc)[att], real.adapter.caption_token_mask(enc)[att]
    for L, want in ((0, image), (1, caption)):
        assert len(before[L].log) == len(after[L].log) == new  # prefill + one record per decode step
        changed = (before[L].log[0] != after[L].log[0]).any(-1)
        assert torch.equal(changed, want), f"layer {L}: edited {int(changed.sum())} positions, wanted {int(want.sum())}"
        for step in range(1, new):
            pre, post = before[L].log[step], after[L].log[step]
            assert pre.shape == (2, d)  # KV cache: one new token per row
            moved = (pre != post).any(-1)
            assert bool(moved.all()) if L == 0 else not bool(moved.any())


# ================================================================================================
# 3. Precision with thousands of tokens
# ================================================================================================


def test_pooled_states_are_finite_in_fp16_and_bf16_with_thousands_of_tokens():
    """Qwen3-VL-30B-A3B's language model (width 2048, 128 experts; 1 decoder layer, the cheapest real-width
    layer per token) on as many image positions as the retina photograph gives at the published settings
    (1,936), of the projector's scale, plus a caption, in bfloat16 and float16: the layer's states are
    finite, their jsae pooling (float32) matches a float64 pooling of the same states, and the pooled vectors
    of the two dtypes agree."""
    from transformers import Qwen3VLMoeTextModel
    from transformers.initialization import no_init_weights

    from jsae.cost import RANDOM_PERIOD, _fill_, truncated_config

    spec = real_spec("qwen3-vl-30b-a3b-instruct")
    cfg = truncated_config(spec, 1).text_config
    n_img = EXPECTED_TOKENS["qwen3-vl-30b-a3b-instruct"]["retina"]
    n_txt = 24
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(1, n_img + n_txt, cfg.hidden_size, generator=g)
    embeds[:, :n_img] *= 8.0  # image features come out of the projector larger than text embeddings
    image = torch.zeros(1, n_img + n_txt, dtype=torch.bool)
    image[:, :n_img] = True
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with no_init_weights():
            lm = Qwen3VLMoeTextModel(cfg).eval()
    finally:
        torch.set_default_dtype(before)
    base = torch.randn(RANDOM_PERIOD, generator=g) * 0.02
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            elif "embed_tokens" not in name:  # inputs_embeds are given
                _fill_(p, base, int(torch.randint(RANDOM_PERIOD, (), generator=g)))
    pooled = {}
    for dtype in (torch.bfloat16, torch.float16):
        lm = lm.to(dtype)
        out = {}
        h = lm.layers[0].register_forward_hook(lambda m, a, o: out.setdefault("h", o[0] if isinstance(o, tuple) else o))
        try:
            with torch.no_grad():
                lm(inputs_embeds=embeds.to(dtype), use_cache=False)
        finally:
            h.remove()
        hidden = out["h"]
        assert hidden.dtype == dtype and hidden.shape == (1, n_img + n_txt, 2048) and bool(torch.isfinite(hidden).all())
        pooled[dtype] = [pool(hidden, m, "mean") for m in (image, ~image)]
        for got, m in zip(pooled[dtype], (image, ~image)):
            want = hidden[m].double().mean(0, keepdim=True)
            assert got.dtype == torch.float32 and bool(torch.isfinite(got).all())
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    for a, b in zip(pooled[torch.float16], pooled[torch.bfloat16]):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05 * b.abs().max().item())


# ================================================================================================
# 4. The dry run
# ================================================================================================


def test_dry_run_from_the_command_line_and_the_api(tmp_path):
    from jsae.cli import app

    spec = CONFIGS / "llava-v1.6-mistral-7b-hf.json"
    r = CliRunner().invoke(app, ["run", "capture", "--dry-run", "--model", str(spec), "--layers", "8,16,24,31",
                                 "--n", "8", "--n-pairs", "50000", "--batch-size", "8"])
    assert r.exit_code == 0, r.output
    for line in ("image tokens / image", "bytes / pair / layer  32,768", "shards                49", "disk                  6.55 GB",
                 "forward activations", "model weights"):
        assert line in r.output, (line, r.output)
    photos = [photo(p) for p in PHOTOS]
    est = estimate_capture(spec, photos, [8, 16, 24, 31], n_pairs=50_000, batch_size=8)
    assert est.bytes_per_pair_per_layer == 2 * 4096 * 4 and est.n_shards == 49 and est.disk_bytes == 50_000 * 4 * 32768
    assert est.tokens_summary["max"] == 2928 and est.batch_seq_len > 2928
    assert json.dumps(est.as_dict())  # serialisable
    small = estimate_capture(spec, photos, [0], batch_size=1)
    assert small.activation_bytes < est.activation_bytes and small.flops_per_pair < est.flops_per_pair
    sizes = [(480, 640), (640, 427)]  # (height, width) pairs work too
    assert len(estimate_capture(CONFIGS / "qwen3-vl-30b-a3b-instruct.json", sizes, [47]).image_tokens) == 2
    for bad, match in ((dict(layers=[32]), "out of range"), (dict(layers=[]), "layers must be"),
                       (dict(layers=[1], batch_size=0), "batch_size"), (dict(layers=[1], dtype="int8"), "floating dtype")):
        with pytest.raises(ValueError, match=match) as e:
            estimate_capture(spec, photos, **bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="empty"):
        estimate_capture(spec, [], [1])
    with pytest.raises(TypeError, match="cannot read the size"):
        estimate_capture(spec, ["not an image"], [1])
    with pytest.raises((OSError, ValueError)) as e:
        estimate_capture(str(tmp_path / "nothing-here"), photos, [1])
    assert "\n" not in str(e.value)
    np.testing.assert_equal(len(build_image_processor(spec).image_grid_pinpoints), 5)
