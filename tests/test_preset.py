"""`--preset reference`: the JSAE reference code's protocol as options of the ordinary protocol (preset filling,
the reference training recipe, the reference's text-quality metrics, prompts decided from the vocabulary, the
report's list of remaining differences, the CLI option)."""

from __future__ import annotations

import json
import zlib

import pytest
import torch
from typer.testing import CliRunner

from jsae.cli import app
from jsae.data.judges import compression_ratio, distinct_3, text_quality, zlib_ratio
from jsae.protocol.methods import train_methods
from jsae.protocol.config import ProtocolConfig, apply_preset
from jsae.protocol.reference import (REFERENCE_ALPHAS, REFERENCE_CAPTURE_TEMPLATE, REFERENCE_CHOICES, reference_differences,
                                     reference_prompts)
from jsae.report.markdown import Difference, difference_line

runner = CliRunner()


def test_default_preset_keeps_the_defaults():
    cfg = ProtocolConfig()
    assert (cfg.preset, cfg.recipe, cfg.d_sae, cfg.steps, cfg.epochs, cfg.max_new_tokens) == ("default", "default", 128, 2000,
                                                                                            None, 32)
    assert (cfg.text_positions, cfg.steer_at, cfg.alphas, cfg.positions) == ("caption", "image", None, ("image", "generated", "image+generated"))
    assert ProtocolConfig(steer_at="generated").positions == ("generated",)
    assert cfg.ratios == (0.25, 0.5, 0.7, 1.0, 1.4, 2.0, 4.0, 8.0) and cfg.n_images == 5 and cfg.max_concepts == 6


def test_reference_preset_fills_the_reference_choices():
    cfg = ProtocolConfig(preset="reference")
    assert cfg.recipe == "reference" and cfg.text_positions == "non_image" and cfg.steer_at == "image+generated"
    assert cfg.alphas == REFERENCE_ALPHAS and len(REFERENCE_ALPHAS) == 15
    assert REFERENCE_ALPHAS[0] == 0.2 and REFERENCE_ALPHAS[-1] == 3.0
    assert all(abs(b - a - 0.2) < 1e-9 for a, b in zip(REFERENCE_ALPHAS, REFERENCE_ALPHAS[1:]))
    assert cfg.max_new_tokens == 50 and cfg.epochs == 20 and cfg.d_sae is None  # None: 4 * d_in at training
    assert ProtocolConfig.reference() == cfg and apply_preset(cfg) == cfg  # idempotent


def test_explicit_overrides_win():
    cfg = ProtocolConfig.reference(steer_at="image", text_positions="caption", d_sae=64, max_new_tokens=10,
                                   alphas=(1.0, 2.0), epochs=3)
    assert (cfg.steer_at, cfg.text_positions, cfg.d_sae, cfg.max_new_tokens, cfg.alphas, cfg.epochs) == \
        ("image", "caption", 64, 10, (1.0, 2.0), 3)
    overridden = {d.setting: (d.reference, d.ours) for d in reference_differences(cfg, {}, 8, [1, 6])
                  if d.why == "overridden"}
    assert overridden == {"steer_at": ("image+generated", "image"), "text_positions": ("non_image", "caption"),
                          "d_sae": ("4 · d_in", 64), "max_new_tokens": (50, 10), "epochs": (20, 3)}


def test_bad_preset_and_epochs_without_reference():
    with pytest.raises(ValueError, match="unknown preset"):
        ProtocolConfig(preset="paper")
    with pytest.raises(ValueError, match="epochs"):
        ProtocolConfig(epochs=3)


def test_train_methods_reference_recipe():
    torch.manual_seed(0)
    v = torch.randn(96, 16)
    t = v + 0.1 * torch.randn(96, 16)
    out = train_methods(v, t, layer=2, d_sae=None, steps=10, batch_size=32, lr=3e-3, seed=0,
                        methods=("jsae", "jsae-none", "separate"), metadata={"model_name": "toy"}, recipe="reference",
                        reference={"epochs": 2})
    for name, alignment in (("jsae", "cosine"), ("jsae-none", "none"), ("separate", "none")):
        c = out[name].sae.cfg
        assert (c.loss_reduction, c.init, c.apply_b_dec_to_input, c.d_sae, c.alignment) == \
            ("mean", "torch-linear", False, 64, alignment)
        assert c.mse_normalization == "none" and c.l1_coefficient == 0.03 and c.metadata.layer == 2
    assert out["jsae"].sae.cfg.metadata is not out["jsae-none"].sae.cfg.metadata
    with pytest.raises(ValueError, match="recipe"):
        train_methods(v, t, layer=2, d_sae=8, steps=1, batch_size=8, lr=1e-3, seed=0, methods=("jsae",), metadata={},
                      recipe="paper")


