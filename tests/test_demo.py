"""`jsae demo` end to end on the shipped toy LLaVA (small budget), and the CLI's bad-input errors."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from jsae.cli import app
from jsae.protocol.config import ProtocolConfig
from jsae.protocol.run import ARTEFACTS, run_protocol

runner = CliRunner()
pytestmark = pytest.mark.slow  # the protocol end to end (~1 min in all)


SMALL = dict(n_train=400, n_label=200, n_eval=300, layers=[1, 6], steps=150, d_sae=64, n_images=6, concepts=["cat", "cake"],
             gen_batch=96, max_new_tokens=24, ratios=(0.5, 1.0, 2.0, 4.0),
             methods=("jsae", "jsae-none", "separate", "saelens-topk"))


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, run_protocol(out, ProtocolConfig(**SMALL), progress=False)


def test_demo_writes_the_four_artefacts(small_run):
    out, metrics = small_run
    for name in ARTEFACTS:
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["layers"] == [1, 6] and saved["n_layers"] >= 8
    assert {row["method"] for row in saved["saes"]} == {"jsae", "jsae-none", "separate", "saelens-topk"}
    curves, scores = saved["curves"], saved["scores"]
    keys = {c["key"] for c in curves}
    # the oracle and every method × decoder has a curve at every layer and concept; separate says why it has none
    assert keys == {"oracle", "text-oracle:text", "jsae:text", "jsae:vision", "jsae-none:text", "jsae-none:vision",
                    "saelens-topk:vision"}
    assert "jsae-none" in saved["skipped"]["separate"]
    for measure in ("steering", "suppression", "clamp"):
        for key in keys:
            for layer in (1, 6):
                got = {c["concept"] for c in curves if (c["measure"], c["key"], c["layer"]) == (measure, key, layer)}
                assert got == {"cat", "cake"}, (measure, key, layer)
    from jsae.labels import FeatureLabels

    for c, sc in zip(curves, scores):
        # the same images at every strength; per-image scores kept; the steering grid is the configured one
        assert c["n_images"] == len(sc["image_ids"]) == 6 and len(sc["effect"]) == len(c["strengths"])
        if c["measure"] == "steering":
            assert c["strengths"] == [0.5, 1.0, 2.0, 4.0]
            assert c["alphas"][1] == pytest.approx(saved["token_norms"][str(c["layer"])])  # r · per-token norm
        if c["key"] not in ("oracle", "text-oracle:text"):  # the oracles are no SAE latents
            assert len(c["features"]) == 3 and c["feature_corr"] == sorted(c["feature_corr"], reverse=True)
            assert -1 <= c["cosine_to_oracle"] <= 1
            labels = FeatureLabels.load(out / "saes" / c["method"] / f"layer_{c['layer']}" / "labels.json")
            assert labels.data["kind"] == "world" and labels.data["part"] == "label"
    # steering changes what the model says (an intervention that did nothing would score 0 everywhere)
    assert any(v > 0 for c in curves if c["measure"] == "steering" for v in c["effect"])
    # the summary has a row per (measure, positions, key, layer) and intervals around its estimates
    rows = saved["summary"]["rows"]
    assert {(r["measure"], r["key"], r["layer"]) for r in rows} == {(c["measure"], c["key"], c["layer"]) for c in curves}
    for r in rows:
        if r.get("effect_small_low") is not None:
            assert r["effect_small_low"] - 1e-9 <= r["effect_small"] <= r["effect_small_high"] + 1e-9
    assert all(v["p_value"] is None or v["p_holm"] >= v["p_value"] for v in saved["summary"]["tests"].values())
    # the run records the fingerprint of its data, and the captures were made from exactly that data
    run = json.loads((out / "run.json").read_text())
    for part in ("train", "label"):
        manifest = json.loads((out / "capture" / part / "manifest.json").read_text())
        assert manifest["fingerprint"] == run["data"][part] and manifest["complete"]
        assert manifest["prompt_template"].endswith("assistant : {caption}")  # the caption where the model expects it
    # the JSAE's paired codes agree far more than the ablation's, also once each modality's mean code is removed
    by = {(r["layer"], r["method"]): r for r in saved["saes"]}
    for layer in (1, 6):
        assert by[(layer, "jsae")]["paired_cosine"] > by[(layer, "jsae-none")]["paired_cosine"] + 0.3
        assert by[(layer, "jsae")]["centred_paired_cosine"] > by[(layer, "jsae-none")]["centred_paired_cosine"]
        assert 0 < by[(layer, "jsae")]["fvu_vision_tokens"]
    html = (out / "features.html").read_text()
    assert "data:image/png;base64," in html and "feature " in html and "<b>purity</b>" in html
    joint = [m for m in ("jsae", "jsae-none", "separate") if (out / "saes" / m / "layer_1").is_dir()]
    assert joint[:2] == ["jsae", "jsae-none"]
    assert re.findall(r"<option value='([^']+)'>", html) == [f"{m} · layer {L}" for m in joint
                                                              for L in saved["layers"]]  # one selector: SAE and layer
    for method in ("jsae", "jsae-none"):
        mid = FeatureLabels.load(out / "saes" / method / "layer_6" / "labels.json")
        part = html.split(f'data-section="{method} · layer 6">')[1].split('<div class="section"')[0]
        shown = re.findall(r"<h2>feature (\d+) · layer 6: ([a-z]+) ", part)
        assert shown and all(mid.labels[int(j)].label == lab for j, lab in shown), method
    report = (out / "report.md").read_text()
    assert "| positions | key | layer | reached | at_floor | r50 |" in report and "dose_response.png" in report
    assert "## What this shows" in report and ("the oracle reaches +0.5" in report or "even the oracle" in report)
    # SAEs are saved the SAELens way and reload as jsae classes
    from sae_lens import SAE

    sae = SAE.load_from_disk(out / "saes" / "jsae" / "layer_1")
    assert type(sae).__name__ == "JointSAE" and sae.cfg.metadata.layer == 1


def test_the_report_is_the_same_from_one_process_and_two(small_run, tmp_path, monkeypatch):
    """The report's two parts (figure, report.md and the browser's sections of the first half of the layers; the
    other half) written by one process and by two are byte for byte the files the run wrote; the data the run's
    two processes made (rows and fingerprints) is what one process makes."""
    import shutil

    from jsae import parallel
    from jsae.data.sources import WorldSource
    from jsae.protocol.config import data_source, world_prompts
    from jsae.report import write_run_report
    from jsae.report.rundir import RunDir
    from jsae.vlm import load_vlm

    out, _ = small_run
    cfg = ProtocolConfig(**SMALL)
    vlm = load_vlm(cfg.model)
    source = data_source(world_prompts(cfg, vlm.processor))
    assert isinstance(source, WorldSource)
    assert source.prepare() == json.loads((out / "run.json").read_text())["data"]  # one process: the run's fingerprints
    files = ("report.md", "features.html", "dose_response.png")
    for n in (1, 2):
        monkeypatch.setattr(parallel, "WORKERS", n)
        copy = tmp_path / f"run{n}"
        shutil.copytree(out, copy, ignore=shutil.ignore_patterns("capture", *files))
        write_run_report(RunDir(copy), vlm, source.pairs("label"))
        for name in files:
            assert (copy / name).read_bytes() == (out / name).read_bytes(), (n, name)


def test_demo_refuses_a_directory_with_another_run(small_run, monkeypatch):
    """Other settings are refused naming the setting, before the data is generated and fingerprinted."""
    out, _ = small_run
    from jsae.data.sources import WorldSource

    def no_fingerprint(self, part):
        raise AssertionError("the data was fingerprinted before the settings were compared")

    monkeypatch.setattr(WorldSource, "fingerprint", no_fingerprint)
    res = runner.invoke(app, ["demo", "--out", str(out), "--steps", "7", "--layers", "1,6", "--concepts", "cat,cake"])
    assert res.exit_code == 2, res.output
    assert "holds a run with other settings (" in res.output and "--overwrite" in res.output
    assert "steps: 150 there, 7 here" in res.output
    assert "n_train: 400 there, 2000 here" in res.output  # every differing setting is named, not just the model


def test_demo_grows_a_run_by_layers_and_concepts(small_run, tmp_path):
    """The same run with one more layer and one more concept: the capture and the SAEs are reused (files
    untouched), the curves already measured are reused as they were, and only the new layer and concept run."""
    import hashlib
    import shutil

    old_out, old = small_run
    out = tmp_path / "run"
    shutil.copytree(old_out, out)
    weights = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (out / "saes").rglob("*.safetensors")}
    shards = {p: p.stat().st_mtime_ns for p in (out / "capture").rglob("*.safetensors")}
    cfg = ProtocolConfig(n_train=400, n_label=200, n_eval=300, layers=[1, 3, 6], steps=150, d_sae=64, n_images=6,
                         concepts=["cat", "cake", "fish"], gen_batch=96, max_new_tokens=24, ratios=(0.5, 1.0, 2.0, 4.0),
                         methods=("jsae", "jsae-none", "separate", "saelens-topk"))
    grown = run_protocol(out, cfg, progress=False)
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == h for p, h in weights.items())
    assert all(p.stat().st_mtime_ns == t for p, t in shards.items())
    assert (out / "saes" / "jsae" / "layer_3" / "cfg.json").is_file() and grown["layers"] == [1, 3, 6]
    key = lambda c: (c["measure"], c["positions"], c["key"], c["layer"], c["concept"])  # noqa: E731
    before = {key(c): c for c in old["curves"]}
    after = {key(c): c for c in grown["curves"]}
    assert {k for k in after if k[3] in (1, 6) and k[4] in ("cat", "cake")} == set(before)
    assert all(after[k] == before[k] for k in before)  # reused as measured
    assert {k[4] for k in after if k[3] == 3} == {"cat", "cake", "fish"} and any(k[4] == "fish" and k[3] == 1 for k in after)
    assert {(r["layer"], r["method"]) for r in grown["saes"]} == {(L, m) for L in (1, 3, 6) for m in cfg.methods}
    assert json.loads((out / "run.json").read_text())["config"]["layers"] == [1, 3, 6]
    # more images per concept: a sweep-only setting; the SAEs stay, every curve is measured again on 7 images
    again = run_protocol(out, ProtocolConfig(**{**cfg.__dict__, "n_images": 7}), progress=False)
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == h for p, h in weights.items())
    assert {c["n_images"] for c in again["curves"]} == {7} and len(again["curves"]) == len(grown["curves"])


def test_cli_bad_inputs(tmp_path, small_run):
    out, _ = small_run
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "x"), "--concepts", "zebra"])
    assert res.exit_code == 2 and "unknown concept(s) ['zebra']" in res.output
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "y"), "--layers", "99"])
    assert res.exit_code == 2 and "99" in res.output
    sae_dir = out / "saes" / "jsae" / "layer_1"
    concept = json.loads((out / "metrics.json").read_text())["concepts"][0]
    res = runner.invoke(app, ["sae", "steer", "--sae", str(sae_dir), "--concept", concept, "--layer", "1", "--alpha", "nan"])
    assert res.exit_code == 2 and "'--alpha': must be a finite number" in res.output
    res = runner.invoke(app, ["sae", "steer", "--sae", str(sae_dir), "--concept", concept, "--layer", "4", "--alpha", "5"])
    assert res.exit_code == 2 and "trained on layer 1, not 4" in res.output
    res = runner.invoke(app, ["sae", "steer", "--sae", str(sae_dir), "--concept", "zebra", "--layer", "1", "--alpha", "5"])
    assert res.exit_code == 2 and "labelled 'zebra'; labelled concepts:" in res.output


def test_demo_on_a_vlm_directory_with_a_caption_dataset(tmp_path):
    """The real-data path: a VLM loaded from a directory by ``load_vlm`` (as a hub id would be) and a local
    COCO-captions-style dataset with only images and captions: caption words become the concepts, a
    word match is a mention, and the no-image perplexity is the fluency guard."""
    from jsae.world import world_dataset
    from jsae.world.models import model_dir

    ds = world_dataset("validation", 560, seed=3)
    ds = ds.remove_columns([c for c in ds.column_names if c not in ("image", "caption")])
    ds.save_to_disk(str(tmp_path / "data"))
    cfg = ProtocolConfig(model=str(model_dir("llava")), data=str(tmp_path / "data"), prompt="describe the image",
                         n_train=300, n_label=100, n_eval=160, layers=[2, 5], steps=150, d_sae=64, n_images=6, max_concepts=2,
                         gen_batch=80, max_new_tokens=16, methods=("jsae", "saelens-topk"), ratios=(0.5, 1.0, 2.0),
                         positions=("image",))
    metrics = run_protocol(tmp_path / "run", cfg, progress=False)
    assert metrics["judge"] == "CaptionJudge" and metrics["data"] == str(tmp_path / "data")
    for name in ARTEFACTS:
        assert (tmp_path / "run" / name).stat().st_size > 0, name
    # the concepts are the most frequent caption words, scored by word matches on held-out rows; the
    # perplexity judge rates fluency per caption (unsteered captions pass it by construction)
    assert len(metrics["concepts"]) == 2 and all(c.isalpha() for c in metrics["concepts"])
    assert {c["measure"] for c in metrics["curves"]} == {"steering", "suppression", "clamp"}
    assert all(c["n_images"] >= 1 and 0 <= c["fluency"][0] <= 1 for c in metrics["curves"])
    # too few rows for the slices asked: a one-line error that says what to lower
    bad = ProtocolConfig(model=str(model_dir("llava")), data=str(tmp_path / "data"), n_train=400, n_label=100, n_eval=200)
    with pytest.raises(ValueError, match="has 560 rows but n_train"):
        run_protocol(tmp_path / "run2", bad, progress=False)


def test_demo_on_a_real_vlm_needs_data(tmp_path):
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "r"), "--model", str(tmp_path)])
    assert res.exit_code == 2 and "pass --data" in res.output
    assert not (tmp_path / "r").exists()  # refused before anything was written


def test_default_positions_run_at_the_last_layer(tmp_path):
    """The default positions (image, generated, image+generated) at the last decoder layer: image-only steering is
    skipped with its reason, and the clamps act at the generated tokens at every step (a prefill clamp at the
    generated tokens has nothing to edit)."""
    cfg = ProtocolConfig(n_train=200, n_label=100, n_eval=120, layers=[7], steps=20, d_sae=32, n_images=2,
                         concepts=["cat"], methods=("jsae",), max_new_tokens=8, ratios=(1.0, 4.0))
    assert cfg.positions == ("image", "generated", "image+generated")
    metrics = run_protocol(tmp_path / "run", cfg, progress=False)
    clamps = [c for c in metrics["curves"] if c["measure"] == "clamp"]
    assert clamps and {c["positions"] for c in clamps} == {"generated"}
    assert {c["positions"] for c in metrics["curves"] if c["measure"] == "steering"} == {"generated", "image+generated"}
    assert "7/positions" in metrics["skipped"]


# ---- the demo's options cannot drift from ProtocolConfig --------------------------------------------------

#: demo options that are not protocol settings (where the run goes) or that carry another name on the CLI
DEMO_ONLY = {"out": "the run directory", "overwrite": "replace an existing run directory"}
RENAMED = {"text_pooling": "text_positions"}
#: ProtocolConfig fields the demo does not expose, each with why (fixed by the protocol, or derived)
CONFIG_ONLY = {"n_sweep_layers": "derived from the model's depth when --layers is unset",
               "methods": "the protocol's full method set (jsae.report.rundir.METHOD_INFO)",
               "batch_size": "the training batch of the default recipe", "lr": "the default recipe's (DEFAULT_RECIPE.lr)",
               "gen_batch": "an engine setting, not a protocol one (captions are identical at any batch)",
               "dedup_images": "the protocol always steers distinct images"}


def test_demo_options_are_protocol_config_fields_with_its_defaults():
    import dataclasses

    import typer.main

    from jsae.cli import app
    from jsae.protocol.config import ProtocolConfig

    demo = typer.main.get_command(app).commands["demo"]
    fields = {f.name: f for f in dataclasses.fields(ProtocolConfig)}
    seen = set()
    for p in demo.params:
        if p.name in DEMO_ONLY:
            continue
        name = RENAMED.get(p.name, p.name)
        assert name in fields, f"demo option --{p.name.replace('_', '-')} has no ProtocolConfig field: add one, or list it in DEMO_ONLY"
        seen.add(name)
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if p.default is None:  # filled in by the config (or at run time)
            continue
        cli = tuple(x.strip() for x in p.default.split(",")) if isinstance(default, tuple) and isinstance(p.default, str) else p.default
        assert cli == default, f"--{p.name.replace('_', '-')} defaults to {p.default!r}, ProtocolConfig.{name} to {default!r}"
    missing = set(fields) - seen - set(CONFIG_ONLY)
    assert not missing, f"ProtocolConfig fields with no demo option: {sorted(missing)} (add an option or list them in CONFIG_ONLY)"
    assert not set(CONFIG_ONLY) & seen, "a field listed in CONFIG_ONLY has a demo option now: remove it from the list"


def test_the_figure_draws_suppression_where_it_draws_steering():
    """Default positions: steering at image / generated / image+generated, suppression at image (early layers) and
    at generated (the last layer): the figure's suppression row must come from the image bands, not be empty."""
    from jsae.report import figure_bands

    band = {"strengths": [0.5, 1.0], "effect": [0.2, 0.8], "low": [0.1, 0.7], "high": [0.3, 0.9], "preservation": [1, 1]}
    m = {"config": {"positions": None},
         "summary": {"bands": {"steering": {"image": {"oracle": {"0": band}}, "generated": {"oracle": {"7": band}}},
                               "suppression": {"generated": {"oracle": {"7": band}}, "image": {"oracle": {"0": band}}}}}}
    pos, steering, sup_pos, sup = figure_bands(m)
    assert (pos, sup_pos) == ("image", "image") and steering == {"oracle": {"0": band}} and sup == {"oracle": {"0": band}}
    m["config"]["positions"] = ["image+generated"]  # suppression never measured there: its first positions
    pos, steering, sup_pos, sup = figure_bands(m)
    assert (pos, steering, sup_pos) == ("image+generated", {}, "generated")
    m["summary"]["bands"].pop("suppression")
    assert figure_bands(m)[2:] == (None, None)
