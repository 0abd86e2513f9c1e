"""The command line answers plain mistakes with one line on stderr (``error: ...``, exit 2), before any
expensive step and without leaving files behind; ``--debug`` shows the traceback of an unexpected failure."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

import jsae
from jsae.cli import app
from jsae.cli._common import guard_command, set_debug

runner = CliRunner()


def _error(args: list[str]) -> str:
    r = runner.invoke(app, args)
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip() and "it/s]" not in ln]  # (progress bars aside)
    assert len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "Traceback" not in r.output
    return lines[0]


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("keep me")
    return f


def test_capture_mistakes_are_caught_before_loading(tmp_path, a_file):
    base = ["capture", "--layers", "2", "--n", "4"]
    assert "--out" in _error([*base, "--out", str(a_file)]) and a_file.read_text() == "keep me"
    assert "cannot be created" in _error([*base, "--out", str(a_file / "sub")])
    assert "--split 'dev' is not a world split" in _error([*base, "--out", str(tmp_path / "c"), "--split", "dev"])
    assert "must be at least 1, got 0" in _error(["capture", "--layers", "2", "--n", "0", "--out", str(tmp_path / "c")])
    assert "--pooling 'median'" in _error([*base, "--out", str(tmp_path / "c"), "--pooling", "median"])
    msg = _error([*base, "--out", str(tmp_path / "c"), "--model", "llava2"])
    assert "unknown model 'llava2'" in msg and "hf download" not in msg
    assert "--layers must be comma-separated integers" in _error([*base[:1], "--layers", "x", "--out", str(tmp_path / "c")])
    assert "out of range" in _error([*base[:1], "--layers", "99", "--n", "4", "--out", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()  # nothing was written by any of them


def test_train_checks_its_output_paths_before_training(tmp_path, a_file):
    cap = tmp_path / "cap"
    assert runner.invoke(app, ["capture", "--out", str(cap), "--layers", "2", "--n", "8"]).exit_code == 0
    train = ["train", "--capture", str(cap), "--layer", "2", "--steps", "3", "--batch-size", "4", "--d-sae", "16"]
    assert "--out" in _error([*train, "--out", str(a_file)])
    assert "--checkpoint-dir" in _error([*train, "--out", str(tmp_path / "sae"), "--checkpoint-dir", str(a_file)])
    assert not (tmp_path / "sae").exists()
    assert "layer 5 was not captured" in _error([*train, "--layer", "5", "--out", str(tmp_path / "sae")])
    # an SAE of another model (same d_in) labelled on this capture: refused
    other = jsae.JointSAE(jsae.JointSAEConfig(d_in=128, d_sae=16))
    for key, value in {"model_name": "qwen3-vl-moe", "layer": 2, "hook_name": "model.language_model.layers.2"}.items():
        other.cfg.metadata[key] = value
    other.save_model(tmp_path / "qwen_sae")
    msg = _error(["label", "--sae", str(tmp_path / "qwen_sae"), "--capture", str(cap), "--layer", "2", "--split", "train",
                  "--n", "8"])
    assert "model qwen3-vl-moe vs llava" in msg and not (tmp_path / "qwen_sae" / "labels.json").exists()


def test_recipe_mistakes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("release: r\nmodel: llava\nlayer: 2\nsteps: many\n")
    assert "steps must be an integer, got 'many'" in _error(["release", "build", "--config", str(bad), "--out", str(tmp_path)])
    bad.write_text("release: r\nmodel: !!python/object/apply:os.system ['echo hi']\nlayer: 2\n")
    assert "not valid recipe YAML" in _error(["release", "build", "--config", str(bad), "--out", str(tmp_path)])


def test_a_failed_demo_leaves_nothing_that_blocks_its_retry(tmp_path):
    out = tmp_path / "run"
    assert "layer 9 is out of range" in _error(["demo", "--out", str(out), "--layers", "9", "--n-train", "8"])
    assert not out.exists()


def test_unexpected_failures_are_one_line_unless_debug():
    def boom() -> None:
        {}["missing"]

    sub = typer.Typer()
    sub.command()(guard_command(boom))
    sub.command("other")(guard_command(lambda: None))
    r = runner.invoke(sub, ["boom"])
    assert r.exit_code == 1 and r.output.strip() == ("error: KeyError: 'missing' (an unexpected failure; --debug shows "
                                                     "the traceback)")
    set_debug(True)
    try:
        r = runner.invoke(sub, ["boom"])
        assert isinstance(r.exception, KeyError)
    finally:
        set_debug(False)
    r = runner.invoke(app, ["--debug", "capture", "--help"])  # the flag exists on the real command line
    assert r.exit_code == 0


def test_a_run_that_fails_after_writing_removes_what_it_wrote(tmp_path):
    """The protocol fails in training (an SAE too large for the machine) after run.json and the captures exist:
    a fresh run directory is emptied, so the corrected retry is not refused as another run."""
    from jsae.protocol.config import ProtocolConfig
    from jsae.protocol.run import run_protocol

    out = tmp_path / "run"
    cfg = ProtocolConfig(n_train=8, n_label=8, n_eval=8, layers=[2], d_sae=10**9, steps=2, methods=("jsae",))
    with pytest.raises(MemoryError, match="lower d_sae"):
        run_protocol(out, cfg, progress=False)
    assert not out.exists()
