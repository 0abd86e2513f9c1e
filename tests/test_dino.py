"""The DINOv2-style toy tower (jsae.world.dino): a real ``Dinov2Model`` trained without labels, deterministic, saved
as a transformers directory that composes into a real ``LlavaForConditionalGeneration``; the patch probe that gauges
towers; the CLI's bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from jsae.world.dino import DinoConfig, _views, dino_dir, image_processor, patch_probe, train_dino_tower

TINY = DinoConfig(steps=3, batch_size=4, prototypes=16, teacher_momentum=0.5)  # a teacher that moves in 3 steps


def _load(d):
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(d), local_files_only=True, dtype=torch.float32).eval()


def test_training_is_deterministic_and_saves_a_real_dinov2(tmp_path):
    from transformers import Dinov2Model

    a = train_dino_tower(tmp_path / "a", TINY, log=lambda *_: None, progress=False, probe=(20, 10))
    b = train_dino_tower(tmp_path / "b", TINY, log=lambda *_: None, progress=False, probe=(20, 10))
    ma, mb = _load(a), _load(b)
    assert isinstance(ma, Dinov2Model)
    for (k, va), (_, vb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(va, vb), k
    # training moved the weights away from the seeded initialisation (the teacher follows the student by EMA)
    torch.manual_seed(TINY.seed)
    from jsae.world.dino import tower_config

    init = Dinov2Model(tower_config()).half().float()
    moved = max((ma.state_dict()[k] - v).abs().max().item() for k, v in init.state_dict().items())
    assert moved > 1e-3
    rec = json.loads((a / "training.json").read_text())
    assert rec["part"] == "dino" and rec["config"]["steps"] == 3
    assert [h["step"] for h in rec["history"]] == [0, 2]
    assert all(np.isfinite(h["loss"]) and h["teacher_entropy"] > 0 for h in rec["history"])
    assert 0 <= rec["patch_probe"]["type"]["accuracy"] <= 1
    assert (a / "preprocessor_config.json").exists()


def test_views_colour_augmentation():
    """A constant image: a crop of it is itself, so what a view changes is the colour augmentation alone."""
    from jsae.world.dino import IMAGENET_MEAN, IMAGENET_STD

    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = torch.empty(4, 3, 48, 48)
    rgb[:, 0], rgb[:, 1], rgb[:, 2] = 0.6, 0.4, 0.4  # a pale red (hue rotations stay inside [0, 1], no clamping)
    x = (rgb - mean) / std
    g = torch.Generator().manual_seed(0)
    plain = DinoConfig(jitter_p=0.0, greyscale_p=0.0)
    torch.testing.assert_close(_views(x, plain, g), x, atol=1e-5, rtol=0)
    # greyscale always: every channel equal, at the colour's luminance
    grey = _views(x, DinoConfig(jitter_p=0.0, greyscale_p=1.0), g) * std + mean
    torch.testing.assert_close(grey, torch.full_like(grey, 0.299 * 0.6 + 0.701 * 0.4), atol=1e-5, rtol=0)
    # hue jitter only: the colour changes, its luminance (YIQ's Y) does not
    hue = _views(x, DinoConfig(colour_jitter=(0.0, 0.0, 0.0, 0.1), jitter_p=1.0, greyscale_p=0.0), g) * std + mean
    lum = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    assert not torch.allclose(hue, rgb, atol=1e-3)
    torch.testing.assert_close((hue * lum).sum(1), (rgb * lum).sum(1), atol=2e-3, rtol=0)
    # default: two draws differ; a local view has the asked size
    a, b = _views(x, DinoConfig(), g), _views(x, DinoConfig(), g)
    assert not torch.equal(a, b)
    assert _views(x, DinoConfig(), g, (0.1, 0.35), 24).shape == (4, 3, 24, 24)


def test_patch_probe_reads_the_supervised_tower():
    """The toy LLaVA's pre-VLM tower was trained on these labels: its patches carry type and colour well above chance;
    a randomly initialised Dinov2 of the same size carries colour (pixels) but much less type."""
    from transformers import Dinov2Model
    from transformers.models.auto.image_processing_auto import AutoImageProcessor

    from jsae.world.dino import tower_config
    from jsae.world.training import part_dir

    d = part_dir("vision")
    sup = patch_probe(_load(d), AutoImageProcessor.from_pretrained(str(d)), n_fit=150, n_test=60)
    assert sup["type"]["accuracy"] > 0.7 > sup["type"]["majority_chance"]
    assert sup["colour"]["accuracy"] > 0.9
    torch.manual_seed(0)
    rnd = patch_probe(Dinov2Model(tower_config()).eval(), image_processor(), n_fit=150, n_test=60)
    assert rnd["type"]["accuracy"] < sup["type"]["accuracy"] - 0.2


def test_shipped_dino_tower_composes_and_its_gauge_is_true():
    from transformers import Dinov2Model

    from jsae.vista import compose_toy

    d = dino_dir()
    rec = json.loads((d / "training.json").read_text())
    assert rec["config"] == json.loads(json.dumps(DinoConfig().__dict__))  # shipped with the defaults
    # self-distillation did not collapse: the teacher's mean distribution stays spread over the prototypes
    assert rec["history"][-1]["teacher_entropy"] > 1.0
    # the recorded patch probe is what the shipped (fp16) weights give
    again = patch_probe(_load(d), image_processor(), n_fit=rec["patch_probe"]["n_fit_scenes"],
                        n_test=rec["patch_probe"]["n_test_scenes"])
    for k in ("type", "colour"):
        assert abs(again[k]["accuracy"] - rec["patch_probe"][k]["accuracy"]) < 0.02
    model, processor, adapter = compose_toy("text-only", tower="dino")
    assert isinstance(adapter.hf_model.model.vision_tower, Dinov2Model)
    assert adapter.hf_model.config.name_or_path == "toy-dino-text-lm"
    from jsae.world import iter_world

    scene, _ = next(iter(iter_world("validation", 1, 0)))
    enc = processor(images=[scene.image], text=["<image> a"], return_tensors="pt")
    with torch.no_grad():
        out = adapter.hf_model(**enc)
    assert torch.isfinite(out.logits).all()
    with pytest.raises(ValueError, match="tower must be"):
        compose_toy("text-only", tower="siglip")


def test_cli_toy_parts_refuses_unknown_stages(tmp_path):
    from jsae.cli import app

    r = CliRunner().invoke(app, ["vista", "toy-parts", "--out", str(tmp_path), "--stages", "lm,clip"])
    assert r.exit_code == 2 and "lm, vision and / or dino" in r.output
    assert not any(tmp_path.iterdir())


def test_bad_inputs_are_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="probe must be"):
        train_dino_tower(tmp_path, TINY, probe=(0, 10), progress=False)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="n_fit >= 1"):
        patch_probe(None, None, n_fit=0)
    with pytest.raises(ValueError, match="mask_ratio"):
        DinoConfig(mask_ratio=(0.5, 0.2))
