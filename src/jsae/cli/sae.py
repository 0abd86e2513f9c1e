"""``jsae sae ...``: one JSAE from a capture: ``train`` it, ``label`` its features on held-out pairs (checked
against the capture's data fingerprint), ``steer`` toward or suppress a labelled concept."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import typer

from jsae.cli._common import (D_SAE, LAYER, SEED, STEPS, TOKENS, OneLineGroup, data_source, fail, model_options, number,
                              world_pairs)

_M = model_options()

#: ``jsae sae train``'s defaults (``--preset default``), shown in its ``--help`` and used by it; the recipe itself
#: (learning rate and schedule, losses, unit-norm scaling) is jsae's one default, ``jsae.protocol.methods.DEFAULT_RECIPE``.
TRAIN_DEFAULTS = {"d_sae": 1024, "steps": 2000, "batch_size": 256, "lr": 3e-3}

sae_app = typer.Typer(help="One JSAE: train it on a capture, label its features, steer with them.",
                      no_args_is_help=True, pretty_exceptions_enable=False, cls=OneLineGroup)


@sae_app.command()
def train(
    capture_dir: Path = typer.Option(..., "--capture", help="capture directory (jsae run capture)"),
    layer: int = typer.Option(..., help="captured layer to train on", callback=LAYER),
    out: Path = typer.Option(..., help="SAE directory to write (SAELens layout)"),
    alignment: str = typer.Option("cosine", help="cosine | infonce | l2 | none"),
    activation: str = typer.Option("relu", help="relu (with L1) | topk"),
    k: int = typer.Option(32, help="k of topk", callback=number(1)),
    d_sae: Optional[int] = typer.Option(None, min=1, help=f"SAE width (default {TRAIN_DEFAULTS['d_sae']}; --preset reference: 4 x d_in)", callback=D_SAE),
    steps: Optional[int] = typer.Option(None, min=1, help=f"training steps (default {TRAIN_DEFAULTS['steps']}; --preset reference trains --epochs instead unless given)", callback=STEPS),
    epochs: Optional[int] = typer.Option(None, min=1, help="--preset reference: training epochs (default 20)", callback=STEPS),
    batch_size: Optional[int] = typer.Option(None, min=1, help=f"pairs per batch (default {TRAIN_DEFAULTS['batch_size']}; --preset reference: 8)"),
    lr: Optional[float] = typer.Option(None, help=f"learning rate (default {TRAIN_DEFAULTS['lr']:g}; --preset reference: 1e-5, Adam, plateau scheduler)", callback=number(0, 10, lo_open=True)),
    l1_coefficient: float = typer.Option(0.03, callback=number(0, 1e4)),
    checkpoint_dir: Optional[Path] = typer.Option(None, help="checkpoints every 500 steps; resumes if it holds one"),
    seed: int = typer.Option(0, callback=SEED),
    preset: str = typer.Option("default", help="default | reference (the JSAE reference code's recipe: element-mean loss, "
                                               "PyTorch Linear init, no centring, no decoder-norm constraint, Adam 1e-5, "
                                               "batch 8, 20 epochs, plateau scheduler, best epoch kept)"),
    allow_provenance_mismatch: bool = typer.Option(False, help="resume a --checkpoint-dir made for another model, layer "
                                                                "or data anyway"),
) -> None:
    """Train a JSAE on captured pairs of one layer."""
    from jsae.capture import read_manifest, sae_metadata
    from jsae.protocol.methods import DEFAULT_RECIPE
    from jsae.training import JointSAETrainer, load_pairs
    from jsae.training.recipes import REFERENCE_BATCH_SIZE

    if preset not in ("default", "reference"):
        fail(f"unknown preset {preset!r}; choose one of ['default', 'reference']")
    if epochs is not None and preset != "reference":
        fail("--epochs belongs to --preset reference; the default recipe trains --steps steps")
    reference = preset == "reference"
    if batch_size is None:
        batch_size = REFERENCE_BATCH_SIZE if reference else TRAIN_DEFAULTS["batch_size"]
    from jsae.guards import check_output_dir

    try:  # before any work: a bad --out or --checkpoint-dir must not lose a finished training run
        check_output_dir(out, "--out")
        if checkpoint_dir is not None:
            check_output_dir(checkpoint_dir, "--checkpoint-dir")
    except OSError as exc:
        fail(str(exc))
    try:
        data = load_pairs(capture_dir, layer, batch_size=batch_size, seed=seed)
        manifest = read_manifest(capture_dir)
        cfg, tcfg = train_configs(data.d_in, preset=preset, alignment=alignment, activation=activation, k=k, d_sae=d_sae,
                                  steps=steps, epochs=epochs, lr=lr, l1_coefficient=l1_coefficient,
                                  checkpoint_dir=checkpoint_dir, seed=seed)
        for key, value in sae_metadata(manifest, layer).items():
            cfg.metadata[key] = value
        if reference:
            sae = JointSAETrainer.from_config(cfg, tcfg, data).fit(allow_provenance_mismatch=allow_provenance_mismatch)
        else:
            sae = DEFAULT_RECIPE.fit(cfg, tcfg, data, allow_provenance_mismatch=allow_provenance_mismatch)
        sae.save_inference_model(out)
        metrics = _train_metrics(sae, data.vision, data.text, cfg.alignment)
        from jsae.files import write_json

        write_json(out / "metrics.json", metrics)  # the model card's numbers (`jsae release push`)
    except (ValueError, FileNotFoundError, OSError, RuntimeError, MemoryError) as exc:
        fail(str(exc).replace("pass allow_provenance_mismatch=True", "pass --allow-provenance-mismatch")
             .replace("a new checkpoint_dir", "a new --checkpoint-dir"))
    typer.echo(f"saved {out}: FVU vision {metrics['fvu_vision']:.3f} / text {metrics['fvu_text']:.3f}, "
               f"L0 vision {metrics['l0_vision']:.1f} / text {metrics['l0']:.1f}, dead latents vision "
               f"{metrics['dead_vision']} / text {metrics['dead_text']} of {metrics['d_sae']} "
               f"(on {metrics['n_pairs']} training pairs; FVU = fraction of variance unexplained, L0 = active latents "
               "per pair, dead = never active on them)")


def _train_metrics(sae: Any, vision: Any, text: Any, alignment: str) -> dict[str, Any]:
    """FVU, L0, dead latents and paired cosine of a freshly trained JSAE on (up to 4096 of) its training pairs,
    in the form of an SAE folder's ``metrics.json``, plus ``fvu_*`` for the printed line."""
    from jsae.protocol.methods import Method
    from jsae.protocol.stages import card_metrics, sae_metrics

    n = min(4096, len(vision))
    row = sae_metrics(Method("jsae", sae, True), vision[:n].float(), text[:n].float())
    out = card_metrics(row, alignment, n, measured_on="training pairs")
    return {**out, "fvu_vision": row["fvu_vision"], "fvu_text": row["fvu_text"]}


