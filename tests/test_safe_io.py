"""Safe I/O: a hub pull writes only inside its folder, a checkpoint re-save interrupted by a kill is finished
on the next start, stale temporaries are cleaned, corrupt manifests give one line, no remote code by default."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

import jsae
from jsae.guards import check_output_dir, confined
from jsae.releases import hub
from jsae.releases.saebench import CustomSAEConfig, JSAEBranchSAE
from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData


def _pushed(tmp_path):
    sae_dir = tmp_path / "sae"
    jsae.JointSAE(jsae.JointSAEConfig(d_in=16, d_sae=32)).save_model(sae_dir)
    root = tmp_path / "hub"
    hub.push(sae_dir, "org/name", endpoint=root)
    return root, root / "org" / "name"


@pytest.mark.parametrize("name", ["../../evil.txt", "/tmp/evil.txt", "a/../../evil.txt", "..\\evil.txt", "~/evil.txt"])
def test_a_hub_manifest_cannot_write_outside_the_pull_folder(tmp_path, name):
    root, repo = _pushed(tmp_path)
    payload = b"export PATH=/evil\n"
    (tmp_path / "evil.txt").write_bytes(payload)
    manifest = json.loads((repo / hub.MANIFEST).read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    (repo / hub.MANIFEST).write_text(json.dumps(manifest))
    out = tmp_path / "pulled" / "deep" / "x"
    with pytest.raises(ValueError, match="refusing to pull it"):
        hub.pull("org/name", out, endpoint=root)
    assert not out.exists() and not (tmp_path / "pulled" / "evil.txt").exists()
    assert sorted(p.name for p in tmp_path.rglob("evil.txt")) == ["evil.txt"]  # only the one we wrote


def test_a_pull_never_replaces_a_folder_that_holds_something_else(tmp_path):
    root, _ = _pushed(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    (home / ".bashrc").write_text("mine")
    with pytest.raises(FileExistsError, match="is not empty and holds no pulled repo"):
        hub.pull("org/name", home, endpoint=root)
    assert (home / ".bashrc").read_text() == "mine"
    first = hub.pull("org/name", tmp_path / "pull", endpoint=root)  # an earlier pull is replaced, as before
    assert hub.pull("org/name", first, endpoint=root) == first and (first / "README.md").is_file()
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        hub.pull("org/name", f, endpoint=root)


def test_confined_and_repo_paths():
    assert confined("/tmp/root", "a/b.txt").as_posix() == "/tmp/root/a/b.txt"
    for bad in ("../x", "/etc/passwd", "a/../../x", "", "a\\..\\x"):
        with pytest.raises(ValueError):
            confined("/tmp/root", bad)
    hub.check_repo_paths(["README.md", "layer_4/cfg.json"], "org/name")
    with pytest.raises(ValueError, match="points outside"):
        hub.check_repo_paths(["ok.json", "x/../../.bashrc"], "org/name")


def _trainer(ckpt, steps=10):
    g = torch.Generator().manual_seed(0)
    data = PairedTensorData(torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g), batch_size=8)
    cfg = JointTrainerConfig(total_steps=steps, lr=3e-3, progress=False, log_every=5, checkpoint_every=5,
                             checkpoint_dir=str(ckpt))
    return JointSAETrainer.from_config(jsae.TrainingJointSAEConfig(d_in=16, d_sae=32), cfg, data)


def test_a_killed_resave_is_finished_and_stale_temporaries_are_cleaned(tmp_path):
    done = _trainer(tmp_path).fit()
    # killed while re-saving step 10: the old folder moved aside, the new one still a temporary
    (tmp_path / "step-0000010").rename(tmp_path / ".step-0000010.old-1234abcd")
    (tmp_path / ".tmp-step-0000010-999-deadbeef").mkdir()
    (tmp_path / ".tmp-step-0000010-999-deadbeef" / "sae_weights.safetensors").write_bytes(b"\0" * 1000)
    (tmp_path / ".latest.json.tmp-999-deadbeef").write_text("{")
    again = _trainer(tmp_path).fit()
    assert all(torch.equal(a, b) for a, b in zip(done.state_dict().values(), again.state_dict().values()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-0000005", "step-0000010"]


def test_a_truncated_checkpoint_names_its_file(tmp_path):
    _trainer(tmp_path).fit()
    w = tmp_path / "step-0000010" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:200])
    with pytest.raises(ValueError, match=r"step-0000010/sae_weights.safetensors is corrupt or truncated .*; delete"):
        _trainer(tmp_path).fit()
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "../../etc", "step": 10}))
    with pytest.raises(ValueError, match="holds no readable jsae checkpoint"):
        _trainer(tmp_path).fit()


def test_a_corrupt_capture_manifest_is_one_line(tmp_path):
    from jsae.capture import read_manifest
    from jsae.testing import tiny_vlm

    (tmp_path / "manifest.json").write_text('{"layers": [0], "shards": [')
    with pytest.raises(ValueError, match=r"manifest.json is corrupt \(.*\); capture again into a new folder"):
        read_manifest(tmp_path)
    v = tiny_vlm("llava")
    with pytest.raises(ValueError, match=r"manifest.json is corrupt .*delete .* to capture anew"):
        jsae.capture_pairs(v.model, v.pairs(2), layers=[0], out_dir=tmp_path, processor=v.processor, progress=False)
    shutil.rmtree(tmp_path)


def test_no_remote_code_by_default_and_output_paths_checked(tmp_path):
    sae = jsae.JointSAE(jsae.JointSAEConfig(d_in=16, d_sae=32))
    sae.cfg.metadata["layer"] = 2
    assert JSAEBranchSAE(sae).cfg.dataset_trust_remote_code is False
    assert CustomSAEConfig("m", 16, 32, 2, "h").dataset_trust_remote_code is False
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="cannot be created: .* is a file"):
        check_output_dir(f / "sub", "--out")
