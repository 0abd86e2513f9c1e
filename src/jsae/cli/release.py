"""``jsae release ...``: build, list, push and pull jsae releases, and print them in SAELens's own
``pretrained_saes.yaml`` form.  The pipeline behind ``build`` and ``build-shipped`` is
:mod:`jsae.releases.build`; the hub is :mod:`jsae.releases.hub`.

* ``jsae release build --config FILE`` runs one release recipe (a YAML file: model, data, layer, SAE and
  training settings) into ``OUT/<release>/<sae_id>/``; the real-model recipes ship in ``jsae/pretrained/recipes/``.
* ``jsae release build-shipped`` re-trains the toy releases shipped in the package and rewrites their
  entries in ``jsae/releases.yaml``.
* ``jsae release list`` prints every jsae release (shipped, cached or only listed).
* ``jsae release push DIR --repo ORG/NAME`` / ``jsae release pull ORG/NAME``.
* ``jsae release yaml [NAME ...]`` prints the releases as entries of SAELens's ``pretrained_saes.yaml``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from jsae.cli._common import D_SAE, STEPS, OneLineGroup, fail, int_list

release_app = typer.Typer(help="jsae releases: build, list, push to and pull from the Hugging Face Hub, print for SAELens.",
                          no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineGroup)


@release_app.command("build")
def build(
    config: Path = typer.Option(..., help="recipe YAML, or the name of a shipped recipe (jsae-llava-l16, ...)"),
    out: Path = typer.Option(Path("releases"), help="output root: OUT/<release>/<sae_id>/"),
    work_dir: Optional[Path] = typer.Option(None, help="keep the captures and training checkpoints here (a re-run resumes)"),
) -> None:
    """Produce a release from its recipe: capture, train the JSAE, label its features."""
    from jsae.releases.build import BuildConfig, build_release

    try:
        cfg = BuildConfig.from_file(config)
        entries = build_release(cfg, out, work_dir=work_dir)
    except (FileNotFoundError, ValueError, OSError) as exc:
        fail(str(exc))
    e = entries[0]
    typer.echo(f"built {out / e['name'] / e['hook']} (L0 {e['sae']['l0']:.1f}, variance explained "
               f"{e['sae']['variance_explained']:.3f}); publish it with: jsae release push {out / e['name']} --repo "
               f"{cfg.repo_id or 'ORG/NAME'}")


@release_app.command("build-shipped")
def build_shipped(
    models: Optional[str] = typer.Option(None, help="comma-separated toy models (default: every shipped one)"),
    layers: Optional[str] = typer.Option(None, help="comma-separated decoder layers (default: the shipped ones)"),
    steps: int = typer.Option(600, callback=STEPS),
    d_sae: int = typer.Option(128, callback=D_SAE),
    out: Optional[Path] = typer.Option(None, help="default: the installed package's pretrained/ (and its releases.yaml)"),
) -> None:
    """Re-train the toy releases shipped with jsae and rewrite their releases.yaml entries."""
    kwargs: dict = {}
    if models:
        kwargs["models"] = tuple(m for m in models.split(",") if m)
    if layers:
        kwargs["layers"] = tuple(int_list(layers, "--layers"))
    from jsae.releases.build import build_shipped as build_all

    t0 = time.time()
    try:
        data = build_all(out_root=out, yaml_path=(out / "releases.yaml") if out else None, steps=steps, d_sae=d_sae,
                         **kwargs)
    except (ValueError, OSError) as exc:
        fail(str(exc))
    for name, e in data.items():
        if e.get("conversion_func") == "jsae_local":
            s = e["saes"][0]
            typer.echo(f"{name}: L0 {s['l0']:.1f}, variance explained {s['variance_explained']:.3f}")
    typer.echo(f"done in {time.time() - t0:.0f} s")


@release_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="every field (hook, SAE ids, where, recipe) as JSON")) -> None:
    """List jsae releases as a table: name, status (shipped / hub / unpublished), model, layer, L0, variance
    explained; how to produce the unpublished ones."""
    from jsae.releases.build import list_releases, releases_table

    rows = list_releases()
    typer.echo(json.dumps(rows, indent=1) if as_json else releases_table(rows))


@release_app.command("push")
def push(
    directory: Path = typer.Argument(..., help="a jsae SAE directory (cfg.json) or a folder of them (<sae_id>/cfg.json)"),
    repo: str = typer.Option(..., help="ORG/NAME"),
    hub: Optional[str] = typer.Option(None, help="hub endpoint URL, or a local directory / file:// URL standing in for it"),
    token: Optional[str] = typer.Option(None, envvar="HF_TOKEN"),
    private: bool = typer.Option(False),
) -> None:
    """Upload a JSAE (SAELens layout + model card) to the Hugging Face Hub."""
    from jsae.releases.hub import local_root, revisions
    from jsae.releases.hub import push as push_dir

    try:
        url = push_dir(directory, repo, endpoint=hub, token=token, private=private)
        rev = f" (revision {revisions(repo, endpoint=hub)[0]})" if local_root(hub) is not None else ""
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        fail(str(exc))
    typer.echo(f"pushed {directory} -> {url}{rev}")


@release_app.command("pull")
def pull(
    repo: str = typer.Argument(..., help="ORG/NAME, or the name of a listed hub release (jsae-llava-l16)"),
    out: Optional[Path] = typer.Option(None, help="local directory (default: the Hugging Face cache, where "
                                                  "SAE.from_pretrained finds it offline)"),
    hub: Optional[str] = typer.Option(None, help="hub endpoint URL, or a local directory / file:// URL standing in for it"),
    revision: Optional[str] = typer.Option(None, help="a commit id (at least 7 characters) or branch; default: main"),
    token: Optional[str] = typer.Option(None, envvar="HF_TOKEN"),
) -> None:
    """Download a pushed JSAE repo and check every SAE in it."""
    from jsae.releases.hub import pull as pull_repo
    from jsae.releases.registry import RELEASES

    if repo in RELEASES and RELEASES[repo].conversion_func == "jsae_hub":
        repo = RELEASES[repo].repo_id
    try:
        path = pull_repo(repo, out, endpoint=hub, revision=revision, token=token)
    except (FileNotFoundError, ValueError, OSError, RuntimeError) as exc:
        fail(str(exc))
    typer.echo(str(path))


@release_app.command("yaml")
def yaml_(
    names: Optional[list[str]] = typer.Argument(None, help="releases to print (default: every jsae release, VISTA's too)"),
    neuronpedia: Optional[Path] = typer.Option(None, help="the --out of `jsae look export-neuronpedia`: adds the "
                                                          "neuronpedia id of each exported SAE"),
) -> None:
    """Print the releases as entries of SAELens's own pretrained_saes.yaml (hub repos, SAELens's stock loader, model
    ids), ready to propose upstream."""
    from jsae.releases.registry import saelens_yaml

    try:
        text = saelens_yaml(list(names) if names else None, neuronpedia=neuronpedia)
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    typer.echo(text, nl=False)


__all__ = ["build", "build_shipped", "list_", "pull", "push", "release_app", "yaml_"]
