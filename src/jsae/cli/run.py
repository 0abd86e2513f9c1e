"""``jsae run ...``: run the protocol (``demo``, also at the top level as ``jsae demo``), ``sweep`` several
models, or ``capture`` pooled pairs of one data split for ``jsae sae train``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from jsae.cli._common import (D_SAE, EXPANSION, SEED, STEPS, TOKENS, OneLineGroup, data_source, fail, float_list, int_list,
                              model_options, number, world_pairs)

_M = model_options()

run_app = typer.Typer(help="Run things on a VLM: the whole protocol (demo), a sweep over models, or a capture of "
                           "pooled (image, caption) activations.", no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineGroup)


@run_app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="results directory (report.md, metrics.json, dose_response.png, features.html)"),
    model: str = typer.Option("llava", help="llava | qwen3-vl-moe (shipped toy models), or a hub id / path of a real VLM (needs --data)"),
    data: Optional[str] = typer.Option(None, help="a COCO-captions-style dataset (path or hub id): caption words become the concepts"),
    data_split: str = typer.Option("train", help="split of --data; its rows are cut into train, label and sweep slices"),
    prompt: Optional[str] = typer.Option(None, help="captioning prompt (default: 'describe the image' on the world, 'Describe the image.' on real data)"),
    layers: Optional[str] = typer.Option(None, help="comma-separated decoder layers to sweep (default: 4 spread over the depth)"),
    steps: Optional[int] = typer.Option(None, min=1, help="training steps of every SAE (default 2000; with --preset reference: of the TopK baseline only, default 600)", callback=STEPS),
    epochs: Optional[int] = typer.Option(None, min=1, help="--preset reference: training epochs of the JSAE methods (default 20)", callback=STEPS),
    d_sae: Optional[int] = typer.Option(None, min=1, help="SAE width (default 128; with --preset reference 4 x d_in)", callback=D_SAE),
    expansion_factor: Optional[int] = typer.Option(None, min=1, help="SAE width as a multiple of d_in instead of --d-sae (the paper: 4)", callback=EXPANSION),
    revival: bool = typer.Option(True, help="dead-latent revival: the JSAEs resample dead latents, the TopK baseline trains them with SAELens's AuxK"),
    n_train: int = typer.Option(2000, min=1, help="training pairs", callback=world_pairs()),
    n_label: int = typer.Option(400, min=1, help="held-out pairs for feature labels", callback=world_pairs()),
    n_eval: int = typer.Option(1200, min=1, help="held-out images the sweep images are drawn from", callback=world_pairs()),
    n_images: int = typer.Option(5, min=1, help="sweep images per concept (without it to steer, with it to suppress), the same at every strength"),
    top_k: int = typer.Option(3, min=1, help="latents per (method, decoder, concept), ranked by correlation with the concept"),
    ratios: Optional[str] = typer.Option(None, help="strength grid as multiples of the mean per-token image-state norm (default 0.25,0.5,0.7,1,1.4,2,4,8)"),
    positions: Optional[str] = typer.Option(None, help="comma-separated steering position sets reported separately: image, image_but_last, last, generated, image+generated (default: image,generated,image+generated; --steer-at alone with --steer-at or --preset reference)"),
    decoders: str = typer.Option("text,vision", help="decoders the joint methods steer with: text, vision, cross (vision labels, text rows)"),
    concepts: Optional[str] = typer.Option(None, help="comma-separated concepts (default: every object type of the world; real data: the most frequent words)"),
    concept_set: str = typer.Option("types", help="world default concepts: types | types+colours | all"),
    max_concepts: int = typer.Option(6, min=1, help="real data: at most this many concept words"),
    min_count: int = typer.Option(5, min=1, help="real data: a caption word is a concept when this many labelling captions have it"),
    max_perplexity: Optional[float] = typer.Option(None, help="real data: fluency threshold on the no-image perplexity (default: 1.5x the 95th percentile of unsteered captions)", callback=number(0, lo_open=True)),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="greedy caption length (default 32; --preset reference: 50)", callback=TOKENS),
    seed: int = typer.Option(0, callback=SEED),
    overwrite: bool = typer.Option(False, help="replace a directory that holds another run"),
    text_pooling: Optional[str] = typer.Option(None, help="text view: caption tokens (default) | non_image (every attended non-image token, the JSAE reference)"),
    prompt_template: Optional[str] = typer.Option(None, help="raw capture prompt instead of the chat template, e.g. 'USER: <image>\\n{caption}\\nASSISTANT:'"),
    caption_template: Optional[str] = typer.Option(None, help="raw captioning prompt ({caption} = --prompt), e.g. the Mistral instruction form with <image> and {caption} (escape brackets in the shell)"),
    steer_at: Optional[str] = typer.Option(None, help="image (image tokens at prefill, default) | image+generated (and every generated token, the reference)"),
    alphas: Optional[str] = typer.Option(None, help="absolute steering strengths, e.g. 0.2,0.4,...,3.0 (default: ratios of the state norm; --preset reference: 0.2..3.0)"),
    preset: str = typer.Option("default", help="default | reference (the JSAE reference code's protocol; explicit options win; the report lists what still differs)"),
    text_source: str = typer.Option("dataset", help="text view: the dataset's captions | generated (the VLM's own greedy captions of the train/label images)"),
    reference_faults: bool = typer.Option(False, help="reproduce the reference's faults: sweep on training images, latents ranked in-sample, best α per image (each named in the report)"),
    dtype: str = _M["dtype"], device: Optional[str] = _M["device"], device_map: Optional[str] = _M["device_map"],
) -> None:
    """The JSAE paper's protocol end to end: capture, train per layer, label, steer/suppress sweep, report.

    Run it again on the same --out with more --layers or --concepts to grow the run: the capture, the SAEs and the
    curves that match are reused and only what is missing runs (other sweep settings such as --n-images reuse the
    capture and the SAEs and measure the curves again)."""
    cfg = demo_config(**{k: v for k, v in locals().items() if k not in ("out", "overwrite")})
    from jsae.protocol.run import ARTEFACTS, run_protocol

    try:
        metrics = run_protocol(out, cfg, overwrite=overwrite)
    except (FileExistsError, ValueError, OSError, RuntimeError, MemoryError) as exc:
        fail(str(exc))
    typer.echo(f"done in {metrics['timings']['total_s']:.0f} s: " + ", ".join(str(out / a) for a in ARTEFACTS))


def demo_config(*, model: str, data: Optional[str], data_split: str, prompt: Optional[str],
                layers: Optional[str], steps: Optional[int], epochs: Optional[int],
                d_sae: Optional[int], expansion_factor: Optional[int], revival: bool,
                n_train: int, n_label: int, n_eval: int, n_images: int, top_k: int,
                ratios: Optional[str], positions: Optional[str], decoders: str,
                concepts: Optional[str], concept_set: str, max_concepts: int, min_count: int,
                max_perplexity: Optional[float], max_new_tokens: Optional[int], seed: int,
                text_pooling: Optional[str], prompt_template: Optional[str],
                caption_template: Optional[str], steer_at: Optional[str], alphas: Optional[str],
                preset: str, text_source: str, reference_faults: bool,
                dtype: str, device: Optional[str], device_map: Optional[str]) -> object:
    """The :class:`~jsae.protocol.config.ProtocolConfig` that ``jsae demo`` runs for these options (its own names and
    values as parsed; one-line errors).  ``tests/test_cli_help.py`` builds it from the defaults ``--help`` shows."""
    layer_list = int_list(layers, "--layers") if layers else None
    alpha_grid = float_list(alphas, "--alphas") if alphas else None
    from jsae.protocol.config import ProtocolConfig
    from jsae.protocol.sweep import RATIOS

    try:
        return ProtocolConfig(model=model, layers=layer_list or None, steps=steps, epochs=epochs, d_sae=d_sae,
                              expansion_factor=expansion_factor, revival=revival, n_train=n_train,
                              n_label=n_label, n_eval=n_eval, n_images=n_images, top_k=top_k,
                              ratios=tuple(float_list(ratios, "--ratios")) if ratios else RATIOS,
                              positions=tuple(p for p in positions.split(",") if p) if positions else None,
                              decoders=tuple(d for d in decoders.split(",") if d), concept_set=concept_set,
                              max_concepts=max_concepts, concepts=concepts.split(",") if concepts else None,
                              seed=seed, data=data, data_split=data_split, prompt=prompt, min_count=min_count,
                              max_perplexity=max_perplexity, max_new_tokens=max_new_tokens, text_positions=text_pooling,
                              prompt_template=prompt_template, caption_template=caption_template, steer_at=steer_at,
                              alphas=tuple(alpha_grid) if alpha_grid else None, dtype=dtype, device=device,
                              device_map=device_map, preset=preset, reference_faults=reference_faults,
                              text_source=text_source)
    except ValueError as exc:
        fail(str(exc))


@run_app.command()
def sweep(
    out: Path = typer.Option(Path("runs/sweep"), help="results directory: one sub-directory per model + report.md"),
    models: str = typer.Option("llava,qwen3-vl-moe", help="comma-separated toy models"),
    steps: Optional[int] = typer.Option(None, min=1, help="SAE training steps (default: the demo's)", callback=STEPS),
    expansion_factor: Optional[int] = typer.Option(None, min=1, help="SAE width as a multiple of d_in (the paper: 4)", callback=EXPANSION),
    revival: bool = typer.Option(True, help="dead-latent revival (JSAE resampling, AuxK for the TopK baseline)"),
    n_images: int = typer.Option(5, min=1, help="sweep images per concept"),
    n_train: int = typer.Option(2000, min=1, help="training pairs per model", callback=world_pairs()),
    n_label: int = typer.Option(400, min=1, help="held-out pairs per model for feature labels and SAE metrics", callback=world_pairs()),
    positions: str = typer.Option("image,generated,image+generated", help="steering position sets, each reported on its own (the reference steers at image+generated)"),
    concept_set: str = typer.Option("types+colours", help="world concepts: types | types+colours (twelve) | all"),
    max_concepts: int = typer.Option(12, min=1, help="at most this many concepts"),
    d_sae: Optional[int] = typer.Option(None, min=1, help="latents per SAE (default: the demo's)", callback=D_SAE),
    layers: Optional[str] = typer.Option(None, help="comma-separated decoder layers (default: four spread over the depth)"),
    overwrite: bool = typer.Option(False),
) -> None:
    """The demo on several models, then the model × layer interaction of r50 (sign-flip test over concepts)
    per method, Holm-corrected."""
    from jsae.files import write_atomic, write_json
    from jsae.protocol.config import ProtocolConfig
    from jsae.protocol.run import run_protocol
    from jsae.protocol.summary import model_layer_interaction
    from jsae.report.markdown import sweep_report

    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict] = {}
    for name in (m for m in models.split(",") if m):
        try:
            cfg = ProtocolConfig(model=name, steps=steps, n_images=n_images, n_train=n_train, n_label=n_label,
                                 concept_set=concept_set,
                                 max_concepts=max_concepts, d_sae=d_sae, expansion_factor=expansion_factor,
                                 revival=revival, positions=tuple(p for p in positions.split(",") if p),
                                 layers=int_list(layers, "--layers") if layers else None)
            done = _finished_run(out / name, cfg) if not overwrite else None
            if done is not None:
                typer.echo(f"{name}: reusing the finished run in {out / name} (same configuration)")
                runs[name] = done
                continue
            runs[name] = run_protocol(out / name, cfg, overwrite=overwrite)
        except (FileExistsError, ValueError, NotImplementedError, OSError) as exc:
            fail(str(exc))
    result = model_layer_interaction(runs)
    write_json(out / "interaction.json", result)
    write_atomic(out / "report.md", sweep_report(list(runs), result, runs))
    typer.echo(json.dumps(result, indent=1))


def _finished_run(path: Path, cfg: object) -> dict | None:
    """The metrics of a finished run in ``path`` made with exactly ``cfg`` (else None)."""
    from dataclasses import asdict

    from jsae.report.rundir import RunDir

    run = RunDir(path)
    try:
        metrics = run.metrics()
    except (FileNotFoundError, ValueError):
        return None
    want, got = json.loads(json.dumps(asdict(cfg))), dict(metrics.get("config", {}))
    for key in ("prompt_template", "caption_template", "prompt"):  # filled in at run time when left unset
        if want.get(key) is None:
            want.pop(key, None)
            got.pop(key, None)
    return metrics if got == want else None


def _check_capture_options(out: Path, split: str, n: int, data: Optional[str], pooling: str, batch_size: int,
                           text_pooling: Optional[str]) -> None:
    """One-line errors for `capture` options, before the model or the data is loaded."""
    from jsae.capture import POOLINGS, TEXT_POSITIONS
    from jsae.guards import check_output_dir

    try:
        check_output_dir(out, "--out")
    except OSError as exc:
        fail(str(exc))
    if data is None:
        from jsae.world.data import SPLITS

        if split not in SPLITS:
            fail(f"--split {split!r} is not a world split; choose one of {list(SPLITS)} (or pass --data for a dataset's split)")
        if n < 1:
            fail(f"--n must be at least 1 pair, got {n}")
    if pooling not in POOLINGS:
        fail(f"--pooling {pooling!r}: choose one of {list(POOLINGS)}")
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")
    if text_pooling is not None and text_pooling not in TEXT_POSITIONS:
        fail(f"--text-pooling {text_pooling!r}: choose one of {list(TEXT_POSITIONS)}")


@run_app.command()
def capture(
    out: Optional[Path] = typer.Option(None, help="capture directory (manifest.json + shards); not needed with --dry-run"),
    model: str = typer.Option("llava", help="toy model name, or a hub id / path of a real VLM"),
    layers: str = typer.Option(..., help="comma-separated decoder layers"),
    split: str = typer.Option("train", help="world split (train | validation | test), or the split of --data"),
    n: int = typer.Option(2000, "--n", "--pairs", help="number of world pairs (the world only; --data captures every row of "
                                                         "--split); under torchrun write --pairs (torchrun reads --n as one of its own options)",
                          callback=world_pairs()),
    data: Optional[str] = typer.Option(None, help="a COCO-captions-style dataset (path or hub id) instead of the world"),
    pooling: str = typer.Option("mean", help="mean | max | last"),
    batch_size: int = typer.Option(32, callback=number(1)),
    shard_size: int = typer.Option(1024, help="pairs per shard file (rounded up to whole batches); under torchrun the unit "
                                              "of work: shard k goes to rank k mod world size", callback=number(1, 10**9)),
    bucket: Optional[bool] = typer.Option(None, "--bucket/--no-bucket", help="batch each shard's pairs by image-token count "
                                                                            "(default: on for a new capture, the capture's own "
                                                                            "setting when resuming)"),
    seed: int = typer.Option(0, help="world seed", callback=SEED),
    text_pooling: Optional[str] = typer.Option(None, help="text view: caption tokens (default) | non_image (every attended non-image token; --preset reference)"),
    prompt_template: Optional[str] = typer.Option(None, help="raw prompt instead of the chat template, with {caption}"),
    preset: str = typer.Option("default", help="default | reference (non_image pooling and the reference's 'USER: <image>\\n{caption}\\nASSISTANT:' prompt when the tokenizer knows its words; explicit options win)"),
    dtype: str = _M["dtype"], device: Optional[str] = _M["device"], device_map: Optional[str] = _M["device_map"],
    dry_run: bool = typer.Option(False, "--dry-run", help="print what the capture costs (tokens per image, disk, memory, "
                                                           "compute) without loading weights or running anything"),
    n_pairs: Optional[int] = typer.Option(None, min=1, help="--dry-run: scale the figures to this many pairs of the same kind "
                                                           "(default: the rows of the data)"),
    gpu_memory: str = typer.Option("80GiB", help="--dry-run: memory of one GPU (e.g. 80GiB, 24GB), to say how many GPUs the "
                                                 "model needs (weights + activations)"),
    max_memory: Optional[str] = typer.Option(None, help="with --device-map: the most each device may hold, e.g. "
                                                        "0=70GiB,1=70GiB,cpu=100GiB (what fits nowhere is offloaded to disk)"),
) -> None:
    """Capture pooled (image, caption) activations at the given layers (resumable).

    The manifest records the data's fingerprint, which `jsae sae label` checks.  --model may also be a
    config.json or a spec JSON (config + processor settings) with --dry-run, which also says how many GPUs of
    --gpu-memory the model needs.  Data parallel: `torchrun --nproc_per_node N --no-python jsae run capture
    --pairs 2000 ...` (each rank captures its own shards, on cuda:LOCAL_RANK with --device cuda; the shards equal a
    one-process capture's).  A model larger than one GPU: one process with --device-map auto (or a JSON map of
    modules to devices, and --max-memory); the pooled vectors equal a one-device capture's."""
    from jsae.protocol.config import PRESETS

    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    layer_list = int_list(layers, "--layers")
    if not layer_list:
        fail("--layers needs at least one layer, e.g. --layers 4")
    if dry_run:
        _capture_dry_run(model, layer_list, split, n, data, seed, batch_size, n_pairs, dtype, gpu_memory)
        return
    if out is None:
        fail("--out is required (the capture directory), unless --dry-run")
    _check_capture_options(out, split, n, data, pooling, batch_size, text_pooling)
    if shard_size < 1:
        fail(f"--shard-size must be at least 1, got {shard_size}")
    import os

    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device_map is not None:
            fail("--device-map spreads one model over every GPU, which each torchrun rank would do; under torchrun "
                 "use --device cuda (one GPU per rank), or run one process with --device-map")
        if device == "cuda":
            device = f"cuda:{local_rank}"  # one GPU per rank
    from jsae.vlm import resolve_device_map, resolve_max_memory

    try:
        device_map = resolve_device_map(device_map, "--device-map")
        placement = {} if max_memory is None else {"max_memory": resolve_max_memory(max_memory, "--max-memory")}
    except ValueError as exc:
        fail(str(exc))
    if max_memory is not None and device_map is None:
        fail("--max-memory places a model spread over devices; pass --device-map auto with it")
    from jsae import capture_pairs, load_vlm

    try:
        source, part = data_source(data, split, n, seed)
        pairs = source.pairs(part)
        model_, processor, adapter = load_vlm(model, dtype=dtype, device=device, device_map=device_map, **placement)
        if preset == "reference":
            from jsae.protocol.config import ProtocolConfig
            from jsae.protocol.reference import reference_prompts

            ref, notes = reference_prompts(ProtocolConfig(model=model, preset="reference", text_positions=text_pooling,
                                                          prompt_template=prompt_template), processor, adapter)
            text_pooling, prompt_template = ref.text_positions, ref.prompt_template
            if not notes["capture"]["used"] and "unknown_words" in notes["capture"]:
                typer.echo(f"note: the model's own prompt is kept: its tokenizer lacks {notes['capture']['unknown_words']} "
                           f"of the reference's {notes['capture']['reference']!r}", err=True)
        text_pooling = text_pooling or "caption"
        capture_pairs(model_, pairs, layers=layer_list, out_dir=out, processor=processor, adapter=adapter,
                      pooling=pooling, batch_size=batch_size, shard_size=shard_size,  # type: ignore[arg-type]
                      fingerprint=lambda: source.fingerprint(part), prompt_template=prompt_template, text_positions=text_pooling,
                      bucket=bucket, dataset_path=getattr(source, "path", None))
    except (ValueError, OSError) as exc:
        fail(str(exc))
    if os.environ.get("RANK", "0") == "0":
        typer.echo(f"captured {len(pairs)} pairs into {out}")


