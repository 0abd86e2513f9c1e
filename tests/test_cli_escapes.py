"""What still escaped the command line as an "unexpected failure" or without a word (issue 32) now gives one line
naming the file or the value: an empty ``metadata.jsonl``, labels naming a feature the SAE lacks, a truncated
shard, a checkpoint of another run (in the command line's own words); labelling on the SAE's own training pairs
says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import jsae
from jsae.cli import app
from jsae.data.sources import WorldSource
from jsae.provenance import manifest_record
from jsae.saes.joint_sae import JointSAE, JointSAEConfig
from jsae.testing import tiny_vlm

runner = CliRunner()


def _one_line(args: list[str]) -> str:
    r = runner.invoke(app, args)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip() and "%|" not in ln]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "unexpected failure" not in lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def world_capture(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A capture of 8 world training pairs by a tiny LLaVA (layer 1), and a JSAE whose metadata says it was trained
    on exactly these pairs (as `jsae sae train` records it)."""
    v = tiny_vlm("llava")
    root = tmp_path_factory.mktemp("esc")
    source = WorldSource.split("train", 8)
    cap = jsae.capture_pairs(v.model, source.pairs("train"), layers=[1], out_dir=root / "cap", processor=v.processor,
                             fingerprint=source.fingerprint("train"), progress=False)
    rec = manifest_record(json.loads((cap / "manifest.json").read_text()), 1)
    sae = JointSAE(JointSAEConfig(d_in=32, d_sae=16))
    for key, value in {"model_name": rec["model"], "model_class": rec["model_class"], "layer": 1,
                       "hook_name": rec["hook_name"], "pooling": rec["pooling"], "data_fingerprint": rec["data"]}.items():
        sae.cfg.metadata[key] = value
    sae.save_model(root / "sae")
    return cap, root / "sae"


def test_labelling_on_the_training_pairs_says_the_labels_are_in_sample(world_capture):
    """Issue case 9: `jsae sae label` on the SAE's own training capture wrote labels with no word."""
    cap, sae = world_capture
    r = runner.invoke(app, ["sae", "label", "--sae", str(sae), "--capture", str(cap), "--layer", "1", "--split", "train",
                            "--n", "8"])
    assert r.exit_code == 0, r.output
    assert "holds the pairs this SAE was trained on, so these labels are in-sample" in r.output
    assert (sae / "labels.json").is_file()


def test_labels_naming_a_feature_the_sae_lacks_are_refused(world_capture, tmp_path):
    """Issue: `labels.json` naming feature 99999 of 256 failed with an IndexError."""
    _, sae = world_capture
    folder = tmp_path / "sae"
    import shutil

    shutil.copytree(sae, folder)
    (folder / "labels.json").write_text(json.dumps({"concepts": ["dog"], "labels": [
        {"feature": 99999, "label": "dog", "kind": "shared", "purity": 1.0, "vision_corr": 0.9, "text_corr": 0.9}]}))
    msg = _one_line(["sae", "steer", "--sae", str(folder), "--concept", "dog", "--layer", "1", "--alpha", "1"])
    assert "feature(s) [99999]" in msg and "features 0..15" in msg


def test_an_empty_metadata_file_names_the_dataset(tmp_path):
    """Issue: an empty `metadata.jsonl` failed with "IndexError: list index out of range"."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.jsonl").write_text("")
    msg = _one_line(["run", "capture", "--layers", "1", "--data", str(data), "--out", str(tmp_path / "cap")])
    assert f"could not read the caption dataset {str(data)!r}" in msg and "metadata.jsonl" in msg
    assert not (tmp_path / "cap").exists()


def test_a_truncated_shard_is_named_on_the_command_line(world_capture, tmp_path):
    cap, _ = world_capture
    import shutil

    broken = tmp_path / "cap"
    shutil.copytree(cap, broken)
    shard = broken / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    msg = _one_line(["sae", "train", "--capture", str(broken), "--layer", "1", "--out", str(tmp_path / "s"),
                     "--steps", "2", "--batch-size", "2", "--d-sae", "8"])
    assert str(shard) in msg and not (tmp_path / "s").exists()


def test_a_checkpoint_of_another_layer_is_refused_in_the_command_lines_words(tmp_path):
    v = tiny_vlm("llava")
    source = WorldSource.split("train", 8)
    cap = jsae.capture_pairs(v.model, source.pairs("train"), layers=[0, 1], out_dir=tmp_path / "cap",
                             processor=v.processor, fingerprint=source.fingerprint("train"), progress=False)
    base = ["sae", "train", "--capture", str(cap), "--steps", "2", "--batch-size", "2", "--d-sae", "8",
            "--checkpoint-dir", str(tmp_path / "ck")]
    assert runner.invoke(app, [*base, "--layer", "0", "--out", str(tmp_path / "s0")]).exit_code == 0
    msg = _one_line([*base, "--layer", "1", "--out", str(tmp_path / "s1")])
    assert msg.startswith("error: checkpoint directory ") and "layer 0 vs 1" in msg
    assert "--allow-provenance-mismatch" in msg and "allow_provenance_mismatch=True" not in msg
    assert not (tmp_path / "s1").exists()
