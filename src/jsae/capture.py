"""Paired pooled capture: for each (image, caption) the layer-``L`` state pooled over the image tokens
("vision") and over the caption tokens ("text"), written as safetensors shards, and read back as the
paired batches the JSAE trainer consumes.

One nnsight trace per batch reads every requested layer (``adapter.layers[L].output``), pools per sample
and stops the forward after the last requested layer (``tracer.stop()``).  Directory layout::

    out_dir/manifest.json            model, layers, hook_names, pooling, fingerprint, count, dtype, shards,
                                     prepend_bos, context_size (longest prompt), dataset_path
    out_dir/shard-00000.safetensors  layer_4.vision [n, d_in], layer_4.text [n, d_in], ...

A shard is written to a temporary name and renamed; the manifest is rewritten (tmp + rename) after
every shard, so a killed run resumes from the last shard with the exact pair count and no duplicates
(shards hold whole batches, so a resumed run sees the same batches as an uninterrupted one).
Memory: one batch of activations plus one shard of pooled vectors, whatever the data size.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Bool, Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from jsae.guards import shape_checked
from jsae.activations import read_layers
from jsae.data.sources import dataset_fingerprint
from jsae.adapters import VLMAdapter, prepends_bos
from jsae.files import apply_umask, tmp_sibling, write_json

POOLINGS = ("mean", "max", "last")
EVAL_METADATA = ("prepend_bos", "context_size", "dataset_path")  # what SAELens's evals read from an SAE's metadata
TEXT_POSITIONS = ("caption", "non_image")  # the caption tokens only | every attended non-image token (the reference)
MANIFEST = "manifest.json"
FORMAT = "jsae-capture/1"
Pooling = Literal["mean", "max", "last"]


# ================================================================================================
# Pooling
# ================================================================================================


@shape_checked
def pool(hidden: Float[Tensor, "batch seq d"], mask: Bool[Tensor, "batch seq"], pooling: str = "mean") -> Float[Tensor, "batch d"]:
    """Pool ``hidden`` over the positions of ``mask`` per row: ``"mean"``, ``"max"`` or ``"last"`` (the
    last masked position), always in float32 (a mean of thousands of fp16 states would overflow: 2,928
    tokens of value 30.0 sum past fp16's 65,504).  Every row needs at least one masked position."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}")
    mask = mask.to(hidden.device)
    hidden = hidden.float()
    if pooling == "mean":
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1)
    if pooling == "max":
        return hidden.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    pos = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, pos, -1).amax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


# ================================================================================================
# Capture
# ================================================================================================


def _model_name(adapter: VLMAdapter) -> str:
    """The model's hub id or path, or a shipped toy model's name (not its installed directory)."""
    from jsae.world.models import toy_name

    path = str(getattr(adapter.config, "_name_or_path", "") or "")
    return toy_name(path) or path or type(adapter.hf_model).__name__


def _check_pairs(pairs: Any) -> None:
    if not (hasattr(pairs, "__len__") and hasattr(pairs, "__getitem__")):
        raise TypeError(f"pairs must be a sequence of (image, caption) with len() and indexing (for exact resume), got {type(pairs).__name__}")
    if len(pairs) == 0:
        raise ValueError("pairs is empty; give at least one (image, caption) pair")


