"""``jsae vista train`` and ``jsae vista eval``: VISTA on the toy world (:mod:`jsae.vista.experiment`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from jsae.cli._common import D_SAE, LAYER, SEED, STEPS, THREADS, OneLineGroup, fail, int_list, number, world_pairs

vista_app = typer.Typer(help="VISTA: regularise the visual projector with the language model's text SAE; "
                             "matching rate and patch-local object removal / replacement.",
                        no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineGroup)


def _ints(spec: str, flag: str) -> tuple[int, ...]:
    out = tuple(int_list(spec, flag))
    if not out:
        fail(f"{flag} needs at least one layer, e.g. {flag} 4")
    return out


@vista_app.command("train")
def train(
    out: Path = typer.Option(..., help="run directory (text SAEs, labels, projectors, train.json)"),
    model: str = typer.Option("toy-composed", help="toy-composed: the toy LLaVA's own tower + LM with a new projector; "
                                                   "toy-text-lm: the toy text-only LM + the pre-VLM tower + a new projector "
                                                   "(the paper's setup); toy-dino-text-lm: the same with the DINOv2-style "
                                                   "tower; llava: the shipped toy LLaVA"),
    text_sae: Optional[str] = typer.Option(None, help="text SAEs to use instead of training: a release "
                                                      "(jsae-vista-toy-text-lm-text-sae) or a directory of SAE folders named by hook"),
    text_layers: str = typer.Option("0,1,2,3,4,5,6,7", help="layers with a text SAE (comma-separated)"),
    edit_layer: int = typer.Option(4, help="the single constrained layer of the default settings (and of the edits)", callback=LAYER),
    layers: Optional[str] = typer.Option(None, help="constrained layers of one VISTA setting instead of the default ones "
                                                    "(one layer; layers 0..edit layer; all text layers; one layer with raw MSE)"),
    lam: float = typer.Option(1.0, help="λ, the weight of the text-SAE reconstruction loss (0 = baseline)", callback=number(0, 1e4)),
    loss_form: str = typer.Option("normalised", help="with --layers: normalised (‖e‖²/‖h‖²) or mse (the paper's raw MSE)"),
    steps: int = typer.Option(600, help="projector steps (the same for every setting)", callback=STEPS),
    batch_size: int = typer.Option(16, callback=number(1)),
    lr: float = typer.Option(2e-3, callback=number(0, 10, lo_open=True)),
    from_scratch: bool = typer.Option(True, "--from-scratch/--from-model", help="train every projector from scratch (same seed; "
                                                                               "the paper's way) or from the model's own"),
    n_train: int = typer.Option(1000, help="training images (and their captions for the text SAE)", callback=world_pairs()),
    sae_steps: int = typer.Option(2000, help="text SAE steps (SAELens SAETrainer)", callback=STEPS),
    d_sae: int = typer.Option(256, callback=D_SAE),
    seed: int = typer.Option(0, callback=SEED),
    overwrite: bool = typer.Option(False, help="write into a non-empty --out"),
) -> None:
    """Train text SAEs (or load them), label them from text, and train the baseline and VISTA projectors from scratch."""
    from jsae.vista.experiment import WorldVistaConfig, train_world

    tl = _ints(text_layers, "--text-layers")
    settings: tuple = ()
    if layers is not None:
        ls = _ints(layers, "--layers")
        settings = (("baseline", 0.0, ()), ("vista-l" + "".join(map(str, ls)) + ("-mse" if loss_form == "mse" else ""), lam, ls, loss_form))
    try:
        cfg = WorldVistaConfig(model=model, seed=seed, n_train=n_train, text_layers=tl, edit_layer=edit_layer, text_sae=text_sae,
                               d_sae=d_sae, sae_steps=sae_steps, lam=lam, settings=settings, proj_steps=steps,
                               batch_size=batch_size, lr=lr, reinit=from_scratch)
        summary = train_world(out, cfg, overwrite=overwrite)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        fail(str(exc))
    for row in summary["text_saes"]:
        typer.echo(f"text SAE layer {row['layer']}: {row['labelled']}/{row['d_sae']} latents labelled from text, "
                   f"purity {row['mean_purity']:.2f}")
    for name, h in summary["projectors"].items():
        last = h["history"][-1]
        typer.echo(f"{name}: ce {last['ce']:.4f} " + " ".join(f"{k} {v:.3f}" for k, v in last.items() if k.startswith("err_")))
    typer.echo(f"wrote {out}/train.json; next: jsae vista eval --run {out}")


@vista_app.command("toy-parts")
def toy_parts(
    out: Optional[Path] = typer.Option(None, help="where to write llava-text-lm/, llava-vision-tower/, llava-dino-tower/ (default: the package's "
                                                  "jsae/world/models, i.e. rebuild the shipped parts)"),
    stages: str = typer.Option("lm,vision", help="lm (the text-only LM: text pretraining), vision (the tower: vision "
                                                 "pretraining), dino (the DINOv2-style tower: self-distillation, no "
                                                 "labels), comma-separated"),
    seed: int = typer.Option(0, callback=SEED),
    threads: int = typer.Option(1, help="torch threads (the result is deterministic for a seed and thread count)", callback=THREADS),
) -> None:
    """Train the toy LLaVA's first two stages only — text pretraining of its LM (pictures written in words, captions,
    QA; never an image), vision pretraining of its tower on the scene labels — and save them as a text-only LM and
    a vision tower (what `jsae vista train` composes; `jsae world train-models` writes the same parts); `dino` trains
    the DINOv2-style tower (jsae.world.dino) that `--model toy-dino-text-lm` composes."""
    from jsae.world.dino import DinoConfig, train_dino_tower
    from jsae.world.training import train_parts

    parts = tuple(x.strip() for x in stages.split(",") if x.strip())
    bad = [x for x in parts if x not in ("lm", "vision", "dino")]
    if bad or not parts:
        fail(f"--stages takes lm, vision and / or dino (comma-separated), got {stages!r}")
    written = {}
    try:
        if "dino" in parts:
            written["dino"] = train_dino_tower(out, DinoConfig(seed=seed), threads=threads)
        rest = tuple(p for p in parts if p != "dino")
        if rest or not parts:
            written.update(train_parts("llava", out, rest, seed=seed, threads=threads))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    for stage, d in written.items():
        typer.echo(f"{stage}: {d}")


@vista_app.command("eval")
def evaluate(
    run: Path = typer.Option(..., help="a `jsae vista train` run directory"),
    n_eval: int = typer.Option(300, help="held-out test images", callback=world_pairs()),
    k: int = typer.Option(5, help="top-k latents per image for the matching rate", callback=number(1)),
    edit_layer: Optional[int] = typer.Option(None, help="layer of the patch-local edits (default: the single-layer VISTA setting's)", callback=LAYER),
    vista: Optional[str] = typer.Option(None, help="VISTA setting used for the edits (default: the single-layer one)"),
    seed: int = typer.Option(0, callback=SEED),
) -> None:
    """Matching rate, localisation, caption quality, patch-local removal / replacement; report.md, metrics.json, figure."""
    from jsae.vista.experiment import EvalConfig, eval_world

    if k < 1:
        fail(f"--k must be >= 1, got {k}")
    try:
        m = eval_world(run, EvalConfig(n_eval=n_eval, k=k, edit_layer=edit_layer, vista=vista, seed=seed))
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        fail(str(exc))
    for layer, r in m["matching_ratio"].items():
        typer.echo(f"layer {layer}: matching-rate ratio vs baseline " +
                   ", ".join(f"{n} {v['ratio']:.2f} [{v['low']:.2f}, {v['high']:.2f}]" for n, v in r.items()))
    for ref, gains in m["edit_gains"].items():
        for measure, g in gains.items():
            typer.echo(f"{measure}: VISTA {g['vista']:.3f} vs {ref} {g['reference']:.3f}")
    typer.echo(f"wrote {run}/report.md, {run}/metrics.json")


__all__ = ["vista_app"]
