"""``jsae world ...``: draw scenes, export datasets, train / evaluate / inspect the toy VLMs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from jsae.cli._common import SEED, THREADS, OneLineGroup, fail, world_pairs

world_app = typer.Typer(help="The embedded world: procedural scenes and the toy VLMs trained on it.",
                        no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineGroup)


def _models(model: str) -> list[str]:
    from jsae.world.models import MODEL_NAMES

    if model == "all":
        return list(MODEL_NAMES)
    if model not in MODEL_NAMES:
        fail(f"unknown model {model!r}; choose one of {list(MODEL_NAMES) + ['all']}")
    return [model]


@world_app.command("sample")
def sample(out: Path = typer.Option(..., help="directory for PNGs and ground truth (truth.jsonl)"),
           n: int = typer.Option(16, min=1, help="number of scenes", callback=world_pairs()),
           seed: int = typer.Option(0, min=0, help="world seed", callback=SEED),
           split: str = typer.Option("train", help="train | validation | test"),
           scale: int = typer.Option(4, min=1, help="upscale factor of the saved PNGs", max=64)) -> None:
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
            n_train: int = typer.Option(2000, min=1, callback=world_pairs()), n_validation: int = typer.Option(500, min=1, callback=world_pairs()),
            n_test: int = typer.Option(500, min=1, callback=world_pairs()), seed: int = typer.Option(0, min=0, callback=SEED)) -> None:
    """Export the world as a Hugging Face DatasetDict (train / validation / test)."""
    from jsae.world.data import world_splits

    ds = world_splits(n_train, n_validation, n_test, seed)
    ds.save_to_disk(str(out))
    typer.echo(f"saved {ds} to {out}")


@world_app.command("train-models")
def train_models(model: str = typer.Option("all", help="llava | qwen3-vl-moe | all"),
                 out: Optional[Path] = typer.Option(None, help="parent directory (default: the package's shipped models dir)"),
                 seed: int = typer.Option(0, min=0, help="training seed", callback=SEED),
                 device: str = typer.Option("cpu", help="torch device (cpu, cuda)"),
                 threads: int = typer.Option(1, min=1, help="torch CPU threads", callback=THREADS),
                 workers: Optional[int] = typer.Option(None, min=0, help="data worker processes (default: cores-1, at most 4)", max=64),
                 text_steps: Optional[int] = typer.Option(None, min=0, help="text pretraining steps (the LM alone)", max=10**9),
                 vision_steps: Optional[int] = typer.Option(None, min=0, help="vision pretraining steps (the tower alone)", max=10**9),
                 align_steps: Optional[int] = typer.Option(None, min=0, help="feature alignment steps (the projector alone)", max=10**9),
                 finetune_steps: Optional[int] = typer.Option(None, min=0, help="fine-tuning steps (projector + LM)", max=10**9),
                 init_from: Optional[Path] = typer.Option(None, help="start from these saved weights instead of scratch (e.g. <out>/<model>.stage-vision_pretraining with --text-steps 0 --vision-steps 0)"),
                 batch_size: Optional[int] = typer.Option(None, min=1, max=65536),
                 size: str = typer.Option("default", help="default | tiny (smoke tests)"),
                 eval_n: int = typer.Option(100, min=0, help="validation scenes evaluated after text pretraining and at the end", callback=world_pairs(0))) -> None:
    """Train the toy VLMs the way LLaVA is trained (deterministic for a seed and thread count): text pretraining
    of the LM, vision pretraining of the tower, feature alignment (projector alone), fine-tuning (projector + LM).

    Writes weights, config, tokenizer and processor to <out>/<model> (default: inside the installed package,
    so `jsae.load_vlm` finds them); for the toy LLaVA also the text-only LM and the pre-VLM tower VISTA composes."""
    from jsae.world.models import MODELS_DIR
    from jsae.world.training import default_config, train_toy_vlm

    if size not in ("default", "tiny"):
        fail(f"unknown size {size!r}; choose default or tiny")
    for name in _models(model):
        cfg = default_config(name, seed=seed, text_steps=text_steps, vision_steps=vision_steps, align_steps=align_steps,
                             finetune_steps=finetune_steps, batch_size=batch_size, size=size, eval_n=eval_n)
        target = (out or MODELS_DIR) / name
        _, _, summary = train_toy_vlm(name, target, cfg, device=device, threads=threads, workers=workers,
                                      log=typer.echo, init_from=init_from, parts_dir=out or MODELS_DIR)
        typer.echo(json.dumps({k: summary[k] for k in ("name", "seconds", "total_seconds", "gauges")} |
                              {"validation": summary.get("validation")}))


@world_app.command("evaluate")
def evaluate_cmd(model: str = typer.Option("all", help="llava | qwen3-vl-moe | all"),
                 n: int = typer.Option(500, min=1, help="held-out test scenes", callback=world_pairs()),
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


@world_app.command("fidelity")
def fidelity_cmd(model: str = typer.Option(..., help="toy model name (llava | qwen3-vl-moe) or a model directory"),
                 out: Optional[Path] = typer.Option(None, help="write the full result here (JSON)"),
                 n_images: int = typer.Option(300, min=10, help="validation scenes read for the logit lens and the oracles", callback=world_pairs(10)),
                 n_steer: int = typer.Option(8, min=1, help="images per type steered by each oracle", max=10000),
                 n_captions: int = typer.Option(300, min=0, help="test scenes captioned for caption quality (0: skip)", callback=world_pairs(0)),
                 steering: bool = typer.Option(True, "--steering/--no-steering", help="measure the oracles' r50 (the slow part)"),
                 write_quality: bool = typer.Option(False, "--write-quality", help="record the result in the model directory's quality.json (key 'fidelity')"),
                 threads: int = typer.Option(1, min=1, help="torch CPU threads", callback=THREADS)) -> None:
    """Can this world answer the JSAE paper's question? Logit lens at single-object image tokens, image vs text
    oracle (cosine; r50 at image and generated tokens), caption quality; per layer, with intervals over images."""
    import torch

    from jsae.files import write_json
    from jsae.protocol.fidelity import world_fidelity
    from jsae.report.markdown import fidelity_table
    from jsae.world.models import MODEL_NAMES, model_dir

    if model not in MODEL_NAMES and not Path(model).is_dir():
        fail(f"--model {model!r} is neither a toy model ({', '.join(MODEL_NAMES)}) nor a model directory; pass one of those")
    if out is not None and out.is_dir():
        fail(f"--out {out} is a directory; pass a file name such as {out / 'fidelity.json'}")
    torch.set_num_threads(threads)
    result = world_fidelity(model, n_images=n_images, n_steer=n_steer, n_captions=n_captions, steering=steering)
    typer.echo(fidelity_table(result))
    typer.echo(json.dumps(result["summary"]))
    if out is not None:
        write_json(out, result)
        typer.echo(f"wrote {out}")
    if write_quality:
        d = model_dir(model) if model in MODEL_NAMES else Path(model)
        q_path = d / "quality.json"
        q = json.loads(q_path.read_text()) if q_path.is_file() else {}
        q["fidelity"] = result
        write_json(q_path, q)
        typer.echo(f"recorded in {q_path}")


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
