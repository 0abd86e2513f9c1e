"""The embedded world: scenes, grammar, datasets, tokenizer/processors, toy VLMs (issue 5)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from jsae import load_vlm
from jsae.world.models import load_toy_hf
from jsae.world import (COLORS, POSITIONS, TYPES, WorldConfig, all_captions, build_llava_processor,
                        build_qwen_processor, build_tokenizer, caption, features, generate_scene, load_caption_dataset,
                        parse_caption, questions, world_dataset)
from jsae.world.models import MODEL_NAMES, REQUIRED_FILES, build_processor, caption_prompt, model_dir
from jsae.world.scenes import DETAIL_RGB


# ---------------------------------------------------------------------------------------------- scenes

def test_scene_is_deterministic_for_a_seed():
    a, b, c = generate_scene(123), generate_scene(123), generate_scene(124)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert [o.to_record() for o in a.objects] == [o.to_record() for o in b.objects]
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_masks_and_bboxes_match_drawn_pixels():
    cfg = WorldConfig()
    g, p = cfg.grid, cfg.patch_size
    n_objects = 0
    for seed in range(25):
        sc = generate_scene(seed)
        img = np.asarray(sc.image).astype(int)
        assert img.shape == (48, 48, 3) and 1 <= len(sc.objects) <= 3
        union = np.zeros((48, 48), bool)
        for k, o in enumerate(sc.objects):
            n_objects += 1
            pm = o.pixel_mask
            assert not (union & pm).any(), "objects must not overlap"
            union |= pm
            ys, xs = np.nonzero(pm)
            assert o.bbox == (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            # every drawn pixel has the object's colour (with shading) or the dark detail colour
            px = img[pm]
            near_obj = np.abs(px - np.array(COLORS[o.color])).max(1) <= 40
            near_det = np.abs(px - np.array(DETAIL_RGB)).max(1) <= 1
            assert (near_obj | near_det).all()
            assert near_obj.mean() > 0.7
            # mask over the patch grid == patches holding at least one drawn pixel
            grid_mask = np.array(o.mask).reshape(g, g).astype(bool)
            assert np.array_equal(grid_mask, pm.reshape(g, p, g, p).any(axis=(1, 3)))
            assert np.array_equal(grid_mask, sc.patch_mask(k))
            # the bbox centre lies in the object's position cell
            cx, cy = o.bbox[0] + o.bbox[2] / 2, o.bbox[1] + o.bbox[3] / 2
            assert POSITIONS[(cy >= 24) * 2 + (cx >= 24)] == o.position
    assert n_objects > 35


def test_world_covers_the_vocabulary():
    seen = {(o.name, o.color, o.size) for s in range(150) for o in generate_scene(s).objects}
    assert {n for n, _, _ in seen} == set(TYPES) and {c for _, c, _ in seen} == set(COLORS)
    assert len(TYPES) >= 6 and len(COLORS) >= 6 and {s for _, _, s in seen} == {"small", "large"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_objects=0), "min_objects"),
    (dict(max_objects=0), "max_objects"),
    (dict(colors=("red", "magenta")), "unknown colour"),
    (dict(types=("apple", "dragon")), "unknown object type"),
    (dict(image_size=50), "multiple of patch_size"),
    (dict(min_objects=1.5), "integer"),
])
def test_invalid_world_parameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        WorldConfig(**kwargs)


@pytest.mark.parametrize("seed", [1.5, "3", True, None])
def test_seed_must_be_an_integer(seed):
    with pytest.raises(TypeError, match="seed must be an integer"):
        generate_scene(seed)
    with pytest.raises(TypeError, match="seed must be an integer"):
        world_dataset("train", 2, seed=seed)


def test_restricted_world_parameters_are_respected():
    cfg = WorldConfig(min_objects=2, max_objects=2, colors=("red", "blue"))
    for s in range(20):
        objs = generate_scene(s, cfg).objects
        assert len(objs) == 2 and {o.color for o in objs} <= {"red", "blue"}


# ---------------------------------------------------------------------------------------------- grammar

def test_captions_use_both_levels_and_parse_back():
    sc = generate_scene(5)
    caps = all_captions(sc)
    assert len(set(caps)) == len(caps) >= 4
    for c in caps:
        for o in sc.objects:
            assert f"{o.size} {o.color} {o.name}" in c
    assert any(o.category in " ".join(caps) for o in sc.objects)
    parsed = parse_caption(caption(sc.objects, 0))
    assert [(p["name"], p["color"], p["size"], p["position"]) for p in parsed] == \
        [(o.name, o.color, o.size, o.position) for o in sc.objects]


def test_questions_have_exact_answers():
    sc = generate_scene(11)
    qa = dict(questions(sc))
    for o in sc.objects:
        if sum(p.name == o.name for p in sc.objects) == 1:
            assert qa[f"what color is the {o.name} ?"] == o.color
            assert qa[f"where is the {o.name} ?"] == o.position
        assert qa[f"is there a {o.name} ?"] == "yes"
    missing = [t for t in TYPES if t not in {o.name for o in sc.objects}]
    assert all(qa[f"is there a {t} ?"] == "no" for t in missing)


# ---------------------------------------------------------------------------------------------- datasets

def test_world_dataset_schema_determinism_and_splits():
    a = world_dataset("train", 4, seed=0)
    b = world_dataset("train", 4, seed=0)
    t = world_dataset("test", 4, seed=0)
    assert a.features == features()
    assert a[0]["caption"] == b[0]["caption"] and a[0]["objects"] == b[0]["objects"]
    assert np.array_equal(np.asarray(a[1]["image"]), np.asarray(b[1]["image"]))
    assert not set(a["image_id"]) & set(t["image_id"])
    assert not any(np.array_equal(np.asarray(x), np.asarray(y)) for x in a["image"] for y in t["image"])
    ex = a[0]
    assert ex["image"].size == (48, 48) and ex["qa"] and ex["objects"][0]["bbox"]
    assert len(ex["objects"][0]["mask"]) == 36


def test_real_data_loader_gives_the_same_schema(tmp_path):
    from PIL import Image

    d = tmp_path / "coco_like"
    d.mkdir()
    rows = []
    for i in range(3):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(d / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "captions": [f"a photo number {i}", "another caption"],
                     "objects": [{"name": "cat", "bbox": [1, 2, 3, 4]}]})
    (d / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_caption_dataset(str(d))
    assert ds.features == features() and len(ds) == 3
    assert ds[1]["caption"] == "a photo number 1" and ds[1]["captions"][1] == "another caption"
    assert ds[0]["objects"][0]["name"] == "cat" and ds[0]["objects"][0]["bbox"] == [1, 2, 3, 4]
    # a dataset saved to disk loads too (world round trip through the real-data loader)
    world_dataset("validation", 2).save_to_disk(str(tmp_path / "saved"))
    ds2 = load_caption_dataset(str(tmp_path / "saved"))
    assert ds2.features == features() and len(ds2) == 2
    with pytest.raises(ValueError, match="no caption column"):
        (tmp_path / "bad").mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / "bad" / "x.png")
        (tmp_path / "bad" / "metadata.jsonl").write_text(json.dumps({"file_name": "x.png", "label2": 1}))
        load_caption_dataset(str(tmp_path / "bad"))


# ---------------------------------------------------------------------------------------------- tokenizer / processors

def test_tokenizer_round_trip(tmp_path):
    from transformers import PreTrainedTokenizerFast

    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    tok2 = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    text = caption(generate_scene(3).objects, 2)
    assert tok(text).input_ids == tok2(text).input_ids
    assert tok2.decode(tok2(text).input_ids, skip_special_tokens=True) == text
    ids = tok2("<image><|image_pad|><|vision_start|><|vision_end|>").input_ids
    assert tok2.convert_ids_to_tokens(ids) == ["<s>", "<image>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]
    assert len(tok2) < 100


@pytest.mark.parametrize("family", ["llava", "qwen"])
def test_processor_round_trip(tmp_path, family):
    from transformers import LlavaProcessor

    from jsae.world.processors import ToyQwen3VLProcessor

    proc = build_llava_processor() if family == "llava" else build_qwen_processor()
    proc.save_pretrained(tmp_path)
    proc2 = (LlavaProcessor if family == "llava" else ToyQwen3VLProcessor).from_pretrained(tmp_path)
    imgs = [generate_scene(i).image for i in range(2)]
    text = ["<image> a red", "<image> what color is the cat ?"] if family == "llava" else ["a red", "what color is the cat ?"]
    a = proc(images=imgs, text=text, return_tensors="pt", padding=True)
    b = proc2(images=imgs, text=text, return_tensors="pt", padding=True)
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k])
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>" if family == "llava" else "<|image_pad|>")
    assert ((a["input_ids"] == image_id).sum(1) == 36).all()
    if family == "llava":
        assert a["pixel_values"].shape == (2, 3, 48, 48)
    else:
        assert {"image_grid_thw", "mm_token_type_ids"} <= set(a)
        assert a["image_grid_thw"].tolist() == [[1, 12, 12]] * 2
        assert torch.equal(a["mm_token_type_ids"] == 1, a["input_ids"] == image_id)
    assert proc2.batch_decode(a["input_ids"][:, -2:], skip_special_tokens=True)[1] == "cat ?"


# ---------------------------------------------------------------------------------------------- toy models

@pytest.mark.parametrize("name", MODEL_NAMES)
def test_training_smoke_and_loading_a_trained_directory(tmp_path, name):
    """The LLaVA recipe on a tiny model: every stage runs, frozen parameters stay bit-identical through the stages
    that freeze them, and a second run with the same seed gives the same weights."""
    from safetensors.torch import load_file

    from jsae.adapters import for_model
    from jsae.world.training import STAGES, TrainConfig, train_toy_vlm

    cfg = TrainConfig(text_steps=2, vision_steps=2, align_steps=2, finetune_steps=4, finetune_text_every=2,
                      batch_size=4, size="tiny", eval_n=0)
    model, _, summary = train_toy_vlm(name, tmp_path / "a", cfg, workers=0, progress=False, log=lambda *_: None,
                                      keep_stages=True)
    assert list(summary["seconds"]) == list(STAGES) and {h["stage"] for h in summary["history"]} == set(STAGES)
    w = {st: dict(load_toy_hf(name, directory=tmp_path / f"a.stage-{st}")[0].named_parameters()) for st in STAGES}
    adapter = for_model(model)
    names = {id(p): n for n, p in model.named_parameters()}
    group = lambda params: {names[id(p)] for p in params}  # noqa: E731
    lm = group(list(adapter.language_model.parameters()) + list(model.lm_head.parameters()))
    proj = group(p for m in adapter.projector_modules for p in m.parameters())
    tower = group(adapter.vision_tower.parameters()) - proj
    same = lambda a, b, keys: all(torch.equal(w[a][k], w[b][k]) for k in keys)  # noqa: E731
    changed = lambda a, b, keys: any(not torch.equal(w[a][k], w[b][k]) for k in keys)  # noqa: E731
    assert same("text_pretraining", "vision_pretraining", lm)  # the LM is frozen in vision pretraining ...
    assert same("vision_pretraining", "feature_alignment", lm | tower)  # ... and with the tower in feature alignment
    assert same("feature_alignment", "finetuning", tower)  # the tower stays frozen in fine-tuning
    assert changed("vision_pretraining", "feature_alignment", proj)  # the projector alone learns in alignment
    assert changed("feature_alignment", "finetuning", lm) and changed("feature_alignment", "finetuning", proj)
    assert changed("text_pretraining", "vision_pretraining", tower)
    # deterministic: a second run with the same seed gives the same weights
    train_toy_vlm(name, tmp_path / "again", cfg, workers=0, progress=False, log=lambda *_: None)
    w1, w2 = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert not (tmp_path / "again.stage-finetuning").exists()  # stage states are dropped once the run completes
    model, proc = load_toy_hf(name, directory=tmp_path / "a")
    assert model.config.text_config.num_hidden_layers == 2
    enc = proc(images=[generate_scene(0).image], text=[caption_prompt(name, proc)], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= enc["input_ids"].shape[1] + 3


def test_word_pictures_write_every_object_where_it_is():
    """A word picture has one word per image token, names each object's type and colour on the patches it covers
    (both, always), ``nothing`` elsewhere; text pretraining puts it where the image placeholder stands."""
    import numpy as np

    from jsae.world.grammar import NOTHING, word_picture
    from jsae.world.training import PICTURE_GRID, PICTURE_MIN_FRACTION, picture_prompt, text_batch

    for seed in range(30):
        s = generate_scene(seed)
        words = word_picture(s, np.random.default_rng(seed), PICTURE_GRID, noise=0.0, min_fraction=PICTURE_MIN_FRACTION)
        owner = s.patch_owner(PICTURE_GRID, PICTURE_MIN_FRACTION)
        assert len(words) == PICTURE_GRID ** 2
        for k, o in enumerate(s.objects):
            mine = [w for w, ow in zip(words, owner) if ow == k]
            assert set(mine) == {o.name, o.color}  # both words of every object, nothing else on its patches
        assert all(w == NOTHING for w, ow in zip(words, owner) if ow < 0)
    tok = build_tokenizer()
    for name in MODEL_NAMES:
        proc = build_processor(name, tok)
        prompt = picture_prompt(name, proc, ["cat"] * 36)
        assert proc.image_token not in prompt and prompt.count("cat") == 36
        enc, labels = text_batch(name, proc, [generate_scene(i) for i in range(8)], np.random.default_rng(0))
        assert tok.unk_token_id not in enc["input_ids"]  # every word of the corpus is in the vocabulary
        assert torch.equal(labels != -100, enc["attention_mask"] == 1)  # loss on every token, as an LM is pretrained


def test_describe_then_answer_batches_keep_the_caption_loss():
    """In a describe-then-answer sample the caption and the answer carry the loss, the question does not."""
    import numpy as np

    from jsae.world.grammar import caption, sample_questions
    from jsae.world.training import _scenes, build_batch, describe_prompt

    tok = build_tokenizer()
    for name in MODEL_NAMES:
        proc = build_processor(name, tok)
        sc = _scenes(0, 5, 0, 2)
        caps = [caption(s.objects, 0) for s in sc]
        q, a = sample_questions(sc[0], 1, np.random.default_rng(0))[0]
        _, labels = build_batch(name, proc, sc, [(describe_prompt(caps[0], q), a), ("", caps[1])], [len(caps[0].split()), 0])
        said = [tok.decode([t for t in row.tolist() if t != -100]) for row in labels]
        assert said == [f"{caps[0]} {a} </s>", f"{caps[1]} </s>"]


def _shipped(name):
    """The shipped directory of ``name`` (the weights are part of the package: missing files are a failure)."""
    d = model_dir(name)
    missing = [f for f in REQUIRED_FILES if not (d / f).is_file()]
    assert not missing, f"shipped weights of {name} lack {missing}; rebuild them with `jsae world train-models`"
    return d


def test_toy_models_are_one_table_entry_each():
    """Each toy model is one TOY_MODELS entry; its captioning prompt puts text after the image (as real LLaVA
    and Qwen prompts do), so the last prompt token is not an image token."""
    from jsae.adapters import adapter_class
    from jsae.world.models import TOY_MODELS, build_config, model_class, processor_class
    from jsae.world.training import DEFAULTS

    assert MODEL_NAMES == tuple(TOY_MODELS) == tuple(DEFAULTS) == ("llava", "qwen3-vl-moe")
    from jsae.world.models import answer_template
    from jsae.world.scenes import generate_scene

    assert caption_prompt("llava", build_processor("llava")) == "user : <image> describe the image assistant :"
    assert caption_prompt("qwen3-vl-moe", build_processor("qwen3-vl-moe")) == "user : <|image_pad|> describe the image assistant :"
    for name in MODEL_NAMES:
        proc = build_processor(name)
        assert isinstance(proc, processor_class(name))
        adapter = adapter_class(model_class(name))
        enc = proc(images=[generate_scene(0).image], text=[caption_prompt(name, proc)], return_tensors="pt")
        ids = enc["input_ids"][0]
        img = (ids == proc.tokenizer.convert_tokens_to_ids(adapter.image_token)).nonzero().flatten()
        assert int(img.max()) < len(ids) - 5  # five text tokens follow the image: "describe the image assistant :"
        assert answer_template(name, proc).endswith("assistant : {caption}")
        cfg = build_config(name, 60, "tiny")
        assert cfg.text_config.num_hidden_layers == 2 and cfg.text_config.vocab_size == 64
    with pytest.raises(ValueError, match="unknown toy model 'gpt'"):
        caption_prompt("gpt", build_processor("llava"))


def test_world_calls_restore_the_padding_side():
    """Batches are built and captions generated with the padding the code needs, whatever the tokenizer's
    setting, and the setting is left as it was."""
    from jsae.world.evaluate import generate_text
    from jsae.world.training import _scenes, build_batch, text_batch

    _shipped("llava")
    model, proc = load_toy_hf("llava")
    tok = proc.tokenizer
    images = [generate_scene(30_000 + i).image for i in range(3)]
    outs = {}
    for side in ("left", "right"):
        tok.padding_side = side
        outs[side] = generate_text(model, proc, "llava", images, ["", "where is the cat ?", ""], max_new_tokens=6)
        assert tok.padding_side == side
        sc = _scenes(0, 3, 0, 2)
        build_batch("llava", proc, sc, [("", "a cat"), ("what color is it ?", "red")])
        text_batch("llava", proc, sc, np.random.default_rng(0))
        assert tok.padding_side == side
    assert outs["left"] == outs["right"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shipped_toy_vlm_loads_offline_and_captions(name, monkeypatch):
    from transformers import LlavaForConditionalGeneration, Qwen3VLMoeForConditionalGeneration

    from jsae.world.evaluate import generate_text, score_caption

    _shipped(name)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    model, proc, adapter = load_vlm(name)
    model = adapter.hf_model
    cls = LlavaForConditionalGeneration if name == "llava" else Qwen3VLMoeForConditionalGeneration
    assert isinstance(model, cls) and not model.training
    text_cfg = model.config.text_config
    assert text_cfg.num_hidden_layers >= 8
    if name == "qwen3-vl-moe":
        assert text_cfg.num_experts >= 4
    scenes = [generate_scene(10_000 + i) for i in range(8)]
    caps, ended = generate_text(model, proc, name, [s.image for s in scenes], [""] * 8)
    assert all(ended)
    from jsae.world.grammar import parse_caption, parses

    named = sum(o.name in {f["name"] for f in parse_caption(c)} for c, s in zip(caps, scenes) for o in s.objects)
    assert named >= 0.8 * sum(len(s.objects) for s in scenes)  # object types (the steered concepts) are read well
    assert sum(score_caption(c, s.objects)["correct"] for c, s in zip(caps, scenes)) >= 0.4 * sum(len(s.objects) for s in scenes)
    assert sum(parses(c) for c in caps) >= 6  # complete captions of one of the templates
    assert adapter is not None


def test_bad_model_name():
    # load_vlm reads a name that is not a toy model as a hub id (jsae.vlm); the world's loader refuses it
    with pytest.raises(ValueError, match="unknown toy model 'gpt'"):
        load_toy_hf("gpt")
    with pytest.raises(ValueError, match=r"unknown toy model 'gpt'; choose one of \['llava', 'qwen3-vl-moe'\]"):
        model_dir("gpt")


def test_missing_or_corrupt_weights(tmp_path):
    src = _shipped("llava")
    d = tmp_path / "llava"
    shutil.copytree(src, d)
    (d / "model.safetensors").write_bytes((src / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(RuntimeError, match=r"corrupt weights file .*model\.safetensors.*jsae world train-models"):
        load_toy_hf("llava", directory=d)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="corrupt weights file"):
        load_toy_hf("llava", directory=d)
    (d / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing file .*model\.safetensors.*jsae world train-models"):
        load_toy_hf("llava", directory=d)


# ---------------------------------------------------------------------------------------------- CLI

def test_cli_sample_and_bad_inputs(tmp_path):
    from typer.testing import CliRunner

    from jsae.cli import app

    r = CliRunner().invoke(app, ["world", "sample", "--out", str(tmp_path / "s"), "--n", "3", "--seed", "2"])
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "s" / "truth.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["objects"]
    assert len(list((tmp_path / "s").glob("*.png"))) == 3
    r = CliRunner().invoke(app, ["world", "sample", "--out", str(tmp_path / "t"), "--seed", "abc"])
    assert r.exit_code != 0 and "seed" in r.output.lower()
    r = CliRunner().invoke(app, ["world", "train-models", "--model", "gpt"])
    assert r.exit_code != 0 and "unknown model 'gpt'" in r.output


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shipped_toy_vlm_works_through_its_adapter(name):
    _shipped(name)
    model, proc, adapter = load_vlm(name)
    scenes = [generate_scene(20_000 + i) for i in range(3)]
    caps = [caption(s.objects) for s in scenes]
    enc = adapter.build_inputs(proc, [s.image for s in scenes], caps)
    assert adapter.n_layers >= 8 and adapter.d_in == model.config.text_config.hidden_size
    assert (adapter.image_token_mask(enc).sum(1) == 36).all()
    assert adapter.caption_token_mask(enc).sum(1).tolist() == [len(c.split()) for c in caps]
    grid = adapter.patch_grid(enc)
    rows = grid[..., 2][adapter.image_token_mask(enc)]
    assert rows.min() == 0 and rows.max() == 5
    with torch.no_grad():
        out = model(**adapter.model_kwargs(enc))
    assert out.logits.shape[:2] == enc["input_ids"].shape
