"""``jsae world ...``: draw scenes, export datasets, train / evaluate / inspect the toy VLMs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from jsae.cli._common import fail

world_app = typer.Typer(help="The embedded world: procedural scenes and the toy VLMs trained on it.",
                        no_args_is_help=True, pretty_exceptions_enable=False)


def _models(model: str) -> list[str]:
    from jsae.world.models import MODEL_NAMES

    if model == "all":
        return list(MODEL_NAMES)
    if model not in MODEL_NAMES:
        fail(f"unknown model {model!r}; choose one of {list(MODEL_NAMES) + ['all']}")
    return [model]


@world_app.command("sample")
def sample(out: Path = typer.Option(..., help="directory for PNGs and ground truth (truth.jsonl)"),
           n: int = typer.Option(16, min=1, help="number of scenes"),
           seed: int = typer.Option(0, min=0, help="world seed"),
           split: str = typer.Option("train", help="train | validation | test"),
           scale: int = typer.Option(4, min=1, help="upscale factor of the saved PNGs")) -> None:
    """Draw scenes to PNG files with their ground truth (objects, captions, QA) in truth.jsonl."""
    import os

    from jsae.world.data import iter_world

    try:
        items = list(iter_world(split, n, seed))
    except (TypeError, ValueError) as e:
        fail(str(e))
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".truth.jsonl.tmp"
    with open(tmp, "w") as fh:
        for scene, rec in items:
            img = scene.image.resize((scene.image.width * scale, scene.image.height * scale), 0)
            img.save(out / f"{rec['image_id']}.png")
            fh.write(json.dumps({k: v for k, v in rec.items() if k != "image"}) + "\n")
    os.replace(tmp, out / "truth.jsonl")
    typer.echo(f"wrote {n} scenes to {out}")


@world_app.command("dataset")
def dataset(out: Path = typer.Option(..., help="directory for datasets.DatasetDict.save_to_disk"),
            n_train: int = typer.Option(2000, min=1), n_validation: int = typer.Option(500, min=1),
            n_test: int = typer.Option(500, min=1), seed: int = typer.Option(0, min=0)) -> None:
    """Export the world as a Hugging Face DatasetDict (train / validation / test)."""
    from jsae.world.data import world_splits

    ds = world_splits(n_train, n_validation, n_test, seed)
    ds.save_to_disk(str(out))
    typer.echo(f"saved {ds} to {out}")


@world_app.command("train-models")
def train_models(model: str = typer.Option("all", help="llava | qwen3-vl-moe | all"),
                 out: Optional[Path] = typer.Option(None, help="parent directory (default: the package's shipped models dir)"),
                 seed: int = typer.Option(0, min=0, help="training seed"),
                 device: str = typer.Option("cpu", help="torch device (cpu, cuda)"),
                 threads: int = typer.Option(2, min=1, help="torch CPU threads"),
                 workers: Optional[int] = typer.Option(None, min=0, help="data worker processes (default: cores-1, at most 4)"),
                 lm_steps: Optional[int] = typer.Option(None, min=0), vision_steps: Optional[int] = typer.Option(None, min=0),
                 vlm_steps: Optional[int] = typer.Option(None, min=0), qa_steps: Optional[int] = typer.Option(None, min=0),
                 cqa_steps: Optional[int] = typer.Option(None, min=0),
                 tqa_steps: Optional[int] = typer.Option(None, min=0),
                 checkpoint_every: Optional[int] = typer.Option(None, min=0),
                 init_from: Optional[Path] = typer.Option(None, help="start from these saved weights instead of scratch"),
                 batch_size: Optional[int] = typer.Option(None, min=1),
                 size: str = typer.Option("default", help="default | tiny (smoke tests)"),
                 eval_n: int = typer.Option(100, min=0, help="validation scenes evaluated at the end")) -> None:
    """Train the toy VLMs from scratch (deterministic for a seed).

    Writes weights, config, tokenizer and processor to <out>/<model> (default: inside the installed package,
    so `jsae.load_vlm` finds them)."""
    from jsae.world.models import MODELS_DIR
    from jsae.world.training import default_config, train_toy_vlm

    if size not in ("default", "tiny"):
        fail(f"unknown size {size!r}; choose default or tiny")
    for name in _models(model):
        cfg = default_config(name, seed=seed, lm_steps=lm_steps, vision_steps=vision_steps, vlm_steps=vlm_steps,
                             qa_steps=qa_steps, cqa_steps=cqa_steps, tqa_steps=tqa_steps, checkpoint_every=checkpoint_every, batch_size=batch_size, size=size, eval_n=eval_n)
        target = (out or MODELS_DIR) / name
        _, _, summary = train_toy_vlm(name, target, cfg, device=device, threads=threads, workers=workers,
                                      log=typer.echo, init_from=init_from)
        typer.echo(json.dumps({k: summary[k] for k in ("name", "seconds", "total_seconds")} |
                              {"validation": summary.get("validation")}))


@world_app.command("evaluate")
def evaluate_cmd(model: str = typer.Option("all", help="llava | qwen3-vl-moe | all"),
                 n: int = typer.Option(500, min=1, help="held-out test scenes"),
                 directory: Optional[Path] = typer.Option(None, help="model directory (default: shipped)"),
                 device: str = typer.Option("cpu")) -> None:
    """Object accuracy of greedy captions, no-hallucination rate and QA accuracy on held-out scenes."""
    from jsae.world.evaluate import evaluate
    from jsae.world.models import load_toy_hf

    for name in _models(model):
        try:
            m, p = load_toy_hf(name, device=device, directory=directory)
        except (FileNotFoundError, RuntimeError) as e:
            fail(str(e))
        typer.echo(json.dumps({"model": name} | evaluate(m, p, name, n=n)))


@world_app.command("info")
def info() -> None:
    """List the toy models and whether their shipped files are present and readable."""
    from jsae.world.models import MODEL_NAMES, check_weights

    for name in MODEL_NAMES:
        try:
            d = check_weights(name)
            size = sum(f.stat().st_size for f in d.iterdir()) / 1e6
            typer.echo(f"{name}: ok ({size:.1f} MB) at {d}")
        except (FileNotFoundError, RuntimeError) as e:
            typer.echo(f"{name}: {e}")


if __name__ == "__main__":
    world_app()
