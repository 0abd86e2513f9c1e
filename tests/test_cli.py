"""The real ``jsae`` command line (``jsae.cli.app``): every group answers ``--help``, the old flat names still
resolve, the console script answers help without importing torch, and ``jsae sae label`` refuses a capture
of other data (the fingerprint check)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from jsae.cli import app

runner = CliRunner()

GROUPS = {
    "run": ["demo", "sweep", "capture", "experiments"],
    "sae": ["train", "label", "steer"],
    "look": ["features", "export-neuronpedia", "core-metrics"],
    "release": ["build", "build-shipped", "list", "push", "pull", "yaml"],
    "world": ["sample", "dataset", "train-models", "evaluate", "info"],
    "vista": ["train", "eval"],
}
OLD_NAMES = ["capture", "train", "label", "steer", "sweep", "features", "export-neuronpedia", "core-metrics", "version"]


def test_every_group_answers_help() -> None:
    r = runner.invoke(app, ["--help"])
    assert r.exit_code == 0, r.output
    assert all(g in r.output for g in [*GROUPS, "demo"])
    for group, commands in GROUPS.items():
        r = runner.invoke(app, [group, "--help"])
        assert r.exit_code == 0, r.output
        assert all(c in r.output for c in commands), (group, r.output)
        for c in commands:
            r = runner.invoke(app, [group, c, "--help"])
            assert r.exit_code == 0 and "Usage:" in r.output, (group, c, r.output)
    for name in OLD_NAMES:  # the flat names of earlier versions: hidden, but they still work
        r = runner.invoke(app, [name, "--help"])
        assert r.exit_code == 0 and f" {name} [OPTIONS]" in r.output, (name, r.output)
    r = runner.invoke(app, ["version"])
    assert r.exit_code == 0 and r.output.strip() == runner.invoke(app, ["--version"]).output.strip() != ""


def test_the_console_script_answers_help_without_torch(tmp_path: Path) -> None:
    """The entry point (read from the installed metadata) answers every group's help, and neither the package
    ``jsae`` (whose import registers with SAELens) nor torch, transformers, nnsight or sae_lens gets imported.
    (Run outside the repository, where a stale ``jsae.egg-info`` could shadow the installed metadata.)"""
    code = f"""
import importlib, sys
from importlib.metadata import entry_points
(ep,) = entry_points(group="console_scripts", name="jsae")
main = getattr(importlib.import_module(ep.module), ep.attr)
for args in [["--help"], ["--version"], *[[g, "--help"] for g in {list(GROUPS)!r}], ["sae", "label", "--help"]]:
    sys.argv = ["jsae", *args]
    try:
        main()
    except SystemExit as exc:
        assert exc.code in (0, None), (args, exc.code)
heavy = [m for m in ("jsae", "torch", "transformers", "nnsight", "sae_lens", "numpy") if m in sys.modules]
print("HEAVY", heavy, file=sys.stderr)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stderr, out.stderr
    assert "Usage: jsae sae label" in out.stdout


