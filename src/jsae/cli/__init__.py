"""The ``jsae`` command line (typer): ``demo``, ``capture``, ``train``, ``label``, ``steer``, ``sweep`` and
the ``world`` commands.  Every long step shows a progress bar; every run writes into its own directory."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from jsae.releases.build import core_metrics_cmd, export_cmd, features_cmd, release_app
from jsae.cli.vista import vista_app
from jsae.cli.world import world_app

app = typer.Typer(help="Joint Sparse Autoencoders, VISTA and SAE steering for vision-language models.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
app.add_typer(world_app, name="world")
app.add_typer(release_app, name="release")
app.add_typer(vista_app, name="vista")
app.command("features")(features_cmd)
app.command("export-neuronpedia")(export_cmd)
app.command("core-metrics")(core_metrics_cmd)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _layers(spec: str | None) -> list[int] | None:
    if not spec:
        return None
    try:
        return [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        _fail(f"--layers must be comma-separated integers like 0,3,5,7, got {spec!r}")
        return None


def _world_pairs(split: str, n: int, seed: int):
    from jsae.world import world_dataset

    ds = world_dataset(split, n, seed)
    return ds, [(ex["image"], ex["caption"]) for ex in ds]


@app.command()
def version() -> None:
    """Print the jsae version."""
    import jsae

    typer.echo(jsae.__version__)


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="results directory (report.md, metrics.json, layer_sweep.png, features.html)"),
    model: str = typer.Option("llava", help="llava | qwen3-vl-moe (shipped toy models), or a hub id / path of a real VLM (needs --data)"),
    data: Optional[str] = typer.Option(None, help="a COCO-captions-style dataset (path or hub id): caption words become the concepts"),
    data_split: str = typer.Option("train", help="split of --data; its rows are cut into train, label and sweep slices"),
    prompt: Optional[str] = typer.Option(None, help="captioning prompt (default: none on the world, 'Describe the image.' on real data)"),
    layers: Optional[str] = typer.Option(None, help="comma-separated decoder layers to sweep (default: 4 spread over the depth)"),
    steps: int = typer.Option(600, help="training steps of every SAE"),
    d_sae: int = typer.Option(128, help="SAE width"),
    n_train: int = typer.Option(2000, min=1, help="training pairs"),
    n_label: int = typer.Option(400, min=1, help="held-out pairs for feature labels"),
    n_eval: int = typer.Option(1200, min=1, help="held-out images for the steering/suppression sweep"),
    n_max: int = typer.Option(400, help="most images per (concept, layer, method) cell"),
    concepts: Optional[str] = typer.Option(None, help="comma-separated concepts (default: the best-covered by shared features)"),
    min_count: int = typer.Option(5, min=1, help="real data: a caption word is a concept when this many labelling captions have it"),
    max_perplexity: Optional[float] = typer.Option(None, help="real data: fluency threshold on the no-image perplexity (default: 1.5x the 95th percentile of unsteered captions)"),
    max_new_tokens: int = typer.Option(28, min=1, help="greedy caption length"),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, help="replace a directory that holds another run"),
) -> None:
    """The JSAE paper's protocol end to end: capture, train per layer, label, steer/suppress sweep, report."""
    from jsae.protocol.run import ARTEFACTS, DemoConfig, run_demo

    cfg = DemoConfig(model=model, layers=_layers(layers), steps=steps, d_sae=d_sae, n_train=n_train, n_label=n_label,
                     n_eval=n_eval, n_max=n_max, concepts=concepts.split(",") if concepts else None, seed=seed, data=data,
                     data_split=data_split, prompt=prompt, min_count=min_count, max_perplexity=max_perplexity,
                     max_new_tokens=max_new_tokens)
    try:
        metrics = run_demo(out, cfg, overwrite=overwrite)
    except (FileExistsError, ValueError, OSError) as exc:
        _fail(str(exc))
        return
    typer.echo(f"done in {metrics['timings']['total_s']:.0f} s: " + ", ".join(str(out / a) for a in ARTEFACTS))


