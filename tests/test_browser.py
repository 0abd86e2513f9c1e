"""The feature browser rendered in headless Chromium: screenshot and DOM show the cards, images and captions."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import jsae  # noqa: F401
import numpy as np
import pytest
import torch
from PIL import Image

from jsae.report.browser import feature_page
from jsae.labels import FeatureLabels
from jsae.releases.build import read_releases_yaml
from jsae.releases.registry import PACKAGE_ROOT, RELEASES

torch.set_num_threads(1)

RELEASE = "jsae-shapes-llava-l4"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_release = pytest.mark.skipif(read_releases_yaml().get(RELEASE, {}).get("conversion_func") != "jsae_local",
                                   reason=f"{RELEASE} is not built: run `jsae release build-shipped`")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1200,900"]


def _chromium(page: Path, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],  # type: ignore[list-item]
                              capture_output=True, text=True, timeout=90)


@pytest.fixture(scope="module")
def run_page(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FeatureLabels]:
    """The shipped release laid out as a demo run (RUN/saes/jsae/layer_4 + RUN/metrics.json with a steering
    cell), and its features.html."""
    src = PACKAGE_ROOT / RELEASES[RELEASE].repo_id / next(iter(RELEASES[RELEASE].saes_map.values()))
    run = tmp_path_factory.mktemp("run")
    sae_dir = run / "saes" / "jsae" / "layer_4"
    shutil.copytree(src, sae_dir)
    labels = FeatureLabels.load(sae_dir / "labels.json")
    lab = max((lab for lab in labels.labels if lab.label), key=lambda lab: lab.vision_corr + lab.text_corr)
    curve = {"measure": "steering", "key": "jsae:text", "positions": "image", "layer": 4, "concept": lab.label,
             "r50": 1.25, "effect_small": 0.31, "features": [lab.feature]}
    other = next(c for c in labels.concepts if c != lab.label)  # the same feature among another concept's top latents
    foreign = {**curve, "concept": other, "r50": None, "effect_small": 0.0}
    (run / "metrics.json").write_text(json.dumps({"summary": {"curves": [curve, foreign]}}))
    return feature_page(sae_dir, n_pairs=120, n_features=64), labels


@needs_release
def test_page_is_self_contained_with_labels_images_captions_and_steering(run_page: tuple[Path, FeatureLabels]) -> None:
    page, labels = run_page
    html = page.read_text()
    assert page.name == "features.html" and page.parent.name == "layer_4"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), "the page must not load anything from the network"
    assert "<script src" not in html and "<link" not in html
    assert html.count('class="feature"') == min(64, sum(1 for lab in labels.labels if lab.label))
    for kind in ("shared", "vision-only", "text-only"):
        if any(lab.kind == kind for lab in labels.labels if lab.label):
            assert f'class="kind {kind}"' in html
    steered = next(lab for lab in labels.labels if lab.label and lab.feature == _steered(page))
    assert "purity" in html and (f"steering: &#x27;{steered.label}&#x27; via jsae:text at image: r50 1.25 (× the mean "
                                 "image-token norm), effect at r = 1 +0.31") in html
    assert html.count('class="steer"') == 1  # only the steered feature has a steering result
    assert html.count("&#x27;; &#x27;") == 0 and "not reached" not in html.split('class="steer"')[1].split("</div>")[0]
    # every card says how many of its top examples name its label, next to the purity
    assert html.count('class="tally"') == html.count('class="feature"') and "top captions name" in html


@pytest.mark.slow
@needs_release
@needs_chromium
def test_page_renders_in_headless_chromium(run_page: tuple[Path, FeatureLabels], tmp_path: Path) -> None:
    page, labels = run_page
    shot = tmp_path / "shot.png"
    r = _chromium(page, f"--screenshot={shot}")
    assert shot.is_file(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("RGB")).astype(float)
    assert img.shape[:2] == (900, 1200)
    assert img.std() > 20, "the screenshot is blank"
    # the images of the top card: saturated (non-grey) colour blocks below the header
    sat = img.max(-1) - img.min(-1)
    assert (sat[150:] > 80).mean() > 0.005, "no picture pixels in the screenshot"
    # the heat map's black-and-white frames (pure black: the page's text is #222)
    assert (img[150:].max(-1) < 10).sum() > 200, "no heat-map frames in the screenshot"
    dark = img.mean(-1) < 100
    assert dark[:120].mean() > 0.005, "no title text in the screenshot"

    dom = _chromium(page, "--dump-dom").stdout
    cards = re.findall(r'<div class="feature" data-search="([^"]*)"', dom)
    assert len(cards) == html_count(page)
    assert len(re.findall(r'<img alt="top image" src="data:image/png;base64,', dom)) >= 3 * len(cards)
    first_label = next(lab for lab in sorted((lab for lab in labels.labels if lab.label),
                                              key=lambda lab: -(lab.vision_corr + lab.text_corr)))
    assert f"feature {first_label.feature} · layer 4: {first_label.label}" in dom
    captions = re.findall(r"<li>[✓✗] ([^<]+)</li>", dom)
    assert len(captions) >= 3 * len(cards) and all(len(c.split()) >= 4 for c in captions)
    assert 'id="q"' in dom and f'<span id="count">{len(cards)}</span>' in dom


def test_heat_map_stays_visible_on_a_red_scene_and_r50_beyond_the_grid_reads_not_reached() -> None:
    from jsae.report.browser import heatmap_overlay, steering_line

    red = Image.new("RGB", (48, 48), (220, 30, 30))
    grid = np.zeros((6, 6))
    grid[2, 3] = 1.0
    out = np.asarray(heatmap_overlay(red, grid)).astype(int)
    cell = out[2 * 24:3 * 24, 3 * 24:4 * 24]
    assert (cell == 255).all(-1).any() and (cell == 0).all(-1).any()  # a black-and-white frame, not another red
    assert out[:24, :24, 0].mean() < 0.5 * 220  # where the feature is silent the scene is dimmed
    assert np.abs(cell[10, 10] - [220, 30, 30]).max() < 5  # where it fires the scene shows as it is
    line = steering_line({"concept": "cat", "key": "jsae:text", "positions": "image", "r50": float("inf"),
                          "effect_small": 0.1})
    assert "r50 not reached" in line and "inf" not in line


def _steered(page: Path) -> int:
    return json.loads((page.parent.parent.parent.parent / "metrics.json").read_text())["summary"]["curves"][0]["features"][0]


def html_count(page: Path) -> int:
    return page.read_text().count('class="feature"')


def test_page_for_a_run_without_labels_is_refused(tmp_path: Path) -> None:
    cfg = jsae.JointSAEConfig(d_in=128, d_sae=16)
    cfg.metadata["model_name"], cfg.metadata["layer"] = "llava", 4
    jsae.JointSAE(cfg).save_model(tmp_path / "sae")
    with pytest.raises(FileNotFoundError, match=r"has no labels.json.*jsae sae label --sae"):
        feature_page(tmp_path / "sae")
    with pytest.raises(ValueError, match="unknown release 'jsae-shapes-lava-l4'; did you mean"):
        feature_page("jsae-shapes-lava-l4")


@needs_release
def test_features_command_for_a_shipped_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import typer
    from typer.testing import CliRunner

    from jsae.cli.look import features as features_cmd

    app = typer.Typer()
    app.command("features")(features_cmd)
    app.command("other")(lambda: None)
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["features", RELEASE, "--n-features", "3", "--n-pairs", "40"])
    assert r.exit_code == 0, r.output
    page = tmp_path / f"{RELEASE}-features.html"
    assert r.output.strip().endswith(f"{RELEASE}-features.html") and page.read_text().count('class="feature"') == 3
