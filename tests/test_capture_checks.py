"""A capture is checked against its manifest when it is opened (issue 32): every listed shard exists, is whole,
holds both views of every captured layer, ``[shard count, d_in]`` wide in the manifest's dtype, and the counts
add up; each mismatch is one line naming the file and what differs.  A full disk while writing a shard, a
checkpoint or an SAE is one line naming the file, not a safetensors error."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import jsae
from jsae.capture import check_capture, read_layer
from jsae.cli import app
from jsae.testing import tiny_vlm
from jsae.training import load_pairs

runner = CliRunner()


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real capture of a tiny LLaVA (d_in 32): layers 0 and 1, 12 pairs in 3 shards of 4."""
    v = tiny_vlm("llava")
    out = tmp_path_factory.mktemp("cap") / "c"
    jsae.capture_pairs(v.model, v.pairs(12), layers=[0, 1], out_dir=out, processor=v.processor, batch_size=4,
                       shard_size=4, progress=False)
    return out


def _copy(capture: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(capture, dst)
    return dst


def _edit_manifest(cap: Path, **changes) -> None:
    m = json.loads((cap / "manifest.json").read_text())
    m.update(changes)
    (cap / "manifest.json").write_text(json.dumps(m))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg.strip(), msg
    return msg


def _refused_after_editing(capture: Path, tmp_path: Path, shard_name: str, edit, layer: int) -> tuple[Path, str]:
    """A copy of ``capture`` whose shard ``shard_name`` has every tensor passed through ``edit``: the shard's path and
    the one-line error ``load_pairs`` refuses it with."""
    cap = _copy(capture, tmp_path)
    shard = cap / shard_name
    save_file({k: edit(v).contiguous() for k, v in load_file(shard).items()}, shard)
    with pytest.raises(ValueError) as exc:
        load_pairs(cap, layer)
    return shard, _one_line(exc)


def test_a_whole_capture_passes_and_reads_back(capture):
    m = check_capture(capture)
    assert m["count"] == 12 and len(m["shards"]) == 3
    v, t, _ = read_layer(capture, 1)
    assert v.shape == t.shape == (12, 32)


def test_a_narrower_shard_than_the_model_is_refused(capture, tmp_path):
    """Issue case 4: shards 64 wide while the manifest's model is 128 wide trained an SAE of d_in 64."""
    shard, msg = _refused_after_editing(capture, tmp_path, "shard-00001.safetensors", lambda v: v[:, :16], layer=0)
    assert str(shard) in msg and "16 wide" in msg and "32 wide" in msg


def test_a_shard_with_fewer_rows_than_its_manifest_entry_is_refused(capture, tmp_path):
    """Issue case 5: a shard of 100 rows listed as 300 trained and saved."""
    shard, msg = _refused_after_editing(capture, tmp_path, "shard-00002.safetensors", lambda v: v[:2], layer=1)
    assert str(shard) in msg and "[2, 32]" in msg and "4 pairs" in msg


def test_a_manifest_claiming_more_pairs_than_its_shards_is_refused(capture, tmp_path):
    """Issue case 6: a manifest claiming 900 pairs over 300 rows trained and saved."""
    cap = _copy(capture, tmp_path)
    _edit_manifest(cap, count=36, total=36)
    with pytest.raises(ValueError) as exc:
        load_pairs(cap, 1)
    msg = _one_line(exc)
    assert "manifest.json claims 36 pairs but its shards list 12" in msg


def test_a_truncated_shard_is_named(capture, tmp_path):
    cap = _copy(capture, tmp_path)
    shard = cap / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:200])
    with pytest.raises(ValueError) as exc:
        load_pairs(cap, 0)
    assert str(shard) in _one_line(exc) and ("truncated" in str(exc.value) or "corrupt" in str(exc.value))
    shard.write_bytes(b"\x01")  # shorter than a header
    with pytest.raises(ValueError, match="not a readable safetensors shard"):
        load_pairs(cap, 0)


def test_a_shard_missing_a_view_is_named(capture, tmp_path):
    cap = _copy(capture, tmp_path)
    shard = cap / "shard-00001.safetensors"
    w = load_file(shard)
    del w["layer_1.text"]
    save_file(w, shard)
    with pytest.raises(ValueError) as exc:
        load_pairs(cap, 0)  # any layer: the whole capture is checked once when it is opened
    msg = _one_line(exc)
    assert str(shard) in msg and "lacks the tensor layer_1.text" in msg


def test_a_missing_shard_and_a_dtype_mismatch_are_named(capture, tmp_path):
    cap = _copy(capture, tmp_path)
    shard = cap / "shard-00001.safetensors"
    w = load_file(shard)
    save_file({k: v.half() for k, v in w.items()}, shard)
    with pytest.raises(ValueError) as exc:
        load_pairs(cap, 0)
    assert str(shard) in _one_line(exc) and "float16 but the manifest says float32" in str(exc.value)
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="shard-00001.safetensors is listed in the capture's manifest"):
        load_pairs(cap, 0)


def test_the_cli_refuses_a_mismatched_capture_and_writes_no_sae(capture, tmp_path):
    cap = _copy(capture, tmp_path)
    _edit_manifest(cap, count=36, total=36)
    r = runner.invoke(app, ["sae", "train", "--capture", str(cap), "--layer", "1", "--out", str(tmp_path / "sae"),
                            "--steps", "2", "--batch-size", "4", "--d-sae", "8"])
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "claims 36 pairs" in lines[0], r.output
    assert not (tmp_path / "sae").exists()


def test_resuming_into_a_capture_with_a_broken_shard_is_refused(capture, tmp_path):
    cap = _copy(capture, tmp_path)
    _edit_manifest(cap, complete=False)
    shard = cap / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8])
    v = tiny_vlm("llava")
    with pytest.raises(ValueError, match="shard-00000.safetensors is truncated"):
        jsae.capture_pairs(v.model, v.pairs(12), layers=[0, 1], out_dir=cap, processor=v.processor, batch_size=4,
                           shard_size=4, progress=False)


# ---- a full disk: a real process with a file-size limit (the write fails with EFBIG, as with ENOSPC) --------


_LIMITED = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)          # a write past the limit fails instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
from jsae.cli import app
sys.argv = ["jsae", *sys.argv[2:]]
app()
"""


def _run_limited(limit: int, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "JSAE_DEBUG": "0"}
    return subprocess.run([sys.executable, "-c", _LIMITED, str(limit), *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_a_full_disk_while_training_names_the_file_and_keeps_nothing_partial(capture, tmp_path):
    out = tmp_path / "sae"
    r = _run_limited(3000, "sae", "train", "--capture", str(capture), "--layer", "1", "--out", str(out),
                     "--steps", "2", "--batch-size", "4", "--d-sae", "64")
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and "it/s]" not in ln and "%|" not in ln]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: could not write ") and "sae_weights.safetensors" in lines[0], lines[0]
    assert "unexpected failure" not in lines[0]
    assert not (out / "cfg.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".sae.tmp")]


@pytest.mark.slow
def test_a_full_disk_while_capturing_names_the_shard_and_resumes(tmp_path):
    out = tmp_path / "cap"
    r = _run_limited(20_000, "capture", "--layers", "2", "--n", "64", "--batch-size", "16", "--out", str(out))
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and "%|" not in ln]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: could not write ") and "shard-00000.safetensors" in lines[0], lines[0]
    assert not [p for p in out.iterdir() if p.name.startswith(".shard")]
    assert json.loads((out / "manifest.json").read_text())["count"] == 0
