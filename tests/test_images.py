"""Images of every PIL mode a dataset may hold reach the model as the 8-bit RGB picture they show (issue 32):
16-bit and 32-bit grayscale rescaled (not clipped to white), float pictures read as 0..1, palette and CMYK
converted, transparency composited onto white; each checked against a conversion done by hand with numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import jsae
from jsae.data.images import to_rgb
from jsae.testing import tiny_vlm

rng = np.random.default_rng(0)
H, W = 16, 16


def _rgb(a: np.ndarray) -> np.ndarray:
    return np.repeat(a[..., None], 3, axis=-1).astype(np.uint8)


def _img(mode: str, a: np.ndarray) -> Image.Image:
    """An image of ``mode`` holding the samples of ``a`` (Image.frombytes: fromarray infers modes itself)."""
    return Image.frombytes(mode, (a.shape[1], a.shape[0]), np.ascontiguousarray(a).tobytes())


def _cases() -> dict[str, tuple[Image.Image, np.ndarray]]:
    """mode -> (the image, its RGB pixels computed by hand)."""
    out = {}
    g16 = rng.integers(0, 65536, (H, W)).astype(np.uint16)
    out["I;16"] = _img("I;16", g16.astype("<u2")), _rgb(np.floor(g16 / 257 + 0.5))
    g16b = Image.frombytes("I;16B", (W, H), g16.astype(">u2").tobytes())
    out["I;16B"] = g16b, _rgb(np.floor(g16 / 257 + 0.5))
    g32 = rng.integers(0, 65536, (H, W)).astype(np.int32)
    out["I"] = _img("I", g32), _rgb(np.floor(g32 / 257 + 0.5))
    f = rng.random((H, W)).astype(np.float32)
    out["F"] = _img("F", f), _rgb(np.floor(f.astype(np.float64) * 255 + 0.5))
    palette = rng.integers(0, 256, (256, 3)).astype(np.uint8)
    idx = rng.integers(0, 256, (H, W)).astype(np.uint8)
    p = _img("P", idx)
    p.putpalette(palette.flatten().tolist())
    out["P"] = p, palette[idx]
    cmyk = rng.integers(0, 256, (H, W, 4)).astype(np.uint8)
    c, m, y, k = (cmyk[..., i].astype(np.float64) / 255 for i in range(4))
    hand = np.stack([255 * (1 - c) * (1 - k), 255 * (1 - m) * (1 - k), 255 * (1 - y) * (1 - k)], -1)
    out["CMYK"] = _img("CMYK", cmyk), np.floor(hand + 0.5)
    la = rng.integers(0, 256, (H, W, 2)).astype(np.uint8)
    a = la[..., 1].astype(np.float64) / 255
    out["LA"] = _img("LA", la), _rgb(np.floor(la[..., 0] * a + 255 * (1 - a) + 0.5))
    rgba = rng.integers(0, 256, (H, W, 4)).astype(np.uint8)
    a = rgba[..., 3:].astype(np.float64) / 255
    out["RGBA"] = _img("RGBA", rgba), np.floor(rgba[..., :3] * a + 255 * (1 - a) + 0.5)
    g8 = rng.integers(0, 256, (H, W)).astype(np.uint8)
    out["L"] = _img("L", g8), _rgb(g8)
    bits = rng.integers(0, 2, (H, W)).astype(bool)
    out["1"] = Image.fromarray(bits), _rgb(bits * 255)
    return out


CASES = _cases()


@pytest.mark.parametrize("mode", list(CASES))
def test_every_mode_matches_a_hand_conversion(mode):
    image, hand = CASES[mode]
    assert image.mode == mode
    got = to_rgb(image)
    assert got.mode == "RGB" and got.size == (W, H)
    diff = np.abs(np.asarray(got).astype(int) - hand.astype(int))
    assert diff.max() <= 1, (mode, diff.max())  # PIL's integer compositing rounds within one level


def test_a_16_bit_png_read_from_disk_is_rescaled_not_clipped(tmp_path):
    """Issue case 3: a 16-bit grayscale PNG was clipped, not rescaled, and captured as a pure white image."""
    g16 = (np.arange(H * W).reshape(H, W) * 200).astype(np.uint16)
    _img("I;16", g16.astype("<u2")).save(tmp_path / "g.png")
    read = Image.open(tmp_path / "g.png")
    assert read.mode.startswith("I")
    assert (np.asarray(read.convert("RGB")) == 255).mean() > 0.9  # what plain PIL does: clip, nearly all white
    got = np.asarray(to_rgb(read))
    assert np.array_equal(got, _rgb(np.floor(g16 / 257 + 0.5))) and got.min() == 0 and got.max() > 150


def test_out_of_range_and_broken_images_are_one_line_errors_naming_the_image(tmp_path):
    with pytest.raises(ValueError, match=r"float image with values in \[0, 2\].*rescale it to 0..1"):
        to_rgb(_img("F", np.array([[0.0, 2.0]], dtype=np.float32)), "image 3")
    with pytest.raises(ValueError, match=r"image 1 is a I image with values in \[-5, 7\]"):
        to_rgb(_img("I", np.array([[-5, 7]], dtype=np.int32)), "image 1")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "x.png")
    (tmp_path / "x.png").write_bytes((tmp_path / "x.png").read_bytes()[:60])
    with pytest.raises(ValueError) as exc:
        to_rgb(Image.open(tmp_path / "x.png"), "image 0")
    assert str(tmp_path / "x.png") in str(exc.value) and "cannot be decoded" in str(exc.value)


def test_a_capture_of_a_16_bit_image_equals_the_capture_of_its_hand_converted_picture(tmp_path):
    v = tiny_vlm("llava")
    size = v.images(1)[0].size
    g16 = rng.integers(0, 65536, (size[1], size[0])).astype(np.uint16)
    wide, hand = _img("I;16", g16.astype("<u2")), Image.fromarray(_rgb(np.floor(g16 / 257 + 0.5)))
    kw = dict(layers=[1], processor=v.processor, progress=False, fingerprint="x")
    jsae.capture_pairs(v.model, [(wide, "a red square")], out_dir=tmp_path / "a", **kw)
    jsae.capture_pairs(v.model, [(hand, "a red square")], out_dir=tmp_path / "b", **kw)
    white = Image.new("RGB", size, (255, 255, 255))
    jsae.capture_pairs(v.model, [(white, "a red square")], out_dir=tmp_path / "w", **kw)
    a, _, _ = jsae.capture.read_layer(tmp_path / "a", 1)
    b, _, _ = jsae.capture.read_layer(tmp_path / "b", 1)
    w, _, _ = jsae.capture.read_layer(tmp_path / "w", 1)
    assert torch.equal(a, b) and not torch.allclose(a, w)


def test_steer_on_a_folder_names_a_broken_image(tmp_path):
    from jsae.cli import app

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    sae = Path(jsae.__file__).parent / "pretrained" / "jsae-shapes-llava-l4" / "model.language_model.layers.4"
    labels = json.loads((sae / "labels.json").read_text())
    concept = next(lab["label"] for lab in labels["labels"] if lab["label"])
    r = CliRunner().invoke(app, ["sae", "steer", "--sae", str(sae), "--concept", concept, "--layer", "4", "--alpha", "1",
                                 "--images", str(folder)])
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and str(folder / "broken.png") in lines[0], r.output


def test_a_16_bit_png_in_a_caption_dataset_is_captured_rescaled(tmp_path):
    from jsae.data.sources import CaptionSource

    g16 = (np.arange(H * W).reshape(H, W) * 200).astype(np.uint16)
    _img("I;16", g16.astype("<u2")).save(tmp_path / "g.png")
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "g.png", "caption": "a gray square"}) + "\n")
    image, _ = CaptionSource.whole(str(tmp_path)).pairs("train")[0]
    assert np.array_equal(np.asarray(to_rgb(image)), _rgb(np.floor(g16 / 257 + 0.5)))