def test_distinct_3_and_zlib_ratio():
    assert distinct_3("a b c d") == 1.0
    assert distinct_3("a b c a b c") == pytest.approx(3 / 4)  # abc, bca, cab, abc
    assert distinct_3("the cat the cat the cat") == pytest.approx(2 / 4)
    assert distinct_3("a b") is None and distinct_3("") is None
    text = "a red cake a red cake a red cake a red cake"
    assert zlib_ratio(text) == pytest.approx(len(text.encode()) / len(zlib.compress(text.encode())))
    assert zlib_ratio(text) > zlib_ratio("a red cake next to a blue car")
    assert zlib_ratio("") is None and zlib_ratio("   ") is None
    # the reference's compression ratio is the reciprocal (compressed / raw, of the text as given, not stripped)
    assert compression_ratio(text) == len(zlib.compress(text.encode())) / len(text.encode())
    assert compression_ratio(text) * zlib_ratio(text) == pytest.approx(1.0)
    assert compression_ratio(" x ") == len(zlib.compress(b" x ")) / 3 and compression_ratio("") is None
    q = text_quality(["a b c a b c", "a b c d", "x"])
    assert q["distinct_3"] == pytest.approx((0.75 + 1.0) / 2) and q["zlib_ratio"] is not None
    assert text_quality([]) == {"distinct_3": None, "zlib_ratio": None}


class _Tok:
    def __init__(self, vocab):
        self.vocab, self.unk_token_id = vocab, 0

    def __call__(self, text, add_special_tokens=True):
        class Enc:
            input_ids = [self.vocab.get(w, 0) for w in text.split()]
        return Enc()


class _Processor:
    image_token = "<image>"

    def __init__(self, vocab):
        self.tokenizer = _Tok(vocab)


class _Adapter:
    @staticmethod
    def plain_prompt(caption, n_images=1, processor=None):
        return "<img>"


def test_reference_prompts_decided_from_the_vocabulary():
    words = "USER: ASSISTANT: [INST] [/INST] Describe the image.".split()
    knows = _Processor({w: i + 1 for i, w in enumerate(words)})
    cfg, notes = reference_prompts(ProtocolConfig(preset="reference"), knows, _Adapter())
    assert cfg.prompt_template == "USER: <img>\n{caption}\nASSISTANT:" and notes["capture"]["used"]
    assert cfg.caption_template == "[INST] <img>\n{caption} [/INST]" and cfg.prompt == "Describe the image."
    lacks = _Processor({"the": 1})
    cfg, notes = reference_prompts(ProtocolConfig(preset="reference"), lacks, _Adapter())
    assert cfg.prompt_template is None and cfg.caption_template is None and cfg.prompt is None
    assert "USER:" in notes["capture"]["unknown_words"] and "[INST]" in notes["caption"]["unknown_words"]
    prompts = {d.setting: d for d in reference_differences(cfg, notes, 8, [1]) if d.setting.endswith("_prompt")}
    assert prompts["capture_prompt"].reference == REFERENCE_CAPTURE_TEMPLATE
    assert prompts["capture_prompt"].ours == {"prompt": "the model's own", "unknown_words": notes["capture"]["unknown_words"]}
    assert prompts["caption_prompt"].reference == "[INST] <image>\nDescribe the image. [/INST]"
    # the default preset never touches the prompts
    cfg, notes = reference_prompts(ProtocolConfig(), knows, _Adapter())
    assert cfg.prompt_template is None and notes == {}


