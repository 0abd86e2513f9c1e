"""Releases by name (offline), the hub round trip over a local stand-in hub, interrupted uploads, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import jsae  # noqa: F401
import pytest
import torch
import yaml
from typer.testing import CliRunner

from jsae.releases import hub
from jsae.cli.release import release_app
from jsae.releases.build import BuildConfig, list_releases, read_releases_yaml
from jsae.releases.registry import PACKAGE_ROOT, RELEASES, register_release, unregister_release
from jsae.saes.joint_sae import JointSAE

torch.set_num_threads(1)

SHIPPED = sorted(n for n, e in read_releases_yaml().items() if e.get("conversion_func") == "jsae_local")
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="no shipped release built yet: run `jsae release build-shipped`")


def _release_dir(name: str) -> Path:
    return PACKAGE_ROOT / RELEASES[name].repo_id


# ---- releases by name ---------------------------------------------------------------------------


@needs_shipped
def test_shipped_releases_are_listed_with_their_files_and_metrics() -> None:
    data = read_releases_yaml()
    assert {"jsae-shapes-llava-l4", "jsae-shapes-qwen3-vl-moe-l4"} <= set(SHIPPED)
    for name in SHIPPED:
        e = data[name]
        assert e["layer"] == int(name.rsplit("-l", 1)[1]) and e["hook"].endswith(f".{e['layer']}")
        (s,) = e["saes"]
        folder = _release_dir(name) / s["path"]
        for f in ("cfg.json", "sae_weights.safetensors", "labels.json", "metrics.json"):
            assert (folder / f).is_file(), folder / f
        metrics = json.loads((folder / "metrics.json").read_text())
        assert s["l0"] == pytest.approx(metrics["l0"], abs=1e-3) and 0 < s["l0"] <= e["d_sae"] <= 256
        assert s["variance_explained"] == pytest.approx(metrics["variance_explained"], abs=1e-3)
        assert 0.3 < s["variance_explained"] <= 1.0  # a trained SAE, not noise


@needs_shipped
def test_shipped_releases_were_trained_on_the_shipped_toy_models() -> None:
    from jsae.releases.build import toy_model_sha256

    data = read_releases_yaml()
    stale = [n for n in SHIPPED if data[n].get("model_weights_sha256") != toy_model_sha256(data[n]["model"])]
    assert not stale, f"shipped releases {stale} were trained on other toy-model weights; run `jsae release build-shipped`"


@needs_shipped
def test_shipped_release_loads_by_name_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as C
    from sae_lens import SAE

    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    sae = JointSAE.from_pretrained("jsae-shapes-llava-l4")
    sid = "model.language_model.layers.4"
    same = SAE.from_pretrained("jsae-shapes-llava-l4", sid)
    assert isinstance(same, JointSAE) and same.cfg.metadata.hf_hook_name == sid and sae.cfg.metadata.layer == 4
    assert same.cfg.metadata.hook_name == "blocks.4.hook_out"
    x = torch.randn(3, sae.cfg.d_in)
    for m in ("vision", "text"):
        assert torch.equal(sae.encode(x, m), same.encode(x, m))
    # the registry's numbers are the SAE's: recompute L0 on held-out pooled pairs is done at build; here check shapes
    assert sae.W_dec_of("vision").shape == (sae.cfg.d_sae, sae.cfg.d_in)


def test_listed_real_release_offline_gives_the_recipe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unpublished release (placeholder repo) fails at once naming its recipe; a published one that is neither
    cached nor reachable fails at once too (no retries of the hub client: well under a second)."""
    import time

    import huggingface_hub.constants as C

    from jsae.releases.registry import register_release, unregister_release

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))  # an empty cache
    with pytest.raises(RuntimeError) as err:
        JointSAE.from_pretrained("jsae-llava-l16")
    msg = str(err.value)
    assert "'jsae-llava-l16' is not published yet" in msg and "\n" not in msg
    assert "jsae release build --config jsae-llava-l16" in msg
    register_release("jsae-test-uncached", repo_id="someone/uncached", model="m", saes=[{"id": "a", "path": "a"}],
                     recipe="jsae release build --config X")
    try:
        for offline in (True, False):  # HF_HUB_OFFLINE=1, or online mode on a machine without a route to the hub
            monkeypatch.setattr(C, "HF_HUB_OFFLINE", offline)
            monkeypatch.setattr(C, "ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
            t0 = time.perf_counter()
            with pytest.raises(RuntimeError) as err:
                JointSAE.from_pretrained("jsae-test-uncached", "a")
            assert time.perf_counter() - t0 < 5
            msg = str(err.value)
            assert "'jsae-test-uncached'" in msg and "not in the local Hugging Face cache" in msg and "\n" not in msg
            assert "jsae release build --config X" in msg
    finally:
        unregister_release("jsae-test-uncached")


def test_unknown_release_lists_close_names() -> None:
    with pytest.raises(ValueError, match="did you mean.*jsae-llava-l16"):
        JointSAE.from_pretrained("jsae-lava-l16")
    with pytest.raises(ValueError, match="has no SAE 'layer_3'"):
        JointSAE.from_pretrained("jsae-llava-l16", "layer_3")


def test_release_list_and_recipes() -> None:
    rows = {r["release"]: r for r in list_releases()}
    assert rows["jsae-llava-l16"]["model"] == "llava-hf/llava-v1.6-mistral-7b-hf" and rows["jsae-llava-l16"]["layer"] == 16
    assert rows["jsae-llava-l16"]["kind"] == "jsae_hub" and "jsae release build" in rows["jsae-llava-l16"]["recipe"]
    assert rows["jsae-llava-l16"]["status"] == "unpublished" and rows["jsae-llava-l16"]["l0"] is None
    assert rows["jsae-shapes-llava-l4"]["status"] == "shipped" and 0 < rows["jsae-shapes-llava-l4"]["l0"] < 128
    r = CliRunner().invoke(release_app, ["list"])
    assert r.exit_code == 0, r.output
    table = {line.split()[0]: line.split() for line in r.output.splitlines()[2:] if line.startswith("jsae-")
             and "not published" not in line}
    assert table["jsae-llava-l16"][1:] == ["unpublished", "llava-hf/llava-v1.6-mistral-7b-hf", "16"]  # no metrics
    assert table["jsae-shapes-llava-l4"][1] == "shipped" and float(table["jsae-shapes-llava-l4"][4]) > 0
    assert "jsae-llava-l16 is not published yet; produce it with: jsae release build" in r.output
    r = CliRunner().invoke(release_app, ["list", "--json"])
    assert {row["release"] for row in json.loads(r.output)} == set(rows)
    cfg = BuildConfig.from_file("jsae-llava-l16")  # a shipped recipe, by name
    assert (cfg.model, cfg.layer, cfg.release) == ("llava-hf/llava-v1.6-mistral-7b-hf", 16, "jsae-llava-l16")


def test_recipe_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "r.yaml"
    bad.write_text(yaml.safe_dump({"release": "x", "model": "llava", "layer": 2, "stepz": 3}))
    with pytest.raises(ValueError, match=r"unknown recipe key\(s\) \['stepz'\]"):
        BuildConfig.from_file(bad)
    r = CliRunner().invoke(release_app, ["build", "--config", str(tmp_path / "missing.yaml")])
    assert r.exit_code == 2 and "no recipe file" in r.output


# ---- hub round trip (a local directory stands in for the Hub) ------------------------------------


@pytest.fixture()
def sae_dir(tmp_path: Path) -> Path:
    """A small labelled JSAE in SAELens layout (a release folder holding one <sae_id>/ folder)."""
    cfg = jsae.JointSAEConfig(d_in=16, d_sae=32)
    for k, v in {"model_name": "llava", "hook_name": "model.language_model.layers.2", "layer": 2, "pooling": "mean",
                 "alignment": "cosine"}.items():
        cfg.metadata[k] = v
    torch.manual_seed(0)
    sae = JointSAE(cfg)
    folder = tmp_path / "rel" / "model.language_model.layers.2"
    sae.save_model(folder)
    (folder / "metrics.json").write_text(json.dumps({"l0": 5.5, "variance_explained": 0.8, "variance_explained_vision": 0.7}))
    (folder / "labels.json").write_text(json.dumps({"concepts": ["cat"], "labels": []}))
    return tmp_path / "rel"


def test_push_pull_round_trip(tmp_path: Path, sae_dir: Path) -> None:
    from sae_lens import SAE

    hub_root = tmp_path / "hub"
    url = hub.push(sae_dir, "jsae-test/toy-l2", endpoint=hub_root)
    repo = hub_root / "jsae-test" / "toy-l2"
    assert url == repo.as_uri()
    card = (repo / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "saelens" and "jsae" in front["tags"]
    assert 'SAE.from_pretrained("jsae-test/toy-l2", "model.language_model.layers.2")' in card
    assert "| `model.language_model.layers.2` | llava | 2 | mean | cosine | 16 | 32 | relu | 5.500 | 0.800 | 0.700 | yes |" in card
    assert sorted(p.name for p in (repo / "model.language_model.layers.2").iterdir()) == [
        "cfg.json", "labels.json", "metrics.json", "sae_weights.safetensors"]

    out = hub.pull("jsae-test/toy-l2", tmp_path / "pulled", endpoint=f"file://{hub_root}")
    original = JointSAE.load_from_disk(sae_dir / "model.language_model.layers.2")
    pulled = JointSAE.load_from_disk(out / "model.language_model.layers.2")
    x = torch.randn(4, 16)
    assert torch.equal(original(x, "vision"), pulled(x, "vision")) and torch.equal(original(x), pulled(x))
    # and through SAELens by name once registered as a local release
    register_release("jsae-test-pulled", repo_id=str(out), model="llava", conversion_func="jsae_local",
                     saes=[{"id": "model.language_model.layers.2", "path": "model.language_model.layers.2"}])
    try:
        loaded = SAE.from_pretrained("jsae-test-pulled", "model.language_model.layers.2")
        assert torch.equal(loaded(x), original(x))
    finally:
        unregister_release("jsae-test-pulled")


def test_cli_push_pull(tmp_path: Path, sae_dir: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(release_app, ["push", str(sae_dir / "model.language_model.layers.2"), "--repo", "org/one",
                                    "--hub", str(tmp_path / "hub")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(release_app, ["pull", "org/one", "--out", str(tmp_path / "o"), "--hub", str(tmp_path / "hub")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "o" / "model.language_model.layers.2" / "cfg.json").is_file()  # single SAE: folder = its hook name


def test_interrupted_upload_leaves_no_partial_repo(tmp_path: Path, sae_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hub_root = tmp_path / "hub"
    real_copy = hub._copy_file
    calls = {"n": 0}

    def failing_copy(src: Path, dst: Path) -> None:  # the disk fills up after one file lands in the hub
        if str(hub_root) in str(dst):
            calls["n"] += 1
            if calls["n"] == 2:
                raise OSError(28, "No space left on device")
        real_copy(src, dst)

    # 1. a first push interrupted midway: the repo does not exist
    monkeypatch.setattr(hub, "_copy_file", failing_copy)
    with pytest.raises(OSError, match="No space left"):
        hub.push(sae_dir, "org/rel", endpoint=hub_root)
    assert not (hub_root / "org" / "rel").exists()
    assert [p.name for p in (hub_root / "org").iterdir()] == []  # no temporary left behind
    with pytest.raises(FileNotFoundError, match="not found"):
        hub.pull("org/rel", tmp_path / "p0", endpoint=hub_root)

    # 2. a complete push, then an interrupted second one: the first revision stays, intact
    monkeypatch.setattr(hub, "_copy_file", real_copy)
    hub.push(sae_dir, "org/rel", endpoint=hub_root)
    repo = hub_root / "org" / "rel"
    before = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    torch.manual_seed(1)
    new = JointSAE.load_from_disk(sae_dir / "model.language_model.layers.2")
    with torch.no_grad():
        new.vision.W_dec.add_(1.0)
    new.save_model(sae_dir / "model.language_model.layers.2")
    calls["n"] = 0
    monkeypatch.setattr(hub, "_copy_file", failing_copy)
    with pytest.raises(OSError):
        hub.push(sae_dir, "org/rel", endpoint=hub_root)
    after = {p.relative_to(repo): p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in (hub_root / "org").iterdir()) == ["rel"]
    pulled = hub.pull("org/rel", tmp_path / "p1", endpoint=hub_root)
    assert not torch.equal(JointSAE.load_from_disk(pulled / "model.language_model.layers.2").vision.W_dec, new.vision.W_dec)

    # 3. the retry succeeds and publishes the new weights
    monkeypatch.setattr(hub, "_copy_file", real_copy)
    hub.push(sae_dir, "org/rel", endpoint=hub_root)
    pulled = hub.pull("org/rel", tmp_path / "p2", endpoint=hub_root)
    assert torch.equal(JointSAE.load_from_disk(pulled / "model.language_model.layers.2").vision.W_dec, new.vision.W_dec)


def test_corrupt_repo_is_refused_on_pull(tmp_path: Path, sae_dir: Path) -> None:
    hub.push(sae_dir, "org/c", endpoint=tmp_path / "hub")
    w = tmp_path / "hub" / "org" / "c" / "model.language_model.layers.2" / "sae_weights.safetensors"
    w.write_bytes(w.read_bytes()[:-4] + b"\0\0\0\1")
    with pytest.raises(ValueError, match="checksum"):
        hub.pull("org/c", tmp_path / "out", endpoint=tmp_path / "hub")
    assert not (tmp_path / "out").exists()


def test_push_refuses_what_is_not_a_jsae_sae(tmp_path: Path) -> None:
    from sae_lens import StandardSAE, StandardSAEConfig

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="is not a jsae SAE: no cfg.json"):
        hub.push(empty, "org/x", endpoint=tmp_path / "hub")
    StandardSAE(StandardSAEConfig(d_in=8, d_sae=16)).save_model(str(tmp_path / "std"))
    with pytest.raises(ValueError, match="holds a 'standard' SAE, not a 'jsae' one"):
        hub.push(tmp_path / "std", "org/x", endpoint=tmp_path / "hub")
    with pytest.raises(ValueError, match="not of the form ORG/NAME"):
        hub.push(empty, "no-slash", endpoint=tmp_path / "hub")
    r = CliRunner().invoke(release_app, ["push", str(empty), "--repo", "org/x", "--hub", str(tmp_path / "hub")])
    assert r.exit_code == 2 and r.output.startswith("error:") and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "hub" / "org" / "x").exists()


def test_build_shipped_is_rerunnable_and_loads_by_name(tmp_path: Path) -> None:
    from sae_lens import SAE

    from jsae.releases.build import build_shipped

    yaml_path = tmp_path / "releases.yaml"
    yaml_path.write_text(yaml.safe_dump({"jsae-llava-l16": read_releases_yaml()["jsae-llava-l16"]}))
    kw = dict(models=("llava",), layers=(2,), out_root=tmp_path, yaml_path=yaml_path, steps=20, d_sae=32, n_train=64,
              n_label=32, progress=False)
    build_shipped(**kw)
    first = (tmp_path / "jsae-shapes-llava-l2" / "model.language_model.layers.2" / "sae_weights.safetensors").read_bytes()
    data = build_shipped(**kw)  # a second run replaces the release in place
    assert set(data) == {"jsae-llava-l16", "jsae-shapes-llava-l2"}  # other entries are kept
    e = data["jsae-shapes-llava-l2"]
    assert (e["conversion_func"], e["layer"], e["d_sae"], e["saes"][0]["id"]) == ("jsae_local", 2, 32, "model.language_model.layers.2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["jsae-shapes-llava-l2", "releases.yaml"]  # no temporaries
    folder = tmp_path / "jsae-shapes-llava-l2" / "model.language_model.layers.2"
    assert (folder / "sae_weights.safetensors").read_bytes() == first  # seeded: the same SAE again
    register_release("jsae-test-built", repo_id=str(tmp_path / "jsae-shapes-llava-l2"), model="llava",
                     conversion_func="jsae_local", saes=e["saes"])
    try:
        sae = SAE.from_pretrained("jsae-test-built", "model.language_model.layers.2")
        assert isinstance(sae, JointSAE) and sae.cfg.metadata.layer == 2 and sae.cfg.d_sae == 32
    finally:
        unregister_release("jsae-test-built")
    with pytest.raises(ValueError, match="d_sae=512 > 256"):
        build_shipped(**{**kw, "d_sae": 512})


def test_unreachable_hub_gives_one_line_error(tmp_path: Path, sae_dir: Path) -> None:
    # the HfApi backend, pointed at a closed port on this machine (no network is used)
    with pytest.raises(RuntimeError, match=r"could not push to 'org/x' on the Hugging Face Hub .*--hub DIR") as err:
        hub.push(sae_dir, "org/x", endpoint="http://127.0.0.1:9", token="hf_test")
    assert "\n" not in str(err.value)
    with pytest.raises(RuntimeError, match=r"could not pull 'org/x'"):
        hub.pull("org/x", tmp_path / "p", endpoint="http://127.0.0.1:9", token="hf_test")
    assert not (tmp_path / "p" / "model.language_model.layers.2").exists()


def test_pull_into_the_hf_cache_then_load_by_name_offline(tmp_path: Path, sae_dir: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as C
    from sae_lens import SAE

    monkeypatch.setattr(C, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    hub.push(sae_dir, "jsae-test/cached", endpoint=tmp_path / "hub")
    snap = hub.pull("jsae-test/cached", endpoint=tmp_path / "hub")  # default: the Hugging Face cache
    assert snap.parent.name == "snapshots" and snap.parent.parent.name == "models--jsae-test--cached"
    sid = "model.language_model.layers.2"
    original = JointSAE.load_from_disk(sae_dir / sid)
    x = torch.randn(4, 16)
    by_repo = SAE.from_pretrained("jsae-test/cached", sid)  # SAELens's own hub loader, offline, from the cache
    assert isinstance(by_repo, JointSAE) and torch.equal(by_repo(x, "vision"), original(x, "vision"))
    register_release("jsae-test-hub", repo_id="jsae-test/cached", model="llava", saes=[{"id": sid, "path": sid}],
                     recipe="jsae release push DIR --repo jsae-test/cached")  # a listed hub release (jsae_hub)
    try:
        assert torch.equal(JointSAE.from_pretrained("jsae-test-hub")(x), original(x))
    finally:
        unregister_release("jsae-test-hub")


def test_recipe_build_on_a_caption_dataset(tmp_path: Path) -> None:
    """The real-model recipe path (`jsae release build --config`): a caption dataset instead of the world,
    concepts from caption words, here on the toy LLaVA and a small saved dataset."""
    from jsae.labels import FeatureLabels
    from jsae.world import world_dataset

    world_dataset("train", 64, 1).save_to_disk(str(tmp_path / "captions"))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"release": "jsae-test-recipe", "model": "llava", "layer": 3,
                                      "data": str(tmp_path / "captions"), "n_train": 64, "n_label": 48, "steps": 15,
                                      "d_sae": 32, "activation": "topk", "k": 4, "alignment": "infonce",
                                      "capture_batch_size": 32}))
    args = ["build", "--config", str(recipe), "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work")]
    r = CliRunner().invoke(release_app, args)
    assert r.exit_code == 0, r.output
    assert "jsae release push" in r.output
    folder = tmp_path / "out" / "jsae-test-recipe" / "model.language_model.layers.3"
    first = (folder / "sae_weights.safetensors").read_bytes()
    assert (tmp_path / "work" / "ckpt-jsae-test-recipe").is_dir()
    r = CliRunner().invoke(release_app, args)  # a re-run reuses the captures and the finished training
    assert r.exit_code == 0 and (folder / "sae_weights.safetensors").read_bytes() == first
    sae = JointSAE.load_from_disk(folder)
    assert (sae.cfg.activation, sae.cfg.k, sae.cfg.metadata.alignment, sae.cfg.metadata.layer) == ("topk", 4, "infonce", 3)
    labels = FeatureLabels.load(folder / "labels.json")
    words = {w for ex in world_dataset("train", 64, 1).select(range(48)) for w in ex["caption"].split()}
    assert set(labels.concepts) <= words and {"top", "left"} <= set(labels.concepts)  # caption words, not world labels
    assert json.loads((folder / "metrics.json").read_text())["l0"] <= 4
