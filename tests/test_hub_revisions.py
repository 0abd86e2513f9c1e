"""A local hub keeps every commit and honours ``revision`` as the Hub does (issue 32): two pushes, each pulled back
by its commit id; an unknown revision is refused with one line listing the known ones.  No SAE with NaN or inf
weights is saved, pushed, pulled, loaded, labelled, steered with or released."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from jsae.cli import app
from jsae.releases import hub
from jsae.saes.joint_sae import JointSAE, JointSAEConfig

runner = CliRunner()
HOOK = "model.language_model.layers.2"


def _sae(folder: Path, seed: int) -> JointSAE:
    cfg = JointSAEConfig(d_in=16, d_sae=32)
    for k, v in {"model_name": "llava", "hook_name": HOOK, "layer": 2}.items():
        cfg.metadata[k] = v
    torch.manual_seed(seed)
    sae = JointSAE(cfg)
    sae.save_model(folder / HOOK)
    return sae


def _one_line(args: list[str]) -> str:
    r = runner.invoke(app, args)
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    assert "unexpected failure" not in lines[0]
    return lines[0]


def test_two_pushes_are_pulled_back_by_revision(tmp_path):
    root, src = tmp_path / "hub", tmp_path / "src"
    first = _sae(src, 0)
    hub.push(src, "org/rel", endpoint=root)
    rev1 = hub.revisions("org/rel", endpoint=root)
    second = _sae(src, 1)
    hub.push(src, "org/rel", endpoint=root)
    revs = hub.revisions("org/rel", endpoint=root)
    assert len(revs) == 2 and revs[1] == rev1[0] and all(len(r) == 40 for r in revs)
    assert sorted(p.name for p in (root / "org").iterdir()) == ["rel"]  # the history is kept out of the org's folder

    old = hub.pull("org/rel", tmp_path / "old", endpoint=root, revision=revs[1][:7])  # a short commit id
    new = hub.pull("org/rel", tmp_path / "new", endpoint=root, revision=revs[0])
    main = hub.pull("org/rel", tmp_path / "main", endpoint=root)
    W = lambda d: JointSAE.load_from_disk(d / HOOK).vision.W_dec  # noqa: E731
    assert torch.equal(W(old), first.vision.W_dec) and torch.equal(W(new), second.vision.W_dec)
    assert torch.equal(W(main), second.vision.W_dec) and not torch.equal(W(old), W(new))

    # into the Hugging Face cache: one snapshot per commit, refs/main only for the current one
    cache = tmp_path / "cache"
    snap = hub.LocalHub(root).download_to_hf_cache("org/rel", cache, revision=revs[1])
    assert snap.name == revs[1] and torch.equal(W(snap), first.vision.W_dec)
    assert not (snap.parent.parent / "refs" / "main").exists()
    snap = hub.LocalHub(root).download_to_hf_cache("org/rel", cache)
    assert snap.name == revs[0] and (snap.parent.parent / "refs" / "main").read_text() == revs[0]


def test_an_unknown_revision_is_refused_and_nothing_is_written(tmp_path):
    root, src = tmp_path / "hub", tmp_path / "src"
    _sae(src, 0)
    r = runner.invoke(app, ["release", "push", str(src), "--repo", "org/x", "--hub", str(root)])
    assert r.exit_code == 0 and "(revision " in r.output, r.output
    rev = hub.revisions("org/x", endpoint=root)[0]
    assert rev[:10] in r.output
    msg = _one_line(["release", "pull", "org/x", "--out", str(tmp_path / "p"), "--hub", str(root),
                     "--revision", "doesnotexist"])
    assert "revision 'doesnotexist' of 'org/x'" in msg and rev[:10] in msg
    assert not (tmp_path / "p").exists()
    r = runner.invoke(app, ["release", "pull", "org/x", "--out", str(tmp_path / "p"), "--hub", str(root),
                            "--revision", rev[:8]])
    assert r.exit_code == 0, r.output


def test_a_repo_pushed_before_the_history_existed_still_pulls_by_its_commit_id(tmp_path):
    root, src = tmp_path / "hub", tmp_path / "src"
    _sae(src, 0)
    hub.push(src, "org/old", endpoint=root)
    import shutil

    shutil.rmtree(root / hub.HISTORY)
    rev = hub.revisions("org/old", endpoint=root)
    assert len(rev) == 1
    assert (hub.pull("org/old", tmp_path / "p", endpoint=root, revision=rev[0]) / HOOK / "cfg.json").is_file()


# ---- NaN / inf weights neither leave nor enter -----------------------------------------------------------------


def _poison(folder: Path, key: str = "vision.W_dec", value: float = float("nan")) -> None:
    w = load_file(folder / "sae_weights.safetensors")
    w[key].view(-1)[0] = value
    save_file(w, folder / "sae_weights.safetensors")


def test_push_refuses_nan_weights_and_publishes_nothing(tmp_path):
    """Issue case 7: `jsae release push` of an SAE with NaN in vision.W_dec pushed it."""
    src = tmp_path / "src"
    _sae(src, 0)
    _poison(src / HOOK)
    msg = _one_line(["release", "push", str(src), "--repo", "org/nan", "--hub", str(tmp_path / "hub")])
    assert "NaN/inf" in msg and "vision.W_dec" in msg and "refusing to push" in msg
    assert not (tmp_path / "hub" / "org" / "nan").exists()


def test_pull_refuses_nan_weights_before_replacing_anything(tmp_path):
    root, src = tmp_path / "hub", tmp_path / "src"
    _sae(src, 0)
    hub.push(src, "org/rel", endpoint=root)
    good = hub.pull("org/rel", tmp_path / "out", endpoint=root)
    before = (good / HOOK / "sae_weights.safetensors").read_bytes()
    # the hub's copy diverges behind our back (checksums updated, so only the weights tell)
    repo = root / "org" / "rel"
    _poison(repo / HOOK, "text.b_enc", float("inf"))
    m = json.loads((repo / hub.MANIFEST).read_text())
    m["files"][f"{HOOK}/sae_weights.safetensors"]["sha256"] = hub._sha256(repo / HOOK / "sae_weights.safetensors")
    (repo / hub.MANIFEST).write_text(json.dumps(m))
    msg = _one_line(["release", "pull", "org/rel", "--out", str(tmp_path / "out"), "--hub", str(root)])
    assert "NaN/inf" in msg and "text.b_enc" in msg and "nothing was pulled" in msg
    assert (good / HOOK / "sae_weights.safetensors").read_bytes() == before  # the earlier pull is kept


def test_save_refuses_nan_weights_and_load_label_steer_refuse_them(tmp_path):
    sae = _sae(tmp_path / "src", 0)
    with torch.no_grad():
        sae.text.W_enc[1, 1] = float("inf")
    with pytest.raises(ValueError, match=r"refusing to save an SAE with NaN/inf weights \['text.W_enc'\]"):
        sae.save_model(tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    from jsae.saes.joint_sae import TrainingJointSAE, TrainingJointSAEConfig

    trained = TrainingJointSAE(TrainingJointSAEConfig(d_in=16, d_sae=32))  # what `jsae release build` saves
    with torch.no_grad():
        trained.vision.b_dec[0] = float("nan")
    with pytest.raises(ValueError, match=r"refusing to save .*\['vision.b_dec'\]"):
        trained.save_inference_model(tmp_path / "release")
    assert not (tmp_path / "release").exists()
    folder = tmp_path / "src" / HOOK
    _poison(folder)
    (folder / "labels.json").write_text(json.dumps({"concepts": ["dog"], "labels": [
        {"feature": 0, "label": "dog", "kind": "shared", "purity": 1.0, "vision_corr": 0.9, "text_corr": 0.9}]}))
    with pytest.raises(ValueError, match="NaN/inf"):
        JointSAE.load_from_disk(folder)
    assert "NaN/inf" in _one_line(["sae", "steer", "--sae", str(folder), "--concept", "dog", "--layer", "2", "--alpha", "1"])
    assert "NaN/inf" in _one_line(["sae", "label", "--sae", str(folder), "--capture", str(tmp_path / "nope"),
                                   "--layer", "2"])