def test_reference_differences_are_records_of_values():
    """Each difference is a record (setting, the reference's value, ours, why) taken from the configuration; the report
    words it from those values."""
    cfg = ProtocolConfig.reference(n_train=300, top_k=2, alphas=(0.5, 1.5), steer_at="image", expansion_factor=8,
                                   methods=("jsae", "saelens-topk"), steps=40, batch_size=16)
    notes = {"capture": {"reference": REFERENCE_CAPTURE_TEMPLATE, "used": False, "given": "X: {caption}"},
             "caption": {"reference": "R", "used": True}}
    got = {d.setting: d for d in reference_differences(cfg, notes, 12, [2, 5])}
    assert list(got) == ["model", "data", "n_train", "concepts", "latents", "strength", "metrics", "reference_faults",
                         "capture_prompt", "layers", "training", "saelens-topk", "steer_at", "expansion_factor"]
    assert (got["model"].ours, got["data"].ours, got["data"].reference) == ("llava", "world", "jxie/coco_captions")
    assert (got["n_train"].reference, got["n_train"].ours) == (50_000, 300)
    assert got["latents"].ours == {"top_k": 2, "in_sample": False}
    assert got["strength"].reference["alphas"] == list(REFERENCE_ALPHAS)
    assert got["strength"].ours == {"alphas": [0.5, 1.5], "best_alpha_per_image": False}
    assert (got["reference_faults"].reference, got["reference_faults"].ours) == (True, False)
    assert got["capture_prompt"] == Difference("capture_prompt", REFERENCE_CAPTURE_TEMPLATE, "X: {caption}", "given explicitly")
    assert got["layers"].ours == {"layers": [2, 5], "of": 12} and got["layers"].reference == {"layers": [7, 13, 25, 30], "of": 32}
    assert got["saelens-topk"].reference is None and got["saelens-topk"].ours == {"steps": 40, "batch_size": 16, "lr": cfg.lr}
    assert got["steer_at"] == Difference("steer_at", REFERENCE_CHOICES["steer_at"], "image", "overridden")
    assert got["expansion_factor"] == Difference("expansion_factor", 4, 8, "overridden")
    # the words come from the values (the report renders the records it reads back from metrics.json)
    assert difference_line(got["n_train"]) == "Training pairs: 300 (the reference: 50,000)."
    assert difference_line(got["steer_at"]) == "Overridden: steer_at = 'image' (the reference: 'image+generated')."
    assert difference_line(got["expansion_factor"]) == "Overridden: d_sae = 8 · d_in (the reference: 4 · d_in)."
    assert "the grid [0.5, 1.5]" in difference_line(got["strength"])
    assert difference_line(got["layers"]) == "Layers: [2, 5] of 12 (the reference: 7, 13, 25, 30 of LLaVA-v1.6-Mistral-7B's 32)."
    assert difference_line("an older run's sentence") == "an older run's sentence"
    faults = {d.setting: d for d in reference_differences(ProtocolConfig.reference(reference_faults=True, data="coco", model="/x/vlm",
                                                                                  concepts=["cat"]), {}, 32, [7])}
    assert faults["latents"].ours["in_sample"] and faults["strength"].ours["best_alpha_per_image"]
    assert faults["data"].ours == {"dataset": "coco", "split": "train", "dedup_images": True, "parts": [2000, 400, 1200]}
    assert faults["concepts"].ours == {"words": "caption", "given": True}
    assert "the reference grid 0.2..3.0" in difference_line(faults["strength"]) and "model" not in faults


def test_cli_lists_the_preset_and_refuses_a_bad_one(tmp_path):
    r = runner.invoke(app, ["demo", "--preset", "reference", "--help"])
    assert r.exit_code == 0 and "--preset" in r.output
    r = runner.invoke(app, ["demo", "--preset", "paper", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown preset" in lines[0]
    for group in (["run", "capture"], ["sae", "train"], ["sae", "steer"]):
        assert "--preset" in runner.invoke(app, [*group, "--help"]).output


@pytest.mark.slow
def test_reference_preset_end_to_end(tmp_path):
    from jsae.protocol.run import run_protocol

    out = tmp_path / "run"
    cfg = ProtocolConfig(preset="reference", n_train=200, n_label=100, n_eval=120, layers=[1, 6], epochs=3, steps=40,
                         methods=("jsae", "saelens-topk"), n_images=4, concepts=["cat"], gen_batch=64,
                         max_new_tokens=12, alphas=(0.5, 1.5, 3.0))
    metrics = run_protocol(out, cfg, progress=False)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["config"]["preset"] == "reference" and saved["config"]["text_positions"] == "non_image"
    from sae_lens import SAE

    sae = SAE.load_from_disk(out / "saes" / "jsae" / "layer_1")
    assert sae.cfg.d_sae == 4 * sae.cfg.d_in
    # the toy tokenizer knows the reference's capture words (USER / ASSISTANT) but not its Mistral
    # instruction ([INST], "."): the capture template is the reference's, the captioning prompt the model's own
    assert metrics["reference"]["prompts"]["capture"]["used"] and not metrics["reference"]["prompts"]["caption"]["used"]
    assert saved["config"]["prompt_template"].startswith("USER: <image>")
    report = (out / "report.md").read_text()
    assert "## Differences from the reference" in report
    for phrase in ("embedded toy world", "7 hand-listed", "held-out labelling pairs", "dose-response", "SBERT", "GPT-2", "Reference faults not reproduced",
                   "model's own prompt kept", "drops a last partial batch", "fused Adam", "best epoch"):
        assert phrase in report, phrase
    steering = [c for c in saved["curves"] if c["measure"] == "steering"]
    assert steering and all(c["strengths"] == [0.5, 1.5, 3.0] and c["positions"] == "image+generated" for c in steering)