def capture_pairs(
    model: Any,
    pairs: Sequence[tuple[Any, str]],
    *,
    layers: int | Sequence[int],
    out_dir: str | os.PathLike[str],
    processor: Any = None,
    pooling: Pooling = "mean",
    batch_size: int = 8,
    shard_size: int = 1024,
    dtype: torch.dtype = torch.float32,
    fingerprint: str | None = None,
    chat_template: bool | None = None,
    prompt_template: str | None = None,
    text_positions: str = "caption",
    adapter: VLMAdapter | None = None,
    dataset_path: str | None = None,
    progress: bool = True,
) -> Path:
    """Capture pooled (vision, text) activations of ``pairs`` at ``layers`` into ``out_dir``; returns it.

    ``model`` is nnsight-wrapped (``jsae.load_vlm``) or a bare transformers VLM; ``processor`` builds the
    inputs (``adapter.build_inputs``; default ``model.processor``).  Re-running on a directory with the
    same model, layers, pooling and data resumes; a finished capture returns at once.
    ``fingerprint`` replaces the default sha256 of the data (e.g. a dataset name and revision).
    ``prompt_template`` is a raw prompt string instead of the chat template (e.g. the JSAE reference's
    ``"USER: <image>\n{caption}\nASSISTANT:"``); ``text_positions`` pools the text view over the caption tokens
    (``"caption"``) or every attended non-image token (``"non_image"``: BOS, template words and caption, as
    the reference does).  ``dataset_path`` (a hub id or folder the pairs come from) is recorded for the SAEs
    trained on the capture (SAELens's ``dataset_path``), as are ``prepend_bos`` and ``context_size``.
    """
    from jsae.vlm import as_vlm

    model, processor, adapter = as_vlm(model, processor, adapter)
    _check_pairs(pairs)
    layer_list = sorted({adapter.check_layer(L) for L in ([layers] if isinstance(layers, int) else list(layers))})
    if not layer_list:
        raise ValueError("layers is empty; pass the decoder layer(s) to capture, e.g. layers=[4]")
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; choose one of {list(POOLINGS)}")
    if text_positions not in TEXT_POSITIONS:
        raise ValueError(f"unknown text_positions {text_positions!r}; choose one of {list(TEXT_POSITIONS)}")
    if batch_size <= 0 or shard_size <= 0:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    shard_size = -(-shard_size // batch_size) * batch_size  # whole batches per shard: resume sees the same batches
    from jsae.guards import check_output_dir
    from jsae.locks import DirLock

    out = check_output_dir(out_dir, "out_dir")
    created = not out.exists()
    existed = not created and (out / MANIFEST).exists()
    try:
        with DirLock(out, "jsae capture"):
            try:
                return _capture_locked(model, pairs, adapter, processor, out, layer_list, pooling, batch_size, shard_size,
                                       dtype, fingerprint, chat_template, prompt_template, text_positions, progress,
                                       dataset_path)
            except _PairError:
                if not existed:  # a fresh capture of bad data: remove it, so the corrected data is not refused
                    _remove_capture(out)
                raise
    except _PairError:
        if created and {f.name for f in out.iterdir()} <= {".jsae.lock"}:
            shutil.rmtree(out, ignore_errors=True)
        raise


class _PairError(ValueError):
    """A pair of the data cannot be captured (its image or caption is malformed)."""


def _remove_capture(out: Path) -> None:
    for f in out.iterdir():
        if f.name == MANIFEST or f.name.startswith(("shard-", ".shard-", f".{MANIFEST}.tmp-")):
            f.unlink(missing_ok=True)


def _check_batch(batch: list[Any], start: int) -> None:
    """One-line errors naming the pair (its index in ``pairs``) whose image or caption is malformed."""
    for i, p in enumerate(batch, start):
        if not (isinstance(p, (tuple, list)) and len(p) == 2):
            raise _PairError(f"pair {i} is {type(p).__name__}, not an (image, caption) pair; give every pair as (image, caption)")
        image, text = p
        if image is None:
            raise _PairError(f"pair {i}: the image is None; drop the pair or give its image")
        if not isinstance(text, str):
            raise _PairError(f"pair {i}: the caption is {type(text).__name__} ({text!r:.40}), not a string; drop the pair "
                             "or give its caption as text")
        if not text.strip():
            raise _PairError(f"pair {i}: the caption is empty; drop the pair or give its caption")


def _checked_pairs(pairs: Any) -> Any:
    """``pairs`` one at a time (never all images in memory), each checked by :func:`_check_batch`."""
    for i in range(len(pairs)):
        pair = pairs[i]
        _check_batch([pair], i)
        yield pair


def _capture_locked(model: Any, pairs: Any, adapter: VLMAdapter, processor: Any, out: Path, layer_list: list[int],
                    pooling: str, batch_size: int, shard_size: int, dtype: torch.dtype, fingerprint: str | None,
                    chat_template: bool | None, prompt_template: str | None, text_positions: str, progress: bool,
                    dataset_path: str | None = None) -> Path:
    if fingerprint is None:  # one streaming pass reads every pair: check each before writing anything, and hash it
        fingerprint = dataset_fingerprint(_checked_pairs(pairs))
    settings = {
        "format": FORMAT,
        "model": _model_name(adapter),
        "model_class": type(adapter.hf_model).__name__,
        "layers": layer_list,
        "hook_names": [adapter.hook_name(L) for L in layer_list],
        "pooling": pooling,
        "text_positions": text_positions,
        "prompt_template": prompt_template,
        "fingerprint": fingerprint,
        "total": len(pairs),
        "dtype": str(dtype).removeprefix("torch."),
        "d_in": adapter.d_in,
        "batch_size": batch_size,
        "shard_size": shard_size,
        "prepend_bos": prepends_bos(processor),
        "dataset_path": dataset_path,
    }
    manifest = _open_manifest(out, settings)
    manifest = {**manifest, "prepend_bos": settings["prepend_bos"], "dataset_path": dataset_path}
    done = manifest["count"]
    n = len(pairs)
    bar = tqdm(total=n, initial=done, desc="capture", unit="pair", disable=not progress)
    pending: dict[str, list[Tensor]] = {f"layer_{L}.{m}": [] for L in layer_list for m in ("vision", "text")}
    pending_n = 0
    try:
        for start in range(done, n, batch_size):
            batch = [pairs[i] for i in range(start, min(start + batch_size, n))]
            _check_batch(batch, start)
            images, texts = [p[0] for p in batch], [p[1] for p in batch]
            try:
                inputs = adapter.build_inputs(processor, images, texts, chat_template=chat_template,
                                              prompt_template=prompt_template)
            except (ValueError, TypeError) as err:
                raise _PairError(f"pairs {start}..{start + len(batch) - 1}: {str(err).splitlines()[0]}") from None
            for key, value in _capture_batch(model, adapter, inputs, layer_list, pooling, text_positions).items():
                pending[key].append(value.to(dtype).cpu())
            longest = int(adapter._attention(inputs).sum(dim=1).max())
            manifest["context_size"] = max(int(manifest.get("context_size") or 0), longest)
            pending_n += len(batch)
            bar.update(len(batch))
            if pending_n >= shard_size:
                manifest = _flush(out, manifest, pending, pending_n)
                pending_n = 0
        if pending_n:
            manifest = _flush(out, manifest, pending, pending_n)
        manifest["complete"] = True
        write_json(out / MANIFEST, manifest)
    finally:
        bar.close()
    return out


def _capture_batch(model: Any, adapter: VLMAdapter, inputs: Any, layers: list[int], pooling: str,
                   text_positions: str = "caption") -> dict[str, Tensor]:
    """Every layer in ``layers`` pooled over image and text tokens (one trace, stopping after the last)."""
    image_mask = adapter.image_token_mask(inputs)
    caption_mask = adapter.caption_token_mask(inputs) if text_positions == "caption" else adapter.non_image_token_mask(inputs)

    def both(hidden: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        return pool(hidden, image_mask, pooling), pool(hidden, caption_mask, pooling)

    out: dict[str, Tensor] = {}
    for L, (vision, text) in read_layers(model, adapter, inputs, layers, reduce=both).items():
        out[f"layer_{L}.vision"], out[f"layer_{L}.text"] = vision, text
    return out


def _open_manifest(out: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """The manifest to continue from (a fresh one for a new directory), after removing leftovers of a
    killed run (temporary files, shards the manifest does not list)."""
    path = out / MANIFEST
    if path.exists():
        try:
            manifest = json.loads(path.read_text())
            if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
                raise ValueError("not a jsae capture manifest")
        except ValueError as exc:
            raise ValueError(f"{path} is corrupt ({str(exc).splitlines()[0]}); delete {out} to capture anew, or use "
                             "a new out_dir") from None
        defaults = {"text_positions": "caption", "prompt_template": None}  # captures made before these existed
        for key in ("format", "model", "model_class", "layers", "pooling", "text_positions", "prompt_template", "fingerprint",
                    "total", "dtype", "batch_size", "shard_size"):
            if manifest.get(key, defaults.get(key)) != settings[key]:
                raise ValueError(
                    f"{out} holds a capture with {key}={manifest.get(key)!r}, not {settings[key]!r}; "
                    "use a new out_dir or the same settings to resume"
                )
    else:
        manifest = {**settings, "count": 0, "shards": [], "complete": False}
    listed = {s["file"] for s in manifest["shards"]}
    for f in out.iterdir():
        if (f.name.endswith(".tmp") or f.name.startswith((f".{MANIFEST}.tmp-", ".shard-"))
                or (f.name.startswith("shard-") and f.name.endswith(".safetensors") and f.name not in listed)):
            f.unlink()
    if not path.exists():
        write_json(path, manifest)
    return manifest


def _flush(out: Path, manifest: dict[str, Any], pending: dict[str, list[Tensor]], n: int) -> dict[str, Any]:
    name = f"shard-{len(manifest['shards']):05d}.safetensors"
    tensors = {k: torch.cat(v).contiguous() for k, v in pending.items()}
    tmp = tmp_sibling(out / name)
    save_file(tensors, str(tmp), metadata={"count": str(n)})
    os.replace(apply_umask(tmp), out / name)
    for v in pending.values():
        v.clear()
    manifest = {**manifest, "shards": [*manifest["shards"], {"file": name, "count": n}], "count": manifest["count"] + n}
    write_json(out / MANIFEST, manifest)
    return manifest


# ================================================================================================
# Reading back
# ================================================================================================


def read_manifest(out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; run jsae.capture_pairs(..., out_dir={str(out_dir)!r}) first")
    try:
        manifest = json.loads(path.read_text())
        missing = [k for k in ("layers", "shards", "count") if not isinstance(manifest, dict) or k not in manifest]
        if missing:
            raise ValueError(f"no {missing}")
    except ValueError as exc:
        raise ValueError(f"{path} is corrupt ({str(exc).splitlines()[0]}); capture again into a new folder") from None
    return manifest


def sae_metadata(out_dir: str | os.PathLike[str] | dict[str, Any], layer: int) -> dict[str, Any]:
    """What an SAE trained on layer ``layer`` of this capture (a directory or its manifest) records (SAELens
    ``cfg.metadata``): model, layer, hook (the module path; :class:`~jsae.saes.JointSAE` adds the TransformerLens
    names), pooling, data fingerprint, and what SAELens's evals read: ``prepend_bos``, ``context_size`` (the
    longest prompt captured, in tokens) and ``dataset_path`` (when the pairs came from a dataset)."""
    manifest = out_dir if isinstance(out_dir, dict) else read_manifest(out_dir)
    out = {"model_name": manifest.get("model"), "model_class": manifest.get("model_class"), "layer": int(layer),
           "hook_name": dict(zip(manifest.get("layers", []), manifest.get("hook_names", []))).get(layer),
           "pooling": manifest.get("pooling"), "data_fingerprint": manifest.get("fingerprint"),
           "prepend_bos": manifest.get("prepend_bos"), "context_size": manifest.get("context_size"),
           "dataset_path": manifest.get("dataset_path")}
    return {k: v for k, v in out.items() if v is not None}


def read_layer(out_dir: str | os.PathLike[str], layer: int | None = None, *, dtype: torch.dtype = torch.float32,
               allow_incomplete: bool = False) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """``(vision [n, d_in], text [n, d_in], manifest)`` of one captured layer (default: the only one)."""
    manifest = read_manifest(out_dir)
    if not manifest.get("complete") and not allow_incomplete:
        raise ValueError(f"the capture in {out_dir} is incomplete ({manifest['count']}/{manifest['total']} pairs); "
                         "re-run capture_pairs to finish it or pass allow_incomplete=True")
    layers = manifest["layers"]
    if layer is None:
        if len(layers) != 1:
            raise ValueError(f"{out_dir} holds layers {layers}; pass layer=")
        layer = layers[0]
    if layer not in layers:
        raise ValueError(f"layer {layer} was not captured in {out_dir}; captured layers: {layers}")
    parts: dict[str, list[Tensor]] = {"vision": [], "text": []}
    for shard in manifest["shards"]:
        with safe_open(str(Path(out_dir) / shard["file"]), framework="pt") as f:
            for m in parts:
                parts[m].append(f.get_tensor(f"layer_{layer}.{m}").to(dtype))
    if not parts["vision"]:
        raise ValueError(f"{out_dir} holds no captured pairs yet")
    return torch.cat(parts["vision"]), torch.cat(parts["text"]), manifest
