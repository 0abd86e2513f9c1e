"""Small cuts a newcomer meets in the first hour: a batch larger than the capture is clamped with a note, weight
files follow the umask, a capture of a shipped toy model records the toy's name (so the feature browser finds it),
`jsae sae steer --kinds/--decoder` are checked, and the feature browser names its SAE and switches between several."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import jsae
from jsae.cli import app
from jsae.world import world_dataset
from jsae.world.models import model_dir, toy_name

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cap") / "capture"
    model, processor, _ = jsae.load_vlm("llava")
    pairs = [(ex["image"], ex["caption"]) for ex in world_dataset("train", 24, seed=3)]
    jsae.capture_pairs(model, pairs, layers=[2], out_dir=out, processor=processor, progress=False)
    return out


def test_capture_records_the_toy_name_and_files_follow_the_umask(capture: Path, tmp_path: Path) -> None:
    import json

    assert json.loads((capture / "manifest.json").read_text())["model"] == "llava"  # not the installed weights' path
    assert toy_name(model_dir("qwen3-vl-moe")) == "qwen3-vl-moe" and toy_name("llava-hf/llava-1.5-7b-hf") is None
    mask = os.umask(0o022)
    os.umask(mask)
    want = 0o666 & ~mask
    shard = next(capture.glob("shard-*.safetensors"))
    sae = jsae.JointSAE(jsae.JointSAEConfig(d_in=8, d_sae=16))
    weights, cfg = sae.save_model(tmp_path / "sae")
    for f in (shard, weights, cfg):
        assert stat.S_IMODE(f.stat().st_mode) == want, (f, oct(f.stat().st_mode))


def test_a_batch_larger_than_the_capture_is_clamped_with_a_note(capture: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = jsae.load_pairs(capture, 2, batch_size=4096)
    assert data.batch_size == 24 and len(data) == 1
    assert any("larger than the 24 captured pairs" in str(w.message) for w in caught)
    assert jsae.load_pairs(capture, 2, batch_size=8).batch_size == 8


def test_steer_checks_kinds_and_decoder() -> None:
    runner = CliRunner()
    base = ["sae", "steer", "--sae", "jsae-shapes-llava-l4", "--concept", "cat", "--layer", "4", "--alpha", "5"]
    r = runner.invoke(app, [*base, "--kinds", "shared,bogus"])
    assert r.exit_code == 2 and "--kinds 'shared,bogus': give one or more of shared, vision-only, text-only" in r.output
    r = runner.invoke(app, [*base, "--decoder", "both"])
    assert r.exit_code == 2 and "--decoder 'both': choose vision or text" in r.output


def test_the_browser_switches_between_saes(tmp_path: Path) -> None:
    from jsae.report.browser import feature_browser

    img = Image.new("RGB", (48, 48), (200, 30, 30))
    card = {"feature": 7, "label": "cat", "kind": "shared", "purity": 0.8, "layer": 2,
            "top_images": [(img, np.eye(6))], "top_captions": ["a red cat"]}
    html = feature_browser({"jsae · layer 2": [card], "jsae-none · layer 2": [{**card, "feature": 9}]},
                           tmp_path / "f.html", title="t").read_text()
    assert html.count("<option value=") == 2 and "id='sae'" in html and html.count('class="section"') == 2
    assert "<b>purity</b>" in html and "<b>kind</b>" in html  # defined where shown
    single = feature_browser([card], tmp_path / "g.html").read_text()
    assert "id='sae'" not in single and single.count('class="feature"') == 1
