"""`jsae release yaml`: entries that could be merged into SAELens's own pretrained_saes.yaml.

The printed YAML is appended to SAELens's installed pretrained_saes.yaml and read by SAELens's own parser (the
function behind ``get_pretrained_saes_directory``, pointed at that file); then the SAE folders, laid out in a
Hugging Face cache as ``jsae release push`` lays out a hub repo, load with SAELens's stock ``sae_lens`` loader."""

from __future__ import annotations

import json
import re
import shutil
from importlib.resources import files
from pathlib import Path

import jsae  # noqa: F401
import pytest
import torch
import yaml
from sae_lens import SAE
from sae_lens.loading import pretrained_saes_directory as directory_module
from typer.testing import CliRunner

from jsae.cli import app
from jsae.releases.registry import _ORIGINAL_DIRECTORY, _local_dir, all_releases_yaml, saelens_yaml

HUB_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _parse_with_saelens(tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, set[str]]:
    upstream = files("sae_lens").joinpath("pretrained_saes.yaml").read_text()
    (tmp_path / "pretrained_saes.yaml").write_text(upstream + "\n" + text)
    monkeypatch.setattr(directory_module, "files", lambda package: tmp_path)
    parse = _ORIGINAL_DIRECTORY.__wrapped__  # SAELens's parser without its cache
    return parse(), set(yaml.safe_load(upstream))


def test_every_release_parses_with_saelenss_own_parser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = CliRunner().invoke(app, ["release", "yaml"])
    assert r.exit_code == 0, r.output
    printed = yaml.safe_load(r.output)
    ours = all_releases_yaml()
    assert set(printed) == set(ours) and {"jsae-vista-toy-llava-text-sae", "jsae-vista-toy-lm-text-sae"} <= set(printed)
    directory, upstream = _parse_with_saelens(tmp_path, r.output, monkeypatch)
    assert not set(printed) & upstream  # no name clash with SAELens's releases
    for name, entry in ours.items():
        lookup = directory[name]
        assert HUB_REPO.match(lookup.repo_id) and not (Path(str(files("jsae"))) / lookup.repo_id).exists()
        assert lookup.conversion_func is None  # SAELens's stock loader
        assert lookup.model and lookup.model not in ("llava", "qwen3-vl-moe", "toy-llava", "toy-llava-lm")
        if entry["conversion_func"] == "jsae_hub":
            assert lookup.repo_id == entry["repo_id"] and lookup.model == entry["model"]  # the real hub ids
        assert lookup.saes_map == {s["id"]: s["path"] for s in entry["saes"]}
        for s in entry["saes"]:
            if "l0" in s:
                assert lookup.expected_l0[s["id"]] == s["l0"] and lookup.expected_var_explained[s["id"]] == s["variance_explained"]
    assert directory["jsae-llava-l16"].model == "llava-hf/llava-v1.6-mistral-7b-hf"
    assert directory["jsae-vista-toy-llava-text-sae"].expected_l0["model.language_model.layers.4"] == 16.0  # from cfg.json
    r = CliRunner().invoke(app, ["release", "yaml", "jsae-nope"])
    assert r.exit_code == 2 and "unknown release" in r.output


def _fake_hub_cache(cache: Path, repo_id: str, folders: dict[str, Path]) -> None:
    """A Hugging Face cache holding ``repo_id`` with each SAE folder (what `jsae release push` + a download leave)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for folder, src in folders.items():
        dst = repo / "snapshots" / commit / folder
        dst.mkdir(parents=True)
        for f in ("cfg.json", "sae_weights.safetensors"):
            shutil.copy(src / f, dst / f)


@pytest.mark.parametrize("release", ["jsae-shapes-llava-l4", "jsae-vista-toy-llava-text-sae"])
def test_printed_entries_load_with_saelenss_stock_loader(release: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    entry = all_releases_yaml()[release]
    printed = yaml.safe_load(saelens_yaml([release]))[release]
    folders = {s["path"]: _local_dir(entry["repo_id"], s["path"]) for s in entry["saes"]}
    _fake_hub_cache(tmp_path / "hub", printed["repo_id"], folders)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for s in printed["saes"]:
        stock = SAE.from_pretrained(printed["repo_id"], s["path"])  # a hub repo id: SAELens's default sae_lens loader
        shipped = SAE.from_pretrained(release, s["id"])  # jsae's own registry (package folder)
        assert type(stock) is type(shipped)
        cfg = json.loads((folders[s["path"]] / "cfg.json").read_text())
        assert stock.cfg.architecture() == cfg["architecture"]
        for key, value in shipped.state_dict().items():
            assert torch.equal(stock.state_dict()[key], value), key
    if release.startswith("jsae-vista"):
        assert type(stock).__module__.startswith("sae_lens")  # VISTA's text SAEs need nothing of jsae


def test_neuronpedia_ids_of_exported_saes(tmp_path: Path) -> None:
    src = tmp_path / "np" / "jsae-toy-llava" / "4-jsae"
    src.mkdir(parents=True)
    (src / "source.jsonl").write_text(json.dumps({"id": "4-jsae", "modelId": "jsae-toy-llava", "saelensRelease":
                                                  "jsae-shapes-llava-l4", "saelensSaeId": "model.language_model.layers.4"}) + "\n")
    printed = yaml.safe_load(saelens_yaml(neuronpedia=tmp_path / "np"))
    assert printed["jsae-shapes-llava-l4"]["saes"][0]["neuronpedia"] == "jsae-toy-llava/4-jsae"
    assert "neuronpedia" not in printed["jsae-shapes-llava-l6"]["saes"][0]
    with pytest.raises(FileNotFoundError, match="no such directory"):
        saelens_yaml(neuronpedia=tmp_path / "missing")
