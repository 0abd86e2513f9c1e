"""Options of the JSAE reference protocol (issue 13): fp32 pooling, a raw prompt template with the text view
over every non-image token, one row per image on real data, steering at every generated token, absolute
strength grids."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_vlm
from jsae.capture import capture_pairs, pool
from jsae.training import load_pairs

REFERENCE_PROMPT = "USER: <image> {caption} ASSISTANT:"  # the tiny tokenizer splits on spaces


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pooling_thousands_of_half_precision_tokens_is_finite_and_exact(dtype):
    hidden = torch.full((2, 3000, 8), 30.0, dtype=dtype)
    hidden[1, :, 0] = torch.linspace(-40, 40, 3000).to(dtype)
    mask = torch.ones(2, 3000, dtype=torch.bool)
    mask[1, 2928:] = False
    got = pool(hidden, mask, "mean")
    want = pool(hidden.float(), mask, "mean")
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    assert torch.equal(got, want) and torch.allclose(got[0], torch.full((8,), 30.0))
    assert not torch.isfinite((hidden[0] * 1).sum(0)).all() if dtype == torch.float16 else True  # what fp16 would do


def test_raw_prompt_template_and_non_image_text_view(tmp_path):
    v = tiny_vlm("llava")
    images, captions = zip(*v.pairs(3))
    enc = v.adapter.build_inputs(v.processor, list(images), list(captions), prompt_template=REFERENCE_PROMPT)
    tok = v.processor.tokenizer
    for b, cap in enumerate(captions):  # the caption mask is exactly the caption, inside the template
        ids = enc["input_ids"][b][enc["caption_mask"][b]]
        assert tok.decode(ids) == cap
    non_image = v.adapter.non_image_token_mask(enc)
    assert torch.equal(non_image, enc["attention_mask"].bool() & ~v.adapter.image_token_mask(enc))
    assert bool((non_image.sum(1) > enc["caption_mask"].sum(1)).all())  # BOS, USER:, ASSISTANT: too
    kw = dict(layers=[1], processor=v.processor, progress=False, prompt_template=REFERENCE_PROMPT)
    capture_pairs(v.model, v.pairs(3), out_dir=tmp_path / "cap", text_positions="caption", **kw)
    capture_pairs(v.model, v.pairs(3), out_dir=tmp_path / "all", text_positions="non_image", **kw)
    a, b = load_pairs(tmp_path / "cap", batch_size=3, shuffle=False), load_pairs(tmp_path / "all", batch_size=3, shuffle=False)
    assert torch.equal(a.vision, b.vision) and not torch.allclose(a.text, b.text)
    assert b.manifest["text_positions"] == "non_image" and b.manifest["prompt_template"] == REFERENCE_PROMPT
    with pytest.raises(ValueError, match="holds another|not 'caption'|text_positions"):
        capture_pairs(v.model, v.pairs(3), out_dir=tmp_path / "all", text_positions="caption", **kw)
    with pytest.raises(ValueError, match=r"has no \{caption\}"):
        v.adapter.build_inputs(v.processor, list(images), list(captions), prompt_template="USER: <image> ASSISTANT:")
    with pytest.raises(ValueError, match="holds 0 image placeholder"):
        v.adapter.build_inputs(v.processor, list(images), list(captions), prompt_template="USER: {caption} ASSISTANT:")


def test_caption_data_one_row_per_image_with_a_seeded_caption(tmp_path):
    """COCO style: one row per caption; the parts must hold disjoint images and one caption each."""
    import datasets

    from jsae.data.sources import CaptionSource
    from jsae.world import world_dataset

    base = world_dataset("validation", 12, seed=5)
    rows = []
    for i, ex in enumerate(base):
        for k in range(3):  # every image three times, with three captions
            rows.append({"image": ex["image"], "caption": f"{ex['caption']} v{k}", "cocoid": 1000 + i})
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "coco"))
    src = CaptionSource(path=str(tmp_path / "coco"), sizes={"train": 6, "label": 3, "eval": 3}, min_count=1, seed=0)
    ids = {part: [ex["image_id"] for ex in src.dataset(part)] for part in src.parts}
    assert sum(len(v) for v in ids.values()) == 12 and len(set().union(*map(set, ids.values()))) == 12  # disjoint
    caps = [ex["caption"] for part in src.parts for ex in src.dataset(part)]
    assert all(c.rsplit(" v", 1)[1] in {"0", "1", "2"} for c in caps) and len({c[-1] for c in caps}) > 1
    assert all(len(ex["captions"]) == 3 for ex in src.dataset("train"))  # every reference caption kept
    again = CaptionSource(path=str(tmp_path / "coco"), sizes={"train": 6, "label": 3, "eval": 3}, min_count=1, seed=0)
    assert [ex["caption"] for ex in again.dataset("train")] == [ex["caption"] for ex in src.dataset("train")]
    assert again.fingerprint("train") == src.fingerprint("train")
    other = CaptionSource(path=str(tmp_path / "coco"), sizes={"train": 6, "label": 3, "eval": 3}, min_count=1, seed=1)
    assert other.fingerprint("train") != src.fingerprint("train")  # another caption draw is other data
    with pytest.raises(ValueError, match="has 12 rows but n_train \\+ n_label \\+ n_eval = 13"):
        CaptionSource(path=str(tmp_path / "coco"), sizes={"train": 7, "label": 3, "eval": 3}).dataset("train")


def test_steering_every_generated_token_reaches_the_last_layer():
    """At the last decoder layer the image-token states at prefill are read by nothing, so prefill-only
    steering cannot change a caption; steering every generated token does (the reference's timing)."""
    from jsae import load_vlm
    from jsae.interventions import Captioner
    from jsae.protocol.sweep import POSITION_SETS, SweepConfig, steer_interventions, token_norm
    from jsae.world import world_dataset
    from jsae.world.processors import CAPTION_PROMPT

    vlm = load_vlm("llava")
    last = vlm.adapter.n_layers - 1
    images = [ex["image"] for ex in world_dataset("test", 6, 0)]
    caption = Captioner(vlm.model, vlm.processor, vlm.adapter, prompt=CAPTION_PROMPT, max_new_tokens=8)
    direction = torch.nn.functional.normalize(torch.randn(vlm.adapter.d_in, generator=torch.Generator().manual_seed(0)), dim=0)
    alpha = 3 * token_norm(vlm, images, last, CAPTION_PROMPT)  # 3x the per-token state norm
    base = caption(images)
    prefill = caption(images, steer_interventions(last, "image", direction, alpha))
    every = caption(images, steer_interventions(last, "image+generated", direction, alpha))
    assert prefill == base
    assert sum(a != b for a, b in zip(every, base)) >= len(images) // 2
    assert [p for p, _ in POSITION_SETS["image+generated"]] == ["image", "generated"]
    with pytest.raises(ValueError, match="unknown steering positions"):
        SweepConfig([last], ["cat"], positions=("everywhere",))
    with pytest.raises(ValueError, match="unknown steering positions"):
        steer_interventions(last, "everywhere", direction, 1.0)
