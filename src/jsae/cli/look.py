"""``jsae look ...``: look at a labelled JSAE (a folder or a release name): the feature browser
(``features``), the Neuronpedia export (``export-neuronpedia``) and SAELens's core metrics (``core-metrics``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from jsae.cli._common import OneLineGroup, fail, number, world_pairs

look_app = typer.Typer(help="Look at a JSAE: feature browser, Neuronpedia export, SAELens core metrics.",
                       no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineGroup)


@look_app.command("features")
def features(
    sae: str = typer.Argument(..., help="a labelled JSAE folder (e.g. RUN/saes/jsae/layer_4) or a shipped release name"),
    out: Optional[Path] = typer.Option(None, help="HTML file (default: SAE/features.html; for a release name ./RELEASE-features.html)"),
    model: Optional[str] = typer.Option(None, help="toy model (default: the SAE's metadata.model_name)"),
    n_features: int = typer.Option(24, callback=number(1)),
    n_pairs: int = typer.Option(200, help="held-out world pairs to rank images and captions", callback=world_pairs()),
) -> None:
    """Write the self-contained feature browser (features.html) of one labelled JSAE."""
    from jsae.report.browser import feature_page

    try:
        path = feature_page(sae, out, model=model, n_features=n_features, n_pairs=n_pairs)
    except (FileNotFoundError, ValueError, NotImplementedError) as exc:
        fail(str(exc))
    typer.echo(str(path))


@look_app.command("export-neuronpedia")
def export_neuronpedia(
    sae: str = typer.Argument(..., help="a JSAE folder or a shipped release name (labels, if any, go to the jsae extension)"),
    out: Path = typer.Option(Path("neuronpedia"), help="export root: OUT/{model}/{source}/"),
    source_set: str = typer.Option("jsae", help="Neuronpedia source set id (the source is LAYER-SOURCE_SET)"),
    hf_repo_id: Optional[str] = typer.Option(None, help="where the weights are published (source.hfRepoId)"),
    n_features: Optional[int] = typer.Option(None, help="default: every live feature (most active first)", callback=number(1)),
    n_examples: int = typer.Option(8, help="top images and top captions per feature", callback=number(1)),
    n_pairs: int = typer.Option(200, callback=world_pairs()),
) -> None:
    """Export every live feature as Neuronpedia upload records (its export schema), jsae's fields in OUT/.../jsae/."""
    from jsae.report.neuronpedia import export_neuronpedia as export

    try:
        path = export(sae, out, source_set=source_set, hf_repo_id=hf_repo_id, n_features=n_features,
                      n_examples=n_examples, n_pairs=n_pairs)
    except (FileNotFoundError, ValueError, NotImplementedError) as exc:
        fail(str(exc))
    typer.echo(str(path))


@look_app.command("core-metrics")
def core_metrics(
    sae: str = typer.Argument(..., help="a JSAE folder or a release name"),
    model: Optional[str] = typer.Option(None, help="toy model (default: the SAE's metadata.model_name)"),
    modality: str = typer.Option("text", help="branch to evaluate"),
    n_captions: int = typer.Option(256, callback=world_pairs()),
    out: Optional[Path] = typer.Option(None, help="write the metrics JSON here too"),
) -> None:
    """SAELens's core metrics of one JSAE branch (as a SAEBench custom SAE) on the toy VLM's language model."""
    from jsae.releases.saebench import JSAEBranchSAE
    from jsae.releases.saebench import core_metrics as metrics
    from jsae.report.rundir import resolve_sae_dir
    from jsae.saes.joint_sae import JointSAE

    try:
        jointsae = JointSAE.load_from_disk(resolve_sae_dir(sae))
        bench = JSAEBranchSAE(jointsae, modality)
        result = metrics(bench, model or jointsae.cfg.metadata.get("model_name") or "llava", n_captions=n_captions)
    except (FileNotFoundError, ValueError, NotImplementedError) as exc:
        fail(str(exc))
    text = json.dumps(result, indent=1)
    if out:
        out.write_text(text)
    typer.echo(text)


__all__ = ["core_metrics", "export_neuronpedia", "features", "look_app"]