def test_label_refuses_a_capture_of_other_data(tmp_path: Path) -> None:
    """`jsae sae label` rebuilds the data from --split/--n/--seed and checks it against the capture's
    fingerprint: another seed is refused with one line that names the fix; the right one labels, and
    labels.json records the data.  `jsae sae steer` refuses labels made on other than world data."""
    cap, sae = tmp_path / "cap", tmp_path / "sae"
    r = runner.invoke(app, ["run", "capture", "--model", "llava", "--layers", "1", "--split", "validation", "--n", "40",
                            "--seed", "0", "--out", str(cap)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["sae", "train", "--capture", str(cap), "--layer", "1", "--out", str(sae), "--steps", "3",
                            "--d-sae", "16", "--batch-size", "20"])
    assert r.exit_code == 0, r.output
    meta, manifest = json.loads((sae / "cfg.json").read_text())["metadata"], json.loads((cap / "manifest.json").read_text())
    assert (meta["hook_name"], meta["hf_hook_name"], meta["layer"]) == ("blocks.1.hook_out", "model.language_model.layers.1", 1)
    assert meta["prepend_bos"] is manifest["prepend_bos"] is True          # what SAELens's evals read
    assert meta["context_size"] == manifest["context_size"] > 0
    label = ["sae", "label", "--sae", str(sae), "--capture", str(cap), "--layer", "1", "--n", "40"]
    r = runner.invoke(app, [*label, "--seed", "1"])
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1, r.output
    assert "was made from other data" in errors[0] and "--split/--n/--seed it was captured with" in errors[0]
    assert not (sae / "labels.json").exists()
    r = runner.invoke(app, [*label, "--seed", "0"])
    assert r.exit_code == 0, r.output
    recorded = json.loads((sae / "labels.json").read_text())
    manifest = json.loads((cap / "manifest.json").read_text())
    assert recorded["data"]["kind"] == "world" and recorded["data"]["fingerprint"] == manifest["fingerprint"]

    recorded["data"]["kind"] = "captions"
    (sae / "labels.json").write_text(json.dumps(recorded))
    r = runner.invoke(app, ["sae", "steer", "--sae", str(sae), "--concept", "red", "--layer", "1", "--alpha", "5"])
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "captions data" in errors[0] and "world" in errors[0], r.output


def test_steer_on_a_vlm_directory_with_an_image_folder_or_a_caption_dataset(tmp_path: Path) -> None:
    """`jsae sae steer` beyond the world: a VLM loaded from a directory (as a hub id would be), the pictures of
    a folder or the rows of a caption dataset; labels of another kind of data are refused."""
    from jsae.labels import FeatureLabels
    from jsae.releases.registry import PACKAGE_ROOT, RELEASES
    from jsae.world import world_dataset
    from jsae.world.models import model_dir

    lk = RELEASES["jsae-shapes-llava-l4"]
    sae_dir = PACKAGE_ROOT / lk.repo_id / next(iter(lk.saes_map.values()))
    concept = next(lab.label for lab in FeatureLabels.load(sae_dir / "labels.json").labels if lab.kind == "shared")
    ds = world_dataset("test", 3, seed=4)
    (tmp_path / "pics").mkdir()
    for i, ex in enumerate(ds):
        ex["image"].save(tmp_path / "pics" / f"{i}.png")
    args = ["sae", "steer", "--sae", str(sae_dir), "--concept", concept, "--layer", "4", "--alpha", "200",
            "--model", str(model_dir("llava")), "--n", "3", "--prompt", "", "--max-new-tokens", "8"]
    res = runner.invoke(app, [*args, "--images", str(tmp_path / "pics")])
    assert res.exit_code == 0, res.output
    lines = res.output.replace("\r", "\n").split("\n")
    assert sum(line.startswith("+ ") for line in lines) == 3 and f"'{concept}' mentioned:" in res.output
    ds.save_to_disk(str(tmp_path / "captions"))
    res = runner.invoke(app, [*args, "--data", str(tmp_path / "captions")])
    assert res.exit_code == 2 and "labels features on world data, but these images are captions data" in res.output
    res = runner.invoke(app, [*args, "--images", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "holds no images" in res.output


def test_thread_policy(monkeypatch):
    """One torch thread per two cores by default (the toy world's small matrices thrash with a thread per core on
    a busy machine), OpenMP threads that sleep when idle; --threads wins; a user's OMP_NUM_THREADS is kept."""
    import os

    import torch

    from jsae.cli import THREAD_VARS, thread_policy

    assert [thread_policy(None, c) for c in (1, 2, 4, 16, 64)] == [1, 1, 2, 8, 8]
    before = torch.get_num_threads()
    try:
        for var in (*THREAD_VARS, "OMP_WAIT_POLICY"):
            monkeypatch.delenv(var, raising=False)
        res = runner.invoke(app, ["--threads", "1", "version"])
        assert res.exit_code == 0 and os.environ["OMP_NUM_THREADS"] == "1" and torch.get_num_threads() == 1
        assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # idle OpenMP threads sleep, not spin (a user's value wins)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")
        assert runner.invoke(app, ["version"]).exit_code == 0 and os.environ["OMP_NUM_THREADS"] == "3"
        res = runner.invoke(app, ["--threads", "0", "version"])
        assert res.exit_code == 2 and "'--threads': must be at least 1" in res.output
    finally:
        torch.set_num_threads(before)