@app.command()
def capture(
    out: Path = typer.Option(..., help="capture directory (manifest.json + shards)"),
    model: str = typer.Option("llava", help="toy model name, or a hub id / path of a real VLM"),
    layers: str = typer.Option(..., help="comma-separated decoder layers"),
    split: str = typer.Option("train", help="world split (train | validation | test)"),
    n: int = typer.Option(2000, help="number of world pairs"),
    data: Optional[str] = typer.Option(None, help="a COCO-captions-style dataset (path or hub id) instead of the world"),
    pooling: str = typer.Option("mean", help="mean | max | last"),
    batch_size: int = typer.Option(32),
    seed: int = typer.Option(0),
) -> None:
    """Capture pooled (image, caption) activations at the given layers (resumable)."""
    from jsae.capture import capture_pairs
    from jsae.protocol.run import load_model

    m, processor, adapter, _ = load_model(model)
    if data:
        from jsae.world import load_caption_dataset

        ds = load_caption_dataset(data, split=split)
        pairs = [(ex["image"], ex["caption"]) for ex in ds]
    else:
        _, pairs = _world_pairs(split, n, seed)
    try:
        capture_pairs(m, pairs, layers=_layers(layers) or [], out_dir=out, processor=processor, adapter=adapter,
                      pooling=pooling, batch_size=batch_size)  # type: ignore[arg-type]
    except ValueError as exc:
        _fail(str(exc))
    typer.echo(f"captured {len(pairs)} pairs into {out}")


@app.command()
def train(
    capture_dir: Path = typer.Option(..., "--capture", help="capture directory"),
    layer: int = typer.Option(..., help="captured layer to train on"),
    out: Path = typer.Option(..., help="SAE directory to write (SAELens layout)"),
    alignment: str = typer.Option("cosine", help="cosine | infonce | l2 | none"),
    activation: str = typer.Option("relu", help="relu (with L1) | topk"),
    k: int = typer.Option(32, help="k of topk"),
    d_sae: int = typer.Option(1024),
    steps: int = typer.Option(2000),
    batch_size: int = typer.Option(256),
    lr: float = typer.Option(3e-4),
    l1_coefficient: float = typer.Option(0.03),
    checkpoint_dir: Optional[Path] = typer.Option(None, help="checkpoints every 500 steps; resumes if it holds one"),
    seed: int = typer.Option(0),
) -> None:
    """Train a JSAE on captured pairs of one layer."""
    from jsae.capture import read_manifest
    from jsae.training import load_pairs
    from jsae.saes.joint_sae import TrainingJointSAEConfig
    from jsae.training.trainer import JointSAETrainer, JointTrainerConfig

    try:
        data = load_pairs(capture_dir, layer, batch_size=batch_size, seed=seed)
        manifest = read_manifest(capture_dir)
        cfg = TrainingJointSAEConfig(d_in=data.d_in, d_sae=d_sae, alignment=alignment, activation=activation, k=k,
                                     l1_coefficient=l1_coefficient, mse_normalization="variance")
        for key, value in {"model_name": manifest.get("model"), "layer": layer, "pooling": manifest.get("pooling"),
                           "hook_name": dict(zip(manifest["layers"], manifest["hook_names"])).get(layer)}.items():
            cfg.metadata[key] = value
        tcfg = JointTrainerConfig(total_steps=steps, lr=lr, lr_warm_up_steps=steps // 20, lr_decay_steps=steps // 5,
                                  checkpoint_every=500 if checkpoint_dir else 0,
                                  checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None, seed=seed)
        sae = JointSAETrainer.from_config(cfg, tcfg, data).fit()
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    sae.save_inference_model(out)
    typer.echo(f"saved {out}")


@app.command()
def label(
    sae_dir: Path = typer.Option(..., "--sae", help="JSAE directory"),
    capture_dir: Path = typer.Option(..., "--capture", help="capture of held-out pairs (same order as the data)"),
    layer: int = typer.Option(...),
    split: str = typer.Option("validation", help="world split the capture was made from"),
    n: int = typer.Option(400),
    data: Optional[str] = typer.Option(None, help="caption dataset the capture was made from (words become concepts)"),
    seed: int = typer.Option(0),
    min_corr: float = typer.Option(0.3),
) -> None:
    """Label every feature with its concept (world ground truth, or caption words) -> labels.json."""
    import torch

    from jsae.training import load_pairs
    from jsae.labels import concepts_from_captions, label_features
    from jsae.world.concepts import concept_presence, world_concepts
    from jsae.saes.joint_sae import JointSAE

    try:
        sae = JointSAE.load_from_disk(sae_dir)
        pairs = load_pairs(capture_dir, layer, batch_size=1, shuffle=False)
        if data:
            from jsae.world import load_caption_dataset

            y, names = concepts_from_captions([ex["caption"] for ex in load_caption_dataset(data, split=split)])
        else:
            ds, _ = _world_pairs(split, n, seed)
            names = world_concepts()
            y = concept_presence([ex["objects"] for ex in ds], names)
        if y.shape[0] != pairs.vision.shape[0]:
            _fail(f"the capture holds {pairs.vision.shape[0]} pairs but the data has {y.shape[0]}; label with the data it was captured from")
        with torch.no_grad():
            labels = label_features(sae.encode(pairs.vision, "vision"), sae.encode(pairs.text, "text"), y, names, min_corr)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    labels.save(sae_dir / "labels.json")
    typer.echo(f"{labels.counts()} -> {sae_dir / 'labels.json'}")


