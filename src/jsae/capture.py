"""Paired pooled capture: for each (image, caption) the layer-``L`` state pooled over the image tokens
("vision") and over the caption tokens ("text"), written as safetensors shards, and read back as the
paired batches the JSAE trainer consumes.

One nnsight trace per batch reads every requested layer (``adapter.layers[L].output``), pools per sample
and stops the forward after the last requested layer (``tracer.stop()``).  Directory layout::

    out_dir/manifest.json            model, layers, hook_names, pooling, fingerprint, count, dtype, shards,
                                     prepend_bos, context_size (longest prompt), dataset_path
    out_dir/shard-00000.safetensors  layer_4.vision [n, d_in], layer_4.text [n, d_in], ...

**Shards are the unit of work.**  Shard ``k`` holds pairs ``[k·shard_size, (k+1)·shard_size)`` in the pairs'
order (``shard_size`` is rounded up to whole batches); its metadata records its first pair, its count and
the capture's *plan* (a hash of every setting its contents depend on).  A shard is written to a temporary
name and renamed, then listed in the manifest (tmp + rename), so a killed run resumes at its first missing
shard, with the exact pair count and no duplicates; a complete shard the manifest does not list yet (killed
in between) is adopted when its metadata matches, anything else is deleted.

**Bucketed batches** (``bucket=True``, the default for a new capture): the pairs of a shard are ordered by
image-token count, largest first (``adapter.num_image_tokens`` of each image's size through the processor's
settings, before any forward; ties in data order), then cut into batches, so a batch pads its rows to a
similar length; the pooled vectors are put back in the pairs' order before the shard is written.  On data
whose images all give the same count the batches are exactly the unbucketed ones.
:func:`capture_batches` gives the batches a capture runs.

**Data parallel** (``torchrun --nproc_per_node N``, or any started ``torch.distributed`` job): every rank
calls :func:`capture_pairs` with the same arguments; shard ``k`` is captured by rank ``k mod N``.  Rank 0
takes the directory's lock, checks and hashes the data and opens the manifest; it alone writes the manifest
(after each of its shards, listing every complete shard on disk); when every rank is done it marks the
capture complete.  A shard's batches do not depend on the world size, so the shards equal a one-process
capture's bit for bit, and a capture killed under one world size resumes under any other (its shards are
re-read as they are).  An error on any rank (e.g. a malformed pair) is raised on every rank.
Coordination runs over a gloo group of its own (small Python objects), whatever backend the job uses.

**A model larger than one device**: one process with the model spread over devices
(``jsae.load_vlm(name, device_map="auto")``, or a ``{module: device}`` map, ``max_memory``; what fits nowhere is
offloaded to disk); inputs go to its main device and each layer's states are pooled where they are, so the pooled
vectors equal a one-device capture's (``tests/test_device_map.py``).  ``jsae run capture --dry-run`` says how many
GPUs a model needs (:func:`jsae.cost.plan_gpus`).

Memory: one batch of activations plus one shard of pooled vectors, whatever the data size.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from jaxtyping import Bool, Float
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from jsae.guards import shape_checked
from jsae.activations import last_positions, read_layers
from jsae.data.sources import dataset_fingerprint
from jsae.adapters import VLMAdapter, prepends_bos
from jsae.files import apply_umask, tmp_sibling, write_json, writing
from jsae.locks import LOCK_FILE, DirLock
from jsae.vlm import model_name

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
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last_positions(mask)]


# ================================================================================================
# Capture
# ================================================================================================


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
    fingerprint: str | Callable[[], str] | None = None,
    chat_template: bool | None = None,
    prompt_template: str | None = None,
    text_positions: str = "caption",
    bucket: bool | None = None,
    adapter: VLMAdapter | None = None,
    dataset_path: str | None = None,
    progress: bool = True,
    batch_map: Callable[..., list[Any]] | None = None,
) -> Path:
    """Capture pooled (vision, text) activations of ``pairs`` at ``layers`` into ``out_dir``; returns it.

    ``model`` is nnsight-wrapped (``jsae.load_vlm``) or a bare transformers VLM; ``processor`` builds the
    inputs (``adapter.build_inputs``; default ``model.processor``).  Re-running on a directory with the
    same model, layers, pooling and data resumes; a finished capture returns at once.
    ``fingerprint`` replaces the default sha256 of the data (e.g. a dataset name and revision); a function
    returning it is called on rank 0 only (other ranks need not read the data to hash it).
    ``prompt_template`` is a raw prompt string instead of the chat template (e.g. the JSAE reference's
    ``"USER: <image>\n{caption}\nASSISTANT:"``); ``text_positions`` pools the text view over the caption tokens
    (``"caption"``) or every attended non-image token (``"non_image"``: BOS, template words and caption, as
    the reference does).
    ``bucket`` batches the pairs of each shard by image-token count (largest first) so a batch holds rows of
    similar length; the shard is written in the pairs' order all the same.  Default: on for a new capture,
    the existing capture's setting when resuming.

    Under ``torchrun`` (``WORLD_SIZE`` > 1, or a ``torch.distributed`` process group already started) every
    rank calls this with the same arguments and captures its own shards (shard ``k`` on rank ``k mod
    world_size``) into the one ``out_dir``; rank 0 keeps the manifest.  Put each rank's model on its own device
    (e.g. ``cuda:LOCAL_RANK``).  See the module docstring.
    ``dataset_path`` (a hub id or folder the pairs come from) is recorded for the SAEs trained on the capture
    (SAELens's ``dataset_path``), as are ``prepend_bos`` and ``context_size`` (the longest prompt, in tokens).
    ``batch_map(fn, spans, done)``: how a shard's batches are computed — it must return ``[fn(*span) for span in
    spans]`` and call ``done(span)`` as each is known (default: one after another in this process; the protocol
    passes :func:`jsae.parallel.forked_map`, which shares them with a forked second process).  The shards are
    the same either way.
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
    if not (fingerprint is None or isinstance(fingerprint, str) or callable(fingerprint)):
        raise TypeError(f"fingerprint must be a string, a function returning one, or None, got {type(fingerprint).__name__}")
    if bucket not in (None, True, False):
        raise ValueError(f"bucket must be True, False or None (the existing capture's setting), got {bucket!r}")
    shard_size = -(-shard_size // batch_size) * batch_size  # whole batches per shard: resume sees the same batches
    from jsae.guards import check_output_dir

    out = check_output_dir(out_dir, "out_dir")
    check_capture_disk(out, len(pairs), len(layer_list), adapter.d_in, dtype)
    job = _Capture(model, pairs, adapter, processor, out, layer_list, pooling, batch_size, shard_size, dtype,
                   chat_template, prompt_template, text_positions, bucket, progress, dataset_path, batch_map)
    ranks = _Ranks.join()
    try:
        return job.run(ranks, fingerprint)
    finally:
        ranks.leave()


def check_capture_disk(out: Path, n_pairs: int, n_layers: int, d_in: int, dtype: torch.dtype = torch.float32) -> int:
    """Refuse (``OSError``, one line with the estimate) a capture whose shards cannot fit on ``out``'s disk: two
    ``d_in`` vectors per pair and layer, less what a capture already in ``out`` holds; returns the estimate."""
    done = 0
    try:
        done = int(json.loads((out / MANIFEST).read_text()).get("count", 0))
    except (OSError, ValueError, AttributeError, TypeError):
        pass
    need = max(int(n_pairs) - done, 0) * n_layers * 2 * d_in * torch.empty((), dtype=dtype).element_size()
    base = out
    while not base.exists() and base.parent != base:
        base = base.parent
    free = shutil.disk_usage(base).free
    if need > free:
        from jsae.guards import human_size

        err = OSError(f"capturing {int(n_pairs) - done} pairs at {n_layers} layer(s) of width {d_in} needs about "
                      f"{human_size(need)} on disk but {base} has {human_size(free)} free; free some space, capture fewer pairs or "
                      "layers, or pass another out_dir")
        err.errno = 28  # ENOSPC
        raise err
    return need


class _PairError(ValueError):
    """A pair of the data cannot be captured (its image or caption is malformed)."""


def _remove_capture(out: Path) -> None:
    for f in out.iterdir():
        if f.name == MANIFEST or f.name.startswith(("shard-", ".shard-", f".{MANIFEST}.tmp-")):
            f.unlink(missing_ok=True)


def _check_batch(batch: list[Any], indices: Sequence[int]) -> None:
    """One-line errors naming the pair (its index in ``pairs``) whose image or caption is malformed."""
    for i, p in zip(indices, batch):
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
        _check_batch([pair], [i])
        yield pair


def _span(indices: Sequence[int]) -> str:
    """``"3..6"`` for consecutive indices, ``"3, 7, 9"`` otherwise (a bucketed batch)."""
    if list(indices) == list(range(indices[0], indices[0] + len(indices))):
        return f"{indices[0]}..{indices[-1]}"
    return ", ".join(map(str, indices))


# ---- bucketing ----------------------------------------------------------------------------------


def _image_hw(image: Any) -> tuple[int, int] | None:
    """(height, width) of a PIL image or an HWC / CHW array or tensor; None when it cannot be read."""
    if hasattr(image, "height") and hasattr(image, "width") and hasattr(image, "mode"):
        return int(image.height), int(image.width)
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) == 3:
        chw = shape[0] in (1, 3, 4) and shape[-1] not in (1, 3, 4)
        return (int(shape[1]), int(shape[2])) if chw else (int(shape[0]), int(shape[1]))
    if shape is not None and len(shape) == 2:
        return int(shape[0]), int(shape[1])
    return None