def _capture_dry_run(model: str, layers: list[int], split: str, n: int, data: Optional[str], seed: int, batch_size: int,
                     n_pairs: Optional[int], dtype: str, gpu_memory: str = "80GiB") -> None:
    """`capture --dry-run`: jsae.cost.estimate_capture on the model's config and the data, printed as a table (with
    how many GPUs of --gpu-memory the model needs)."""
    if batch_size < 1:
        fail(f"--batch-size must be at least 1, got {batch_size}")
    from jsae.guards import parse_bytes

    try:
        gpu_bytes = parse_bytes(gpu_memory, "--gpu-memory")
    except ValueError as exc:
        fail(str(exc))
    import torch

    from jsae.cost import estimate_capture

    try:
        source, part = data_source(data, split, n, seed)
        pairs = source.pairs(part)
        processor = None
        from jsae.world.models import MODEL_NAMES

        if model in MODEL_NAMES:  # a shipped toy model: its own processor counts text tokens exactly
            from jsae import load_vlm

            target = load_vlm(model)
            processor = target.processor
        else:
            target = model
        model_dtype = (torch.float32 if processor is not None else torch.bfloat16) if dtype == "auto" else getattr(torch, dtype, None)
        if not isinstance(model_dtype, torch.dtype):
            fail(f"--dtype {dtype!r}: use auto, float32, bfloat16 or float16")
        est = estimate_capture(target, pairs, layers, batch_size=batch_size, n_pairs=n_pairs, processor=processor,
                               model_dtype=model_dtype, gpu_memory=gpu_bytes)
    except (ValueError, TypeError, OSError) as exc:
        fail(str(exc))
    typer.echo(str(est))