@app.command()
def steer(
    sae_dir: Path = typer.Option(..., "--sae", help="JSAE directory with labels.json"),
    concept: str = typer.Option(...),
    layer: int = typer.Option(...),
    alpha: float = typer.Option(..., help="strength added along the sum of unit decoder directions"),
    model: str = typer.Option("llava"),
    n: int = typer.Option(8, help="world test images without the concept"),
    suppress: bool = typer.Option(False, help="clamp the concept's features to 0 on images that contain it instead"),
    seed: int = typer.Option(0),
) -> None:
    """Steer toward (or suppress) a labelled concept on world images; print captions before and after."""
    from jsae.protocol.run import DemoConfig, load_model, make_captioner
    from jsae.interventions import Ablate, Steer
    from jsae.labels import FeatureLabels
    from jsae.protocol.methods import Method
    from jsae.world.concepts import concept_presence, mentions
    from jsae.saes.joint_sae import JointSAE
    from jsae.world import world_dataset

    if not math.isfinite(alpha):
        _fail(f"--alpha must be a finite number, got {alpha}")
    try:
        sae = JointSAE.load_from_disk(sae_dir)
        trained = sae.cfg.metadata.get("layer")
        if trained is not None and int(trained) != layer:
            _fail(f"this SAE was trained on layer {trained}, not {layer}; pass --layer {trained} or use that layer's SAE")
        if not (sae_dir / "labels.json").exists():
            _fail(f"{sae_dir} has no labels.json; run `jsae label` first")
        feats = FeatureLabels.load(sae_dir / "labels.json").features_for(concept)
        m, processor, adapter, _ = load_model(model)
        adapter.check_layer(layer)
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    ds = world_dataset("test", 200, seed)
    has = concept_presence([ex["objects"] for ex in ds], [concept])[:, 0].bool()
    images = [ex["image"] for ex, h in zip(ds, has) if bool(h) == suppress][:n]
    if suppress:
        iv = Ablate(layer=layer, positions="image", timing="prefill", sae=sae, features=feats, sae_modality="vision")
    else:
        d = Method("jsae", sae, True).steer_direction(feats)
        iv = Steer(layer=layer, positions="image", timing="prefill", direction=d, strength=alpha)
    caption = make_captioner(m, processor, adapter, DemoConfig())
    before, after = caption(images, []), caption(images, [iv])
    for b, a in zip(before, after):
        typer.echo(f"- {b}\n+ {a}")
    rate = lambda caps: sum(mentions(c, concept) for c in caps) / max(len(caps), 1)  # noqa: E731
    typer.echo(f"'{concept}' mentioned: {rate(before):.2f} -> {rate(after):.2f} (features {feats})")


@app.command()
def sweep(
    out: Path = typer.Option(Path("runs/sweep"), help="results directory: one sub-directory per model + report.md"),
    models: str = typer.Option("llava,qwen3-vl-moe", help="comma-separated toy models"),
    steps: int = typer.Option(600),
    n_max: int = typer.Option(400),
    overwrite: bool = typer.Option(False),
) -> None:
    """The demo on several models, plus the model × layer interaction test on the per-image scores."""
    from jsae.protocol.run import DemoConfig, run_demo
    from jsae.protocol.sweep import Cell
    from jsae.protocol.stats import interaction
    from jsae.files import write_json

    out.mkdir(parents=True, exist_ok=True)
    cells: dict[str, list[Cell]] = {}
    for name in models.split(","):
        try:
            metrics = run_demo(out / name, DemoConfig(model=name, steps=steps, n_max=n_max), overwrite=overwrite,
                               scores_out=True)
        except (FileExistsError, ValueError, NotImplementedError) as exc:
            _fail(str(exc))
            return
        cells[name] = metrics.pop("_cells")
    result = {m: interaction(cells, m) for m in ("steering", "suppression")}
    write_json(out / "interaction.json", result)
    lines = ["# jsae sweep", "", f"models: {list(cells)}", "", "## Model × layer interaction (jsae, per-image scores)", ""]
    for measure, r in result.items():
        lines.append(f"- {measure}: " + ("not testable (needs both models with cells at >= 2 layers)" if r is None else
                                         f"F = {r['f_statistic']:.2f}, permutation p = {r['p_value']:.4f} "
                                         f"(df {r['df_interaction']}, {r['df_residual']})"))
    lines += ["", *[f"- [{m}]({m}/report.md)" for m in cells]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    typer.echo(json.dumps(result, indent=1))


if __name__ == "__main__":
    app()