def image_token_count(adapter: VLMAdapter, processor: Any, pair: tuple[Any, str]) -> int:
    """Image tokens the pair's image(s) become through ``processor``'s settings, before any forward
    (``adapter.num_image_tokens`` of each image's size); 0 for an image whose size cannot be read."""
    images = pair[0] if isinstance(pair[0], (list, tuple)) else [pair[0]]
    total = 0
    for im in images:
        hw = _image_hw(im)
        total += adapter.num_image_tokens(hw[0], hw[1], processor) if hw is not None else 0
    return total


def capture_batches(n: int, batch_size: int, shard_size: int, tokens: Sequence[int] | None = None) -> list[list[list[int]]]:
    """The batches a capture runs: per shard (pairs ``[k·shard_size, (k+1)·shard_size)``, ``shard_size`` a
    multiple of ``batch_size``) a list of batches of pair indices.  Without ``tokens`` every batch is
    consecutive pairs; with ``tokens`` (image tokens per pair) each shard's pairs are ordered by token count,
    largest first (ties in data order), before they are cut into batches.  The world size plays no part."""
    out = []
    for a in range(0, n, shard_size):
        idx = list(range(a, min(a + shard_size, n)))
        if tokens is not None:
            idx.sort(key=lambda i: (-tokens[i], i))
        out.append([idx[j:j + batch_size] for j in range(0, len(idx), batch_size)])
    return out