@run_app.command()
def experiments(
    table: Path = typer.Option(..., help="experiment table: a CSV with columns name,layer,latents,keywords,target,image_ids (list cells separated by ';')"),
    run: Path = typer.Option(..., "--run", help="a run directory of `jsae demo` holding saes/<method>/layer_<L> for every layer of the table"),
    out: Optional[Path] = typer.Option(None, help="where experiments.json and experiments.md go (default: RUN/experiments)"),
    model: str = typer.Option("llava", help="the VLM the run was made with: a toy model's name, a hub id or a path"),
    data: Optional[str] = typer.Option(None, help="a caption dataset (path or hub id) whose image_id column (else row index) the table's image_ids name (default: the world, ids = row indices)"),
    data_split: str = typer.Option("test", help="split of the world or of --data the image ids point into"),
    method: str = typer.Option("jsae", help="the SAE of the run to steer with (saes/<method>/layer_<L>)"),
    alphas: Optional[str] = typer.Option(None, help="steering strengths along the sum of unit text-decoder rows (default: the reference's 0.2,0.4,...,3.0)"),
    positions: str = typer.Option("image+generated", help="where to add the direction: image+generated (the reference: image tokens at prefill and every generated token) | image | image_but_last | last | generated"),
    prompt: Optional[str] = typer.Option(None, help="captioning prompt (default: the world's 'describe the image', 'Describe the image.' on --data)"),
    caption_template: Optional[str] = typer.Option(None, help="raw captioning prompt ({caption} = --prompt), e.g. the reference's Mistral instruction form with <image>"),
    similarity_model: Optional[str] = typer.Option(None, help="sentence-transformers model (hub id or folder) for the similarity gain to the target, e.g. sentence-transformers/all-MiniLM-L6-v2"),
    perplexity_model: Optional[str] = typer.Option(None, help="causal LM (hub id or folder) for caption perplexity, e.g. gpt2"),
    reference_faults: bool = typer.Option(False, help="also replay the reference's per-image upward walk over alpha with its faulty stopping rules, and report each fault"),
    max_new_tokens: int = typer.Option(50, min=1, help="greedy caption length (the reference: 50)", callback=TOKENS),
    batch_size: int = typer.Option(64, min=1, help="captions generated per batch"),
    dtype: str = _M["dtype"], device: Optional[str] = _M["device"], device_map: Optional[str] = _M["device_map"],
) -> None:
    """The reference's steering experiments from a table: every alpha on every image, keyword hit, similarity
    gain, perplexity and repetition per alpha (optionally the reference's faulty walk, for contrast)."""
    alpha_grid = float_list(alphas, "--alphas") if alphas else None
    from jsae.protocol.experiments import run_experiments, write_experiments_report
    from jsae.protocol.reference_metrics import LMPerplexity, SentenceSimilarity
    from jsae.protocol.reference import REFERENCE_ALPHAS

    try:
        similarity = SentenceSimilarity(similarity_model, device=device or "cpu") if similarity_model else None
        perplexity = LMPerplexity(perplexity_model, device=device or "cpu") if perplexity_model else None
        result = run_experiments(table, run, model=model, data=data, data_split=data_split, method=method,
                                 alphas=tuple(alpha_grid) if alpha_grid else REFERENCE_ALPHAS, positions=positions,
                                 prompt=prompt, caption_template=caption_template, max_new_tokens=max_new_tokens,
                                 similarity=similarity, perplexity=perplexity, reference_faults=reference_faults,
                                 batch_size=batch_size, dtype=dtype, device=device, device_map=device_map)
        paths = write_experiments_report(result, out if out is not None else run / "experiments")
    except (ImportError, ValueError, OSError) as exc:
        fail(str(exc))
    typer.echo(f"{len(result['experiments'])} experiment(s): " + ", ".join(str(p) for p in paths))


__all__ = ["capture", "demo", "demo_config", "experiments", "run_app", "sweep"]