def train_configs(d_in: int, *, preset: str, alignment: str, activation: str, k: int, d_sae: Optional[int],
                  steps: Optional[int], epochs: Optional[int], lr: Optional[float], l1_coefficient: float,
                  checkpoint_dir: Optional[Path], seed: int) -> tuple[Any, Any]:
    """The (SAE config, trainer config) that ``jsae sae train`` trains with for these options (``--help``'s
    defaults are :data:`TRAIN_DEFAULTS`; ``tests/test_cli_help.py`` checks the two agree)."""
    from dataclasses import replace

    from jsae.protocol.methods import DEFAULT_RECIPE
    from jsae.training.recipes import reference_configs

    ckpt = {"checkpoint_every": 500 if checkpoint_dir else 0,
            "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None, "seed": seed}
    if preset == "reference":
        cfg, tcfg = reference_configs(d_in, d_sae)
        cfg = replace(cfg, alignment=alignment, activation=activation, k=k, l1_coefficient=l1_coefficient)
        timing = {"epochs": epochs or 20} if steps is None else {"epochs": None, "total_steps": steps}
        return cfg, replace(tcfg, **timing, **ckpt, **({"lr": lr} if lr is not None else {}))
    cfg = DEFAULT_RECIPE.sae_config(d_in, d_sae or TRAIN_DEFAULTS["d_sae"], alignment=alignment, activation=activation,
                                    k=k, l1_coefficient=l1_coefficient)
    return cfg, DEFAULT_RECIPE.trainer_config(steps or TRAIN_DEFAULTS["steps"], lr, **ckpt)


def _check_layer(sae: object, layer: int) -> None:
    trained = getattr(getattr(sae, "cfg", None), "metadata", {}).get("layer")
    if trained is not None and int(trained) != layer:
        fail(f"this SAE was trained on layer {trained}, not {layer}; pass --layer {trained} or use that layer's SAE")


@sae_app.command()
def label(
    sae_dir: Path = typer.Option(..., "--sae", help="JSAE directory"),
    capture_dir: Path = typer.Option(..., "--capture", help="capture of held-out pairs (jsae run capture)"),
    layer: int = typer.Option(..., callback=LAYER),
    split: str = typer.Option("validation", help="world split the capture was made from (or the split of --data)"),
    n: int = typer.Option(400, help="number of world pairs the capture was made from", callback=world_pairs()),
    data: Optional[str] = typer.Option(None, help="caption dataset the capture was made from (words become concepts)"),
    seed: int = typer.Option(0, help="world seed the capture was made with", callback=SEED),
    min_corr: float = typer.Option(0.3, callback=number(0, 1, lo_open=True, hi_open=True)),
) -> None:
    """Label every feature with its concept (world ground truth, or caption words) -> labels.json.

    --split/--n/--seed (or --data) must give the data the capture was made from: its fingerprint is checked."""
    import torch

    from jsae.capture import read_manifest
    from jsae.data.sources import check_fingerprint
    from jsae.labels import label_features
    from jsae.saes.joint_sae import JointSAE
    from jsae.training import load_pairs

    from jsae.provenance import check_same, manifest_record, sae_record

    try:
        sae = JointSAE.load_from_disk(sae_dir)
        _check_layer(sae, layer)
        source, part = data_source(data, split, n, seed)
        manifest = read_manifest(capture_dir)
        same_site = ("model", "model_class", "layer", "hook_name", "pooling", "d_in")
        check_same({k: v for k, v in sae_record(sae).items() if k in same_site},
                   {k: v for k, v in manifest_record(manifest, layer).items() if k in same_site},
                   f"the SAE in {sae_dir}", f"the capture in {capture_dir}", "label it on a capture of the model, layer "
                   "and pooling it was trained on")
        flags = "--data/--split" if data else "--split/--n/--seed"
        check_fingerprint(manifest.get("fingerprint"), source.fingerprint(part), f"the capture in {capture_dir}",
                          f"pass the {flags} it was captured with")
        pairs = load_pairs(capture_dir, layer, batch_size=1, shuffle=False)
        trained_on = sae_record(sae).get("data")
        if trained_on is not None and trained_on == manifest.get("fingerprint"):
            typer.echo(f"note: {capture_dir} holds the pairs this SAE was trained on, so these labels are in-sample; "
                       "label on held-out pairs (e.g. a capture of --split validation) to judge the features", err=True)
        y, names = source.presence(part)
        if y.shape[0] != pairs.vision.shape[0]:
            fail(f"the capture holds {pairs.vision.shape[0]} pairs but the data has {y.shape[0]}; "
                 "label with the data it was captured from")
        with torch.no_grad():
            zv, zt = sae.encode(pairs.vision, "vision"), sae.encode(pairs.text, "text")
            codes_alive = (zv > 0).any(0) | (zt > 0).any(0)
            labels = label_features(zv, zt, y.float(), names,
                                    min_corr, data=source.describe(part),
                                    provenance={"sae": sae_record(sae), "capture": manifest_record(manifest, layer)})
        labels.save(sae_dir / "labels.json")
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(str(exc))
    typer.echo(label_summary(labels, codes_alive, min_corr) + f" -> {sae_dir / 'labels.json'}")


def label_summary(labels: Any, alive: Any, min_corr: float) -> str:
    """One line: how many features got a label, of which kinds, and why the rest did not (never active on the
    labelling pairs, or active but correlated with no concept at ``min_corr`` or more)."""
    counts = labels.counts()
    n = len(labels.labels)
    unlabelled = [lab for lab in labels.labels if lab.label is None]
    dead = sum(1 for lab in unlabelled if not bool(alive[lab.feature]))
    kinds = ", ".join(f"{counts.get(k, 0)} {k}" for k in ("shared", "vision-only", "text-only"))
    return (f"labelled {n - len(unlabelled)} of {n} features ({kinds}); {len(unlabelled)} unlabelled: {dead} never "
            f"active on these pairs, {len(unlabelled) - dead} active but no concept "
            f"correlates with them at --min-corr {min_corr:g} or more (Pearson, image or caption code)")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@sae_app.command()
def steer(
    sae_dir: Path = typer.Option(..., "--sae", help="JSAE directory with labels.json"),
    concept: str = typer.Option(...),
    layer: int = typer.Option(..., callback=LAYER),
    alpha: float = typer.Option(..., help="strength added along the sum of unit decoder directions", callback=number(-65504, 65504, why='beyond it a float16 model overflows')),
    model: str = typer.Option("llava", help="the VLM the SAE belongs to: a toy name, a hub id or a directory"),
    n: int = typer.Option(8, help="images to caption (without the concept; with it for --suppress)", callback=number(1)),
    data: Optional[str] = typer.Option(None, help="caption the images of this caption dataset (path or hub id) instead of world images"),
    split: str = typer.Option("train", help="split of --data"),
    images: Optional[Path] = typer.Option(None, help="caption the images of this folder instead (no concept filter)"),
    prompt: Optional[str] = typer.Option(None, help="captioning prompt (default: 'describe the image' on the world, 'Describe the image.' otherwise)"),
    steer_at: Optional[str] = typer.Option(None, help="where to add the direction: image (the image tokens at prefill; default) | generated (every generated token) | image+generated (both; --preset reference) | image_but_last | last"),
    max_new_tokens: Optional[int] = typer.Option(None, min=1, help="greedy caption length (default 32; --preset reference: 50)", callback=TOKENS),
    suppress: bool = typer.Option(False, help="clamp the concept's features to 0 on images that contain it instead"),
    kinds: str = typer.Option("shared,vision-only,text-only", help="which labelled features of the concept to use "
                                                                  "(labels.json kinds, comma-separated; strongest first)"),
    n_features: int = typer.Option(3, min=0, help="use the concept's N strongest features (the protocol's 3; 0: all)"),
    decoder: str = typer.Option("vision", help="steer along the features' vision decoder rows (default: in the world "
                                               "only these steer the image) or their text rows (the JSAE paper's choice)"),
    seed: int = typer.Option(0, callback=SEED),
    preset: str = typer.Option("default", help="default | reference (steering at the image tokens and every generated token, 50 new "
                                               "tokens, the reference's Mistral instruction prompt 'Describe the image.' when "
                                               "the tokenizer knows its words; explicit options win)"),
    dtype: str = _M["dtype"], device: Optional[str] = _M["device"], device_map: Optional[str] = _M["device_map"],
) -> None:
    """Steer toward (or suppress) a labelled concept; print captions before and after.  Images: world test
    images (default), a caption dataset (--data) or an image folder (--images)."""
    if not math.isfinite(alpha):
        fail(f"--alpha must be a finite number, got {alpha}")
    if data and images:
        fail("pass --data or --images, not both")
    kind_list = [k.strip() for k in kinds.split(",") if k.strip()]
    known_kinds = ("shared", "vision-only", "text-only")
    if not kind_list or any(k not in known_kinds for k in kind_list):
        fail(f"--kinds {kinds!r}: give one or more of {', '.join(known_kinds)}, comma-separated")
    if decoder not in ("vision", "text"):
        fail(f"--decoder {decoder!r}: choose vision or text")
    from jsae.protocol.config import PRESET_CHOICES, PRESETS

    if preset not in PRESETS:
        fail(f"unknown preset {preset!r}; choose one of {list(PRESETS)}")
    steer_at = steer_at or PRESET_CHOICES[preset]["steer_at"]
    max_new_tokens = max_new_tokens or PRESET_CHOICES[preset]["max_new_tokens"]
    from jsae import load_vlm
    from jsae.interventions import Ablate, Captioner
    from jsae.protocol.methods import Method
    from jsae.protocol.sweep import POSITION_SETS, steer_interventions
    from jsae.saes.joint_sae import JointSAE
    from jsae.world.concepts import mentions as world_mentions

    try:
        sae = JointSAE.load_from_disk(sae_dir)
        _check_layer(sae, layer)
        feats, few = _concept_features(sae, sae_dir, concept, kind_list, n_features, "world" if not (data or images)
                                       else "captions", check_kind=not images)
        picked, mentions, others = _steer_images(concept, n, data, split, images, suppress, seed)
        if mentions is None:
            mentions = world_mentions
        vlm = load_vlm(model, dtype=dtype, device=device, device_map=device_map)
        vlm.adapter.check_layer(layer)
        from jsae.interventions import check_sae_site

        check_sae_site(sae, layer, vlm.adapter, f"steering ({sae_dir})",
                       f"pass the --model it was trained on ({sae.cfg.metadata.get('model_name') or 'see its cfg.json'}), "
                       "or an SAE trained on this model and layer")
        if steer_at not in POSITION_SETS:
            raise ValueError(f"unknown --steer-at {steer_at!r}; choose one of {list(POSITION_SETS)}")
    except (ValueError, FileNotFoundError, OSError) as exc:
        fail(str(exc))
    if few:  # said once every check has passed: an error stays the only line
        typer.echo(few, err=True)
    if suppress:
        ivs = [Ablate(layer=layer, positions="image", timing="prefill", sae=sae, features=feats, sae_modality="vision")]
    else:
        direction = Method("jsae", sae, True).steer_direction(feats, decoder)
        ivs = steer_interventions(layer, steer_at, direction, alpha)
    text, template = _steer_prompt(prompt, preset, model, world=not (data or images), vlm=vlm)
    caption = Captioner(vlm.model, vlm.processor, vlm.adapter, prompt=text, max_new_tokens=max_new_tokens,
                        prompt_template=template)
    if not suppress:  # the strength in the report's units: the added norm over the layer's mean image-token norm
        from jsae.protocol.sweep import token_norm

        added = abs(alpha) * float(direction.norm())
        unit = token_norm(vlm, picked, layer, text, template)
        typer.echo(f"steering at {steer_at} ({', '.join(t for _, t in POSITION_SETS[steer_at])}): alpha {alpha:g} adds a "
                   f"vector of norm {added:.3g} = {added / unit:.2f} x the layer's mean image-token state norm "
                   f"({unit:.3g}), the report's strength r")
    before, after = caption(picked, []), caption(picked, ivs)
    _print_steering(concept, before, after, others, mentions, f"features {feats}, " + (
        "clamped to 0" if suppress else f"alpha {alpha:g} along their {decoder} decoder rows"))


def _concept_features(sae: Any, sae_dir: Path, concept: str, kind_list: list[str], n_features: int, want: str,
                      check_kind: bool) -> tuple[list[int], str | None]:
    """The concept's ``n_features`` strongest labelled features of ``kind_list`` (0: all) from ``sae_dir``'s
    labels.json, checked against the SAE and (``check_kind``) labelled on ``want`` data ("world" or "captions");
    and a note when fewer carry the label."""
    from jsae.labels import FeatureLabels

    path = sae_dir / "labels.json"
    if not path.exists():
        fail(f"{sae_dir} has no labels.json; run `jsae sae label` first")
    labels = FeatureLabels.load(path)
    labels.check_sae(sae, f"the SAE in {sae_dir}")
    kind = (labels.data or {}).get("kind", "world")
    if kind != want and check_kind:
        fail(f"{path} labels features on {kind} data, but these images are {want} data; label this SAE on "
             f"{'the world (`jsae sae label` without --data)' if want == 'world' else 'caption data (`jsae sae label --data`)'}")
    found = labels.features_for(concept, kind_list)
    feats = found[:n_features] if n_features else found
    if not feats:
        fail(f"no feature of kind {', '.join(kind_list)} is labelled {concept!r} in {path} "
             f"(labelled concepts: {sorted({lab.label for lab in labels.labels if lab.label})}); label on more "
             "held-out pairs, lower `jsae sae label --min-corr`, or pick another --concept / --kinds")
    few = (f"note: {len(found)} feature(s) of kind {', '.join(kind_list)} carry the label {concept!r}, fewer than "
           f"--n-features {n_features}; using {feats}") if n_features and len(found) < n_features else None
    return feats, few


def _steer_prompt(prompt: Optional[str], preset: str, model: str, world: bool, vlm: Any) -> tuple[str, Optional[str]]:
    """``(captioning prompt, caption template)``: ``--prompt``, else the world's or the reference's prompt; under
    ``--preset reference`` the reference's instruction when the tokenizer knows its words (a note says when not)."""
    from jsae.protocol.config import ProtocolConfig
    from jsae.protocol.reference import REFERENCE_CAPTION_PROMPT, reference_prompts
    from jsae.world.processors import CAPTION_PROMPT

    text = prompt if prompt is not None else (CAPTION_PROMPT if world else REFERENCE_CAPTION_PROMPT)
    template = None
    if preset == "reference":  # the reference's captioning prompt when the tokenizer knows its words
        ref, notes = reference_prompts(ProtocolConfig(model=model, preset="reference", prompt=prompt), vlm.processor, vlm.adapter)
        if ref.caption_template is not None:
            text, template = ref.prompt or "", ref.caption_template
        elif "unknown_words" in notes["caption"]:
            typer.echo(f"note: the model's own prompt is kept: its tokenizer lacks {notes['caption']['unknown_words']} "
                       f"of the reference's {notes['caption']['reference']!r}", err=True)
    return text, template


def _print_steering(concept: str, before: list[str], after: list[str], others: Any, mentions: Any, how: str) -> None:
    """The captions before (-) and after (+), the concept's mention rate before -> after, and (world images) how many
    of the other objects named unsteered are still named."""
    for b, a in zip(before, after):
        typer.echo(f"- {b}\n+ {a}")

    def rate(caps: list[str]) -> float:
        return sum(mentions(c, concept) for c in caps) / max(len(caps), 1)

    typer.echo(f"'{concept}' mentioned: {rate(before):.2f} -> {rate(after):.2f} ({how})")
    if others is not None:
        kept = [[mentions(a, o) for o in objs if mentions(b, o)] for b, a, objs in zip(before, after, others)]
        flat = [k for ks in kept for k in ks]
        typer.echo(f"preservation: {sum(flat)}/{len(flat)} of the other objects named unsteered are still named"
                   + (f" ({sum(flat) / len(flat):.2f})" if flat else " (no other object named before)"))


def _steer_images(concept: str, n: int, data: str | None, split: str, images: Path | None, suppress: bool,
                  seed: int) -> tuple[list, Any, list[list[str]] | None]:
    """(images, mention test, the other concepts each image holds): world test images, rows of a caption dataset,
    or the files of a folder (no ground truth: None); the first two filtered to images that lack the concept (have
    it, for suppression)."""
    from jsae.data.judges import caption_presence, caption_words
    from jsae.data.sources import CaptionSource, WorldSource

    if images is not None:
        from PIL import Image

        files = sorted(p for p in Path(images).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if Path(images).is_dir() else []
        if not files:
            fail(f"{images} holds no images ({', '.join(IMAGE_SUFFIXES)}); pass a folder of pictures")
        from jsae.data.images import to_rgb

        picked = []
        for p in files[:n]:
            try:
                picked.append(to_rgb(Image.open(p), "the image"))
            except OSError as exc:  # not an image PIL can open
                fail(f"the image {p} cannot be opened ({str(exc).splitlines()[0]}); fix or remove it")
        return picked, (lambda text, c: c in caption_words(text)), None
    if data:
        source = CaptionSource.whole(data, split)
        items = source.items(split)
        has = caption_presence(items, [concept])[:, 0].bool()
        mentions = (lambda text, c: c in caption_words(text))
    else:
        source = WorldSource.split("test", 200, seed)
        y, names = source.presence("test")
        if concept not in names:
            fail(f"{concept!r} is not a world concept; world concepts: {names}")
        items, has, mentions = source.items("test"), y[:, names.index(concept)].bool(), None
        from jsae.world.scenes import TYPES  # the other objects, as the protocol's preservation counts them

        present = [[c for c, v in zip(names, row) if v and c != concept and c in TYPES] for row in y.tolist()]
    if data:
        present = [sorted(caption_words(ex["caption"]) - {concept}) for ex in items]
    keep = [i for i, h in enumerate(has) if bool(h) == suppress][:n]
    if not keep:
        fail(f"no image {'has' if suppress else 'lacks'} {concept!r}; try another --seed or more data")
    return [items[i]["image"] for i in keep], mentions, [present[i] for i in keep]


__all__ = ["TRAIN_DEFAULTS", "label", "label_summary", "sae_app", "steer", "train", "train_configs"]
