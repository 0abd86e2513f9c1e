"""Neuronpedia-style export (SAEDashboard layout + image extension) and the SAEBench custom-SAE wrapper
with SAELens's core metrics on the toy VLM's language model."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import jsae  # noqa: F401
import pytest
import torch
from PIL import Image

from jsae.report.neuronpedia import EXPORT_FILES, export_neuronpedia, read_export
from jsae.releases.build import read_releases_yaml
from jsae.releases.saebench import JSAEBranchSAE, core_metrics
from jsae.saes.joint_sae import JointSAE, JointSAEConfig

torch.set_num_threads(1)

RELEASE = "jsae-shapes-llava-l4"
needs_release = pytest.mark.skipif(read_releases_yaml().get(RELEASE, {}).get("conversion_func") != "jsae_local",
                                   reason=f"{RELEASE} is not built: run `jsae release build-shipped`")


SCHEMA = json.loads((Path(__file__).parent / "data" / "neuronpedia_export.schema.json").read_text())


def _validate(records: list[dict], kind: str) -> None:
    """Every record against the schema written from Neuronpedia's export dataclasses (see the schema's description)."""
    from jsonschema import Draft202012Validator, FormatChecker

    validator = Draft202012Validator({**SCHEMA, "$ref": SCHEMA["files"][kind]}, format_checker=FormatChecker())
    assert records, kind
    for rec in records:
        errors = sorted(validator.iter_errors(rec), key=str)
        assert not errors, f"{kind}: {errors[0].message}"


def test_schema_rejects_what_neuronpedia_would_not_import() -> None:
    from jsonschema import Draft202012Validator

    feature = {"modelId": "m", "layer": "4-jsae", "index": "7", "hookName": "blocks.4.hook_resid_post"}
    check = lambda rec, kind: list(Draft202012Validator({**SCHEMA, "$ref": SCHEMA["files"][kind]}).iter_errors(rec))  # noqa: E731
    assert not check(feature, "features")
    assert check({**feature, "jsaeLabel": "cat"}, "features")  # a jsae field among Neuronpedia's
    assert check({**feature, "hookName": "model.language_model.layers.4"}, "features")  # an HF module path
    assert check({k: v for k, v in feature.items() if k != "index"}, "features")
    assert check({"name": "r", "description": "d", "creatorName": "c"}, "release.jsonl")  # no creatorId


@needs_release
def test_neuronpedia_export_follows_the_schema(tmp_path: Path) -> None:
    from jsae.labels import load_labels

    sae = JointSAE.from_pretrained(RELEASE)
    labels = load_labels(RELEASE)
    src = export_neuronpedia(RELEASE, tmp_path, n_pairs=80, n_examples=3)
    assert src == tmp_path / "jsae-toy-llava" / "4-jsae"
    for f in EXPORT_FILES:
        assert (src / f).is_file()
    rec = read_export(src)
    for kind in ("release", "model", "sourceset", "source", "features", "activations"):
        _validate(rec[kind], kind + ".jsonl" if kind in ("release", "model", "sourceset", "source") else kind)
    source, model = rec["source"][0], rec["model"][0]
    assert source["id"] == "4-jsae" and source["saelensRelease"] == RELEASE
    assert source["saelensSaeId"] == source["hfFolderId"] == "model.language_model.layers.4"
    assert source["num_tokens_in_prompt"] > 3 and source["num_prompts"] == 80
    assert (model["id"], model["dimension"], model["layers"], model["tlensId"]) == ("jsae-toy-llava", 128, 8, "llava")
    assert model["neuronsPerLayer"] == 384  # the toy LM's MLP width
    assert rec["release"][0]["name"] == RELEASE and rec["release"][0]["visibility"] == "PUBLIC"
    # every live feature (one firing on a caption token or an image of the 80 pairs), not only the labelled ones
    from jsae.report.browser import token_codes
    from jsae.vlm import load_vlm
    from jsae.world import world_dataset

    codes = token_codes(load_vlm("llava"), sae, [(r["image"], r["caption"]) for r in world_dataset("validation", 80, 0)], 4)
    live = ((codes.zt_tok[codes.caption_mask] > 0).any(0) | (codes.zv > 0).any(0)).nonzero().flatten().tolist()
    assert sorted(int(f["index"]) for f in rec["features"]) == sorted(live)
    assert len(live) > sum(1 for lab in labels.labels if lab.label)
    unembed = load_vlm("llava").hf_model.get_output_embeddings().weight
    for f in rec["features"]:
        j = int(f["index"])
        assert f["hookName"] == "blocks.4.hook_resid_post" and f["layer"] == "4-jsae"
        assert torch.allclose(torch.tensor(f["vector"]), sae.W_dec_of("text")[j].detach())
        logits = unembed.detach() @ sae.W_dec_of("text")[j].detach()
        assert f["pos_values"] == pytest.approx(logits.topk(10).values.tolist(), rel=1e-5)
        assert f["neg_values"] == pytest.approx((-(-logits).topk(10).values).tolist(), rel=1e-5)
        assert len(f["pos_str"]) == len(f["neg_str"]) == 10 and f["pos_str"][0] != f["neg_str"][0]
    acts = rec["activations"]
    for a in acts:
        assert len(a["tokens"]) == len(a["values"]) >= 3 and a["maxValue"] == max(a["values"]) > 0
        assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
    # jsae's extension: separate files, keyed like Neuronpedia's features
    ext = rec["jsae"]
    assert {(e["layer"], e["index"]) for e in ext["features"]} == {(f["layer"], f["index"]) for f in rec["features"]}
    labelled = {lab.feature: lab for lab in labels.labels if lab.label}
    for e in ext["features"]:
        j = int(e["index"])
        assert torch.allclose(torch.tensor(e["vectorVision"]), sae.W_dec_of("vision")[j].detach())
        if j in labelled:
            assert e["label"] == labelled[j].label and e["kind"] == labelled[j].kind
    images = {r["imageIndex"]: r["png"] for r in ext["images"]}
    assert ext["activations"]
    for a in ext["activations"]:
        assert a["maxValue"] == max(max(row) for row in a["patchGrid"]) > 0
        png = Image.open(io.BytesIO(base64.b64decode(images[a["imageIndex"]])))
        assert png.format == "PNG" and png.width > 8


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_saebench_contract(activation: str) -> None:
    torch.manual_seed(0)
    cfg = JointSAEConfig(d_in=24, d_sae=40, activation=activation, k=6)
    cfg.metadata["model_name"], cfg.metadata["layer"], cfg.metadata["hook_name"] = "llava", 3, "model.language_model.layers.3"
    sae = JointSAE(cfg)
    with torch.no_grad():  # non-unit decoder rows and non-zero biases, as a trained JSAE has
        sae.text.W_dec.mul_(torch.rand(40, 1) * 3 + 0.1)
        sae.text.b_enc.normal_()
        sae.text.b_dec.normal_()
    bench = JSAEBranchSAE(sae)
    assert bench.W_enc.shape == (24, 40) and bench.W_dec.shape == (40, 24)
    assert bench.b_enc.shape == (40,) and bench.b_dec.shape == (24,)
    assert bench.check_decoder_norms() and not JSAEBranchSAE.check_decoder_norms(_raw(sae))
    assert (bench.cfg.d_in, bench.cfg.d_sae, bench.cfg.hook_layer, bench.cfg.hook_name) == (24, 40, 3, "blocks.3.hook_resid_post")
    assert bench.cfg.model_name == "llava" and bench.cfg.dtype == "float32" and bench.dtype == torch.float32
    x = torch.randn(50, 24) * 2
    with torch.no_grad():
        z_ref = sae.encode(x, "text")
        assert torch.allclose(bench(x), sae.decode(z_ref, "text"), atol=1e-5)
        assert torch.equal(bench.encode(x) != 0, z_ref != 0)
        if activation == "topk":
            assert int((bench.encode(x) != 0).sum(-1).max()) <= 6
    vision = JSAEBranchSAE(sae, "vision")
    assert torch.allclose(vision(x), sae.decode(sae.encode(x, "vision"), "vision"), atol=1e-5)
    bench.to(torch.float64)
    assert bench.dtype == torch.float64 and bench.cfg.dtype == "float64" and bench.W_enc.dtype == torch.float64


class _raw(torch.nn.Module):
    def __init__(self, sae: JointSAE):
        super().__init__()
        self.W_dec, self.dtype, self.device = sae.W_dec_of("text"), torch.float32, "cpu"


@needs_release
def test_core_metrics_on_the_toy_lm() -> None:
    bench = JSAEBranchSAE.from_pretrained(RELEASE)
    out = core_metrics(bench, "llava", n_captions=48, batch_size=48)
    m = out["metrics"]
    assert set(m) == {"model_behavior_preservation", "model_performance_preservation", "reconstruction_quality",
                      "shrinkage", "sparsity", "token_stats"}
    mb, mp, rq = m["model_behavior_preservation"], m["model_performance_preservation"], m["reconstruction_quality"]
    assert set(mb) == {"kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"}
    assert set(mp) == {"ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae"}
    assert set(rq) == {"explained_variance", "explained_variance_legacy", "mse", "cossim"}
    assert 0 <= mb["kl_div_with_sae"] < mb["kl_div_with_ablation"]  # the SAE preserves far more than zero-ablation
    assert mp["ce_loss_without_sae"] < mp["ce_loss_with_ablation"] and mp["ce_loss_score"] > 0.5
    assert mb["kl_div_score"] == pytest.approx((mb["kl_div_with_ablation"] - mb["kl_div_with_sae"]) / mb["kl_div_with_ablation"])
    assert 0 < rq["cossim"] <= 1 and rq["mse"] > 0
    assert 0 < m["sparsity"]["l0"] <= bench.cfg.d_sae and m["sparsity"]["l1"] > 0
    assert m["token_stats"]["total_tokens_eval_reconstruction"] > 48 * 4
    assert out["layer"] == 4 and out["hook_name"] == "model.language_model.layers.4"


@needs_release
def test_cli_export_and_core_metrics(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from jsae.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["look", "export-neuronpedia", RELEASE, "--out", str(tmp_path / "np"), "--n-features", "2",
                            "--n-examples", "2", "--n-pairs", "40"])
    assert r.exit_code == 0, r.output
    assert len(read_export(tmp_path / "np" / "jsae-toy-llava" / "4-jsae")["features"]) == 2
    r = runner.invoke(app, ["look", "core-metrics", RELEASE, "--n-captions", "16", "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.json").read_text())["metrics"]["sparsity"]["l0"] > 0


def test_cli_features_without_labels(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from jsae.cli import app

    cfg = JointSAEConfig(d_in=128, d_sae=16)
    cfg.metadata["model_name"], cfg.metadata["layer"] = "llava", 4
    JointSAE(cfg).save_model(tmp_path / "sae")
    for args in (["look", "features"], ["features"]):  # the group command, and the hidden flat name of earlier versions
        r = CliRunner().invoke(app, [*args, str(tmp_path / "sae")])
        assert r.exit_code == 2 and "has no labels.json" in r.output and "jsae sae label --sae" in r.output