# ---- ranks ----------------------------------------------------------------------------------------

_RANK_TIMEOUT_DAYS = 7  # the final gather waits for the slowest rank's share; torchrun ends the job if a rank dies


class _Ranks:
    """This process's rank and the world size of a ``torch.distributed`` job (0 of 1 outside one), and the
    three collectives capture needs, over a gloo group of its own (small Python objects, whatever backend
    the job runs; a long timeout, since ranks wait for the slowest one's share)."""

    def __init__(self, rank: int = 0, world: int = 1, group: Any = None):
        self.rank, self.world, self.group = rank, world, group

    @classmethod
    def join(cls) -> "_Ranks":
        import torch.distributed as dist

        wanted = int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
        if not (dist.is_available() and (wanted or dist.is_initialized())):
            if wanted:
                raise RuntimeError("WORLD_SIZE > 1 but this torch has no torch.distributed; run capture in one process")
            return cls()
        from datetime import timedelta

        if not dist.is_initialized():
            dist.init_process_group(backend="gloo", timeout=timedelta(days=_RANK_TIMEOUT_DAYS))
        if dist.get_world_size() == 1:
            return cls()
        group = dist.new_group(backend="gloo", timeout=timedelta(days=_RANK_TIMEOUT_DAYS))
        return cls(dist.get_rank(), dist.get_world_size(), group)

    def leave(self) -> None:
        """Destroy capture's own group; a default group started here stays up for the job's next step
        (the trainer uses it)."""
        import torch.distributed as dist

        if self.group is not None:
            dist.destroy_process_group(self.group)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        box: list[Any] = [None] * self.world
        dist.all_gather_object(box, obj, group=self.group)
        return box


