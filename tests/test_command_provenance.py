"""Every path that applies an SAE to a model checks where the SAE was trained (issue 32), with the one check the
Python interventions use (:func:`jsae.interventions.check_sae_site`): ``jsae sae steer``, ``jsae look features``
/ ``export-neuronpedia``, the reuse of a demo run's SAEs (``jsae run experiments``) and VISTA's text SAEs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import jsae
from jsae.cli import app
from jsae.interventions import check_sae_site
from jsae.provenance import ProvenanceError
from jsae.saes.joint_sae import JointSAE, JointSAEConfig
from jsae.testing import build_hf, build_processor
from jsae.vlm import as_vlm

runner = CliRunner()
LLAVA_L4 = Path(jsae.__file__).parent / "pretrained" / "jsae-shapes-llava-l4" / "model.language_model.layers.4"


def _one_line(args: list[str]) -> str:
    r = runner.invoke(app, args)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip() and "%|" not in ln]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "unexpected failure" not in lines[0] and not lines[0].startswith("error: :")
    return lines[0]


@pytest.fixture(scope="module")
def tiny():
    return as_vlm(build_hf("llava", layers=3, hidden=32, seed=0), build_processor("llava"))


def _sae(d_in: int = 32, **meta) -> JointSAE:
    sae = JointSAE(JointSAEConfig(d_in=d_in, d_sae=16))
    for k, v in meta.items():
        sae.cfg.metadata[k] = v
    return sae


def test_the_one_check_names_model_layer_hook_and_width(tiny):
    a = tiny.adapter
    check_sae_site(_sae(layer=1, hook_name=a.hook_name(1)), 1, a)  # the right site passes
    check_sae_site(_sae(layer=1, hook_name="blocks.1.hook_resid_post"), 1, a)  # another naming of the same stream
    with pytest.raises(ProvenanceError, match="model qwen3-vl-moe vs"):
        check_sae_site(_sae(model_name="qwen3-vl-moe"), 1, a)
    with pytest.raises(ProvenanceError, match="layer 2 vs 1"):
        check_sae_site(_sae(layer=2), 1, a)
    with pytest.raises(ProvenanceError, match="d_in 64 vs 32"):
        check_sae_site(_sae(d_in=64), 1, a, "steering", "use another SAE")


def test_steer_refuses_an_sae_of_another_model():
    """Issue case 1: `jsae sae steer --sae <a toy LLaVA SAE> --model qwen3-vl-moe` ran ('animal' 0.00 -> 0.00)."""
    labels = json.loads((LLAVA_L4 / "labels.json").read_text())
    concept = next(lab["label"] for lab in labels["labels"] if lab["label"])
    msg = _one_line(["sae", "steer", "--sae", str(LLAVA_L4), "--concept", concept, "--layer", "4", "--alpha", "2",
                     "--model", "qwen3-vl-moe", "--n", "2"])
    assert "model llava vs qwen3-vl-moe" in msg and "pass the --model it was trained on (llava)" in msg


def test_feature_page_export_and_core_metrics_refuse_another_model(tmp_path):
    from jsae.report.neuronpedia import export_neuronpedia

    msg = _one_line(["look", "features", str(LLAVA_L4), "--model", "qwen3-vl-moe", "--out", str(tmp_path / "f.html"),
                     "--n-pairs", "8"])
    assert "model llava vs qwen3-vl-moe" in msg and not (tmp_path / "f.html").exists()
    with pytest.raises(ProvenanceError, match="model llava vs qwen3-vl-moe"):
        export_neuronpedia(LLAVA_L4, tmp_path / "np", model="qwen3-vl-moe", n_pairs=8)
    assert not (tmp_path / "np").exists()
    msg = _one_line(["look", "core-metrics", str(LLAVA_L4), "--model", "qwen3-vl-moe", "--n-captions", "4"])
    assert "model llava vs qwen3-vl-moe" in msg


def test_experiments_refuse_a_run_made_with_another_model(tiny, tmp_path):
    from jsae.protocol.experiments import run_experiments
    from jsae.protocol.reference_metrics import Experiment, write_experiment_table

    run = tmp_path / "run"
    _sae(model_name="qwen3-vl-moe", layer=1).save_model(run / "saes" / "jsae" / "layer_1")
    table = write_experiment_table([Experiment("x", 1, [3], ["cat"], "", ["0"])], tmp_path / "t.csv")
    from jsae.testing import make_image

    with pytest.raises(ProvenanceError, match="model qwen3-vl-moe vs") as exc:
        run_experiments(table, run, vlm=tiny, images=[make_image(24, 24, 0)], alphas=(1.0,), max_new_tokens=2,
                        progress=False)
    assert "\n" not in str(exc.value) and "pass the run directory made with this model" in str(exc.value)


def test_vista_refuses_a_text_sae_of_another_model(tiny):
    from sae_lens import StandardSAE, StandardSAEConfig

    from jsae.vista.core import check_text_sae

    hook = tiny.adapter.hook_name(1)
    own = StandardSAE(StandardSAEConfig(d_in=32, d_sae=16))
    own.cfg.metadata.hook_name = hook
    check_text_sae(own, tiny.adapter, 1)
    other = StandardSAE(StandardSAEConfig(d_in=32, d_sae=16))
    other.cfg.metadata.hook_name, other.cfg.metadata.model_name = hook, "qwen3-vl-moe"
    with pytest.raises(ProvenanceError, match="VISTA run.*model qwen3-vl-moe vs"):
        check_text_sae(other, tiny.adapter, 1)
    # a text SAE of the VLM's own language model applies (VISTA's point: Gemma Scope on a Gemma-based VLM)
    tiny.adapter.hf_model.config.text_config._name_or_path = "org/my-lm"
    try:
        base = StandardSAE(StandardSAEConfig(d_in=32, d_sae=16))
        base.cfg.metadata.hook_name, base.cfg.metadata.model_name = "blocks.1.hook_resid_post", "my-lm"
        check_text_sae(base, tiny.adapter, 1)
    finally:
        tiny.adapter.hf_model.config.text_config._name_or_path = ""