_REBUILT = {"ValueError": ValueError, "TypeError": TypeError, "FileNotFoundError": FileNotFoundError,
            "OSError": OSError, "RuntimeError": RuntimeError, "DirectoryLocked": RuntimeError, "_PairError": ValueError}


def _describe(exc: BaseException | None, rank: int) -> tuple[int, str, str] | None:
    """What another rank needs to raise the same one-line error: (rank, type name, first line of the message)."""
    if exc is None:
        return None
    lines = str(exc).strip().splitlines()
    return rank, type(exc).__name__, lines[0] if lines else type(exc).__name__


def _rebuilt(failure: tuple[int, str, str], world: int) -> Exception:
    rank, name, msg = failure
    cls = _REBUILT.get(name)
    prefix = f"rank {rank} of {world}: " if world > 1 else ""
    return cls(prefix + msg) if cls is not None else RuntimeError(f"{prefix}{name}: {msg}")


# ---- the capture ------------------------------------------------------------------------------------


class _Capture:
    """One ``capture_pairs`` call's settings and its three steps: open (rank 0), shards (every rank), finish (rank 0)."""

    def __init__(self, model: Any, pairs: Any, adapter: VLMAdapter, processor: Any, out: Path, layers: list[int],
                 pooling: str, batch_size: int, shard_size: int, dtype: torch.dtype, chat_template: bool | None,
                 prompt_template: str | None, text_positions: str, bucket: bool | None, progress: bool,
                 dataset_path: str | None = None, batch_map: Callable[..., list[Any]] | None = None):
        self.model, self.pairs, self.adapter, self.processor, self.out = model, pairs, adapter, processor, out
        self.batch_map = batch_map or _in_process
        self.layers, self.pooling, self.batch_size, self.shard_size, self.dtype = layers, pooling, batch_size, shard_size, dtype
        self.chat_template, self.prompt_template, self.text_positions = chat_template, prompt_template, text_positions
        self.bucket, self.progress, self.dataset_path = bucket, progress, dataset_path
        self.n = len(pairs)
        self.n_shards = -(-self.n // shard_size)

    # ---- the shard plan ----
    def shard_range(self, k: int) -> tuple[int, int]:
        start = k * self.shard_size
        return start, min(self.shard_size, self.n - start)

    # ---- the whole run, on every rank ----
    def run(self, ranks: _Ranks, fingerprint: Any) -> Path:
        """Rank 0 opens the directory (lock, data check and hash, manifest) and tells every rank; the ranks
        check that they were given the same settings; each captures its shards; when all are done rank 0
        marks the capture complete.  An error while opening, in the settings check or while finishing is raised
        on every rank; an error while capturing is raised at once on its rank (``torchrun`` then ends the job).
        A fresh capture of bad data found in one process, or by rank 0's check before any shard, is removed, so
        the corrected data is not refused."""
        out = self.out
        created = not out.exists()
        existed = not created and (out / MANIFEST).exists()
        lock = DirLock(out, "jsae run capture")
        bad_data = opening = False
        try:
            manifest: Any = None
            if ranks.rank == 0:
                try:
                    opening = True  # nothing but rank 0 writes yet
                    lock.acquire()
                    manifest = self.open(fingerprint, ranks.world)
                    opening = False
                except Exception as exc:  # noqa: BLE001 - told to every rank, then raised here as it is
                    ranks.broadcast(_describe(exc, 0))
                    raise
            manifest = ranks.broadcast(manifest)
            if not isinstance(manifest, dict):
                raise _rebuilt(manifest, ranks.world)
            disagree = [f for f in ranks.gather(_describe(self.disagreement(manifest, ranks.rank), ranks.rank)) if f]
            if disagree:
                raise _rebuilt(disagree[0], ranks.world)
            manifest = self.capture_shards(manifest, ranks)
            ranks.gather(None)  # every rank is done
            if ranks.rank == 0:
                try:
                    self.finish(manifest, ranks.world)
                except Exception as exc:  # noqa: BLE001
                    ranks.broadcast(_describe(exc, 0))
                    raise
            failure = ranks.broadcast(None)
            if failure:
                raise _rebuilt(failure, ranks.world)
        except _PairError:
            bad_data = (ranks.world == 1 or opening) and not existed
            if bad_data:
                _remove_capture(out)
            raise
        finally:
            if ranks.rank == 0:
                lock.release()
            if bad_data and created and out.exists() and {f.name for f in out.iterdir()} <= {LOCK_FILE}:
                shutil.rmtree(out, ignore_errors=True)
        return out

    def disagreement(self, manifest: dict[str, Any], rank: int) -> ValueError | None:
        """Whether this rank was given other settings than rank 0 (every rank must cut the same pairs into the
        same shards)."""
        mine = self.settings(manifest["fingerprint"])
        for key in ("model_class", "layers", "pooling", "text_positions", "prompt_template", "total", "dtype",
                    "batch_size", "shard_size", "bucket"):
            if mine[key] != manifest[key] and not (key == "bucket" and mine[key] is None):
                return ValueError(f"rank {rank} was given {key}={mine[key]!r} but rank 0 {manifest[key]!r}; call "
                                  "capture_pairs with the same pairs and arguments on every rank")
        return None

    # ---- rank 0: the manifest ----
    def settings(self, fingerprint: str) -> dict[str, Any]:
        adapter = self.adapter
        return {
            "format": FORMAT,
            "model": model_name(adapter),
            "model_class": type(adapter.hf_model).__name__,
            "layers": self.layers,
            "hook_names": [adapter.hook_name(L) for L in self.layers],
            "pooling": self.pooling,
            "text_positions": self.text_positions,
            "prompt_template": self.prompt_template,
            "fingerprint": fingerprint,
            "total": self.n,
            "dtype": str(self.dtype).removeprefix("torch."),
            "d_in": adapter.d_in,
            "batch_size": self.batch_size,
            "shard_size": self.shard_size,
            "bucket": self.bucket,
            "prepend_bos": prepends_bos(self.processor),
            "dataset_path": self.dataset_path,
        }

    def open(self, fingerprint: Any, world: int) -> dict[str, Any]:
        """The manifest to continue from (a fresh one for a new directory), after removing leftovers of a
        killed run (temporary files, unreadable shards) and adopting the complete shards it does not list
        (a rank wrote them after rank 0 last wrote the manifest)."""
        if callable(fingerprint):
            fingerprint = fingerprint()
        if fingerprint is None:  # one streaming pass reads every pair: check each before writing anything, and hash it
            fingerprint = dataset_fingerprint(_checked_pairs(self.pairs))
        settings = self.settings(fingerprint)
        out, path = self.out, self.out / MANIFEST
        if path.exists():
            try:
                manifest = json.loads(path.read_text())
                if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
                    raise ValueError("not a jsae capture manifest")
            except ValueError as exc:
                raise ValueError(f"{path} is corrupt ({str(exc).splitlines()[0]}); delete {out} to capture anew, or use "
                                 "a new out_dir") from None
            # captures made before these settings existed
            defaults = {"text_positions": "caption", "prompt_template": None, "bucket": False}
            if settings["bucket"] is None:
                settings["bucket"] = manifest.get("bucket", False)
            for key in ("format", "model", "model_class", "layers", "pooling", "text_positions", "prompt_template",
                        "fingerprint", "total", "dtype", "batch_size", "shard_size", "bucket"):
                if manifest.get(key, defaults.get(key)) != settings[key]:
                    raise ValueError(
                        f"{out} holds a capture with {key}={manifest.get(key, defaults.get(key))!r}, not {settings[key]!r}; "
                        "use a new out_dir or the same settings to resume"
                    )
            start = 0
            for s in manifest["shards"]:  # captures made before shards recorded their first pair: a prefix
                s.setdefault("start", start)
                start = s["start"] + s["count"]
            manifest.update(bucket=settings["bucket"], plan=_plan(settings), prepend_bos=settings["prepend_bos"],
                            dataset_path=settings["dataset_path"])
            check_capture(out, manifest)  # a resumed capture starts from whole shards that match the manifest
        else:
            if settings["bucket"] is None:
                settings["bucket"] = True
            manifest = {**settings, "plan": _plan(settings), "count": 0, "shards": [], "complete": False}
        manifest["world_size"] = world
        listed = {s["file"] for s in manifest["shards"]}
        for f in out.iterdir():
            if f.name.endswith(".tmp") or f.name.startswith((f".{MANIFEST}.tmp-", ".shard-")):
                f.unlink()
        self.adopt(manifest, listed)
        write_json(path, manifest)
        return manifest

    def adopt(self, manifest: dict[str, Any], listed: set[str]) -> None:
        """Add to ``manifest`` the complete shards of this plan on disk that it does not list; delete other
        shard files it does not list."""
        for f in sorted(self.out.glob("shard-*.safetensors")):
            if f.name in listed:
                continue
            k = _shard_index(f.name)
            if k is not None and k < self.n_shards and _shard_is(f, manifest["plan"], *self.shard_range(k)):
                start, count = self.shard_range(k)
                manifest["shards"].append({"file": f.name, "start": start, "count": count})
            else:
                f.unlink()
        manifest["shards"].sort(key=lambda s: s["start"])
        manifest["count"] = sum(s["count"] for s in manifest["shards"])

    def finish(self, manifest: dict[str, Any], world: int) -> None:
        self.adopt(manifest, {s["file"] for s in manifest["shards"]})
        if manifest["count"] != self.n:
            raise RuntimeError(f"{self.out}: the ranks wrote {manifest['count']} of {self.n} pairs; re-run the same "
                               "capture to finish it")
        longest = [_shard_context(self.out / s["file"]) for s in manifest["shards"]]
        if longest and all(n is not None for n in longest):
            manifest["context_size"] = max(longest)  # type: ignore[type-var]
        manifest.update(complete=True, world_size=world)
        write_json(self.out / MANIFEST, manifest)

    # ---- every rank: its shards ----
    def capture_shards(self, manifest: dict[str, Any], ranks: _Ranks) -> dict[str, Any]:
        self.bucket = bool(manifest["bucket"])
        done = {s["start"] for s in manifest["shards"]}
        ours = [k for k in range(self.n_shards) if k % ranks.world == ranks.rank]
        todo = [k for k in ours if self.shard_range(k)[0] not in done]
        if ranks.rank == 0 and ranks.world > self.n_shards and todo:
            warnings.warn(f"only {self.n_shards} of {ranks.world} ranks have a shard to capture ({self.n} pairs, "
                          f"shard_size {self.shard_size}); pass a smaller shard_size to use every rank", stacklevel=4)
        total = sum(self.shard_range(k)[1] for k in ours)
        desc = "capture" if ranks.world == 1 else f"capture (rank 0 of {ranks.world})"
        bar = tqdm(total=total, initial=total - sum(self.shard_range(k)[1] for k in todo), desc=desc, unit="pair",
                   disable=not self.progress or ranks.rank != 0)
        try:
            for k in todo:
                name = self.write_shard(k, self.capture_shard(k, bar), manifest["plan"])
                if ranks.rank == 0:  # the manifest lists this shard and any another rank has written meanwhile
                    start, count = self.shard_range(k)
                    listed = {s["file"] for s in manifest["shards"]}
                    manifest["shards"].append({"file": name, "start": start, "count": count})
                    if ranks.world > 1:
                        self.adopt(manifest, listed | {name})
                    else:
                        manifest["count"] += count
                    write_json(self.out / MANIFEST, manifest)
        finally:
            bar.close()
        return manifest

    def capture_shard(self, k: int, bar: Any) -> dict[str, Tensor]:
        """Shard ``k``'s pooled vectors, in the pairs' order (bucketed batches are put back in place)."""
        start, count = self.shard_range(k)
        tokens = None
        if self.bucket:
            tokens = {}
            for i in range(start, start + count):
                pair = self.pairs[i]
                _check_batch([pair], [i])
                try:
                    tokens[i] = image_token_count(self.adapter, self.processor, pair)
                except (ValueError, TypeError) as err:
                    raise _PairError(f"pair {i}: {str(err).splitlines()[0]}") from None
        batches = capture_batches(count, self.batch_size, self.shard_size,
                                  None if tokens is None else [tokens[start + j] for j in range(count)])[0]
        def one(b: int, _: int) -> tuple[dict[str, Tensor], int] | _PairError:
            """Batch ``b``'s pooled vectors and its longest prompt; a bad pair comes back as its error."""
            idx = [start + j for j in batches[b]]
            batch = [self.pairs[i] for i in idx]
            try:
                _check_batch(batch, idx)
                images, texts = [p[0] for p in batch], [p[1] for p in batch]
                try:
                    inputs = self.adapter.build_inputs(self.processor, images, texts, chat_template=self.chat_template,
                                                       prompt_template=self.prompt_template)
                except (ValueError, TypeError) as err:
                    raise _PairError(f"pairs {_span(idx)}: {str(err).splitlines()[0]}") from None
            except _PairError as err:
                return err
            pooled = _capture_batch(self.model, self.adapter, inputs, self.layers, self.pooling, self.text_positions)
            return ({key: value.to(self.dtype).cpu() for key, value in pooled.items()},
                    int(self.adapter.attention_mask(inputs).sum(dim=1).max()))

        results = self.batch_map(one, [(b, b + 1) for b in range(len(batches))],
                                 lambda span: bar.update(len(batches[span[0]])))
        rows: dict[str, Tensor] = {}
        self.context_size = 0
        for batch_rows, res in zip(batches, results):
            if isinstance(res, _PairError):  # the first bad batch in the pairs' order, whichever process met it
                raise res
            pooled, context = res
            self.context_size = max(self.context_size, context)
            where = torch.tensor(batch_rows)
            for key, value in pooled.items():
                if key not in rows:
                    rows[key] = torch.empty(count, value.shape[-1], dtype=self.dtype)
                rows[key][where] = value
        return rows

    def write_shard(self, k: int, tensors: dict[str, Tensor], plan: str) -> str:
        start, count = self.shard_range(k)
        name = f"shard-{k:05d}.safetensors"
        tmp = tmp_sibling(self.out / name)
        try:
            with writing(self.out / name, "free some disk space and re-run the same capture: it resumes from the last shard"):
                save_file({key: v.contiguous() for key, v in tensors.items()}, str(tmp),
                          metadata={"count": str(count), "start": str(start), "plan": plan,
                                    "context_size": str(self.context_size)})
                os.replace(apply_umask(tmp), self.out / name)
        finally:
            tmp.unlink(missing_ok=True)
        return name


def _in_process(fn: Callable[..., Any], spans: list[tuple[int, int]], done: Callable[[tuple[int, int]], None]) -> list[Any]:
    """``[fn(*span) for span in spans]`` in this process, ``done(span)`` after each (:func:`capture_pairs`'s
    default ``batch_map``); a bad batch ends it (nothing after it is computed)."""
    out = []
    for span in spans:
        out.append(res := fn(*span))
        done(span)
        if isinstance(res, _PairError):
            break
    return out


def _plan(settings: dict[str, Any]) -> str:
    """A hash of everything a shard's contents depend on (not the world size): a shard on disk whose metadata
    carries it belongs to this capture."""
    keys = ("format", "model", "model_class", "layers", "pooling", "text_positions", "prompt_template", "fingerprint",
            "total", "dtype", "batch_size", "shard_size", "bucket")
    return hashlib.sha256(json.dumps({k: settings[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def _shard_context(path: Path) -> int | None:
    """The longest prompt (tokens) a shard's batches held, from its metadata; None for shards written before
    it was recorded."""
    try:
        with safe_open(str(path), framework="pt") as f:
            value = (f.metadata() or {}).get("context_size")
    except Exception:  # noqa: BLE001 - an unreadable shard is reported by check_capture, not here
        return None
    return int(value) if value is not None and value.isdigit() else None


def _shard_index(name: str) -> int | None:
    digits = name.removeprefix("shard-").removesuffix(".safetensors")
    return int(digits) if digits.isdigit() else None


def _shard_is(path: Path, plan: str, start: int, count: int) -> bool:
    """Whether ``path`` is a complete shard of ``plan`` holding pairs ``start .. start + count - 1``."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - any unreadable file is not a shard
        return False
    return meta.get("plan") == plan and meta.get("start") == str(start) and meta.get("count") == str(count)


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


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _shard_header(path: Path) -> dict[str, Any]:
    """The tensors (``{name: {"dtype", "shape"}}``) a safetensors file declares, read from its header only, after
    checking that the file is as long as the header promises (a truncated or corrupt file raises one line)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is listed in the capture's manifest but does not exist; capture again into a "
                                "new folder")
    size = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("shorter than a safetensors header")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, 100_000_000):
                raise ValueError(f"its header claims {n} bytes")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("its header is not a JSON object")
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: {"dtype": str(v["dtype"]), "shape": [int(d) for d in v["shape"]]} for k, v in tensors.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        raise ValueError(f"{path} is not a readable safetensors shard ({str(exc).splitlines()[0]}); it is corrupt: "
                         "capture again into a new folder") from None
    if 8 + n + end != size:
        raise ValueError(f"{path} is truncated ({size} bytes, its header promises {8 + n + end}); capture again into a "
                         "new folder")
    return shapes


def check_capture(out_dir: str | os.PathLike[str], manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check a capture against its manifest, from the shards' safetensors headers only (no tensor is read):
    every listed shard exists and is whole, holds ``layer_L.vision`` and ``layer_L.text`` for every captured
    layer, each ``[shard count, d_in]`` in the manifest's dtype, and the shard counts add up to the manifest's
    count (its total, once complete).  One-line ``ValueError`` naming the file and what differs; returns the
    manifest."""
    out = Path(out_dir)
    manifest = read_manifest(out) if manifest is None else manifest
    fix = "capture again into a new folder"
    layers, shards = manifest["layers"], manifest["shards"]
    d_in, dtype = manifest.get("d_in"), manifest.get("dtype")
    try:
        counts = [int(s["count"]) for s in shards]
        files = [str(s["file"]) for s in shards]
        count, total = int(manifest["count"]), manifest.get("total")
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{out / MANIFEST} is corrupt (a shard entry or the count is malformed: {exc}); {fix}") from None
    if sum(counts) != count:
        raise ValueError(f"{out / MANIFEST} claims {count} pairs but its shards list {sum(counts)}; the manifest or the "
                         f"shards were edited or mixed up: {fix}")
    if total is not None and (count > int(total) or (manifest.get("complete") and count != int(total))):
        raise ValueError(f"{out / MANIFEST} claims {count} captured pairs of a total of {total}; {fix}")
    from jsae.guards import confined

    for name, n in zip(files, counts):
        path = confined(out, name, f"the shard {name!r} listed in {out / MANIFEST}")
        header = _shard_header(path)
        for L in layers:
            for m in ("vision", "text"):
                key = f"layer_{L}.{m}"
                info = header.get(key)
                if info is None:
                    raise ValueError(f"{path} lacks the tensor {key} (the manifest lists layers {layers}); {fix}")
                shape = info["shape"]
                if len(shape) != 2 or shape[0] != n:
                    raise ValueError(f"{path}: {key} has shape {shape} but the manifest lists {n} pairs in this shard; "
                                     f"{fix}")
                width = d_in if d_in is not None else shape[1]
                if shape[1] != width:
                    raise ValueError(f"{path}: {key} is {shape[1]} wide but the manifest's model ({manifest.get('model')}) "
                                     f"is {width} wide; {fix}")
                d_in = width
                got = _DTYPES.get(info["dtype"], info["dtype"])
                if dtype is not None and got != dtype:
                    raise ValueError(f"{path}: {key} is {got} but the manifest says {dtype}; {fix}")
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
    """``(vision [n, d_in], text [n, d_in], manifest)`` of one captured layer (default: the only one), in the
    pairs' order; the capture is checked against its manifest first (:func:`check_capture`).  ``allow_incomplete``
    reads the shards captured so far (under data parallelism these need not be the first pairs: each shard entry of
    the manifest says which pairs it holds)."""
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
    check_capture(out_dir, manifest)
    parts: dict[str, list[Tensor]] = {"vision": [], "text": []}
    for shard in manifest["shards"]:  # listed in the pairs' order
        path = Path(out_dir) / shard["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                for m in parts:
                    parts[m].append(f.get_tensor(f"layer_{layer}.{m}").to(dtype))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            if isinstance(exc, MemoryError):
                raise
            raise ValueError(f"{path} could not be read ({str(exc).splitlines()[0]}); it is corrupt: capture again into "
                             "a new folder") from None
    if not parts["vision"]:
        raise ValueError(f"{out_dir} holds no captured pairs yet")
    return torch.cat(parts["vision"]), torch.cat(parts["text"]), manifest
