"""Data sources: the one owner of where (image, caption) pairs come from.

A source has named *parts* (the protocol uses ``"train"``, ``"label"`` and ``"eval"``; the CLI a single
world split), and for each part the rows (``datasets.Dataset`` in the world schema: ``image``,
``caption``, ``objects``, ...), the pairs, the concept presence used for labelling, and a **fingerprint**:
the sha256 of every image and caption of the part, in order (:func:`dataset_fingerprint`).
The fingerprint is written into every capture manifest, labels file and run directory, and whatever reads
them back (``jsae sae label``, ``jsae sae steer``, the protocol) refuses data whose fingerprint does not match.

* :class:`WorldSource`: the embedded world (exact ground truth; concepts are object types, categories and
  colours; the judge is :class:`~jsae.data.judges.WorldJudge`).
* :class:`CaptionSource`: a COCO-captions-style dataset (path or hub id), cut into consecutive slices;
  concepts are caption words; the judge is :class:`~jsae.data.judges.CaptionJudge` with the VLM's own
  no-image perplexity as fluency guard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import Tensor

from jsae.guards import human_size

WORLD_SPLITS = ("train", "validation", "test")

#: memory one world pair takes while a split is generated and held (a lower bound: the peak measured with
#: ``world_dataset("train", 2000)`` was about 69 KB a pair, the image alone is 48 x 48 x 3 bytes)
WORLD_PAIR_BYTES = 16 * 1024


def machine_memory() -> int:
    """This machine's RAM in bytes (what a world split or a caption dataset is held in)."""
    import os

    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 1 << 62


def check_world_pairs(n: int, what: str | None = "n") -> int:
    """Refuse ``n`` world pairs (``MemoryError``, one line with the estimate) when generating and holding them
    needs more than this machine's memory, before a single scene is drawn; returns ``n``.  ``what`` names the
    setting to lower (None: "it")."""
    need, total = int(n) * WORLD_PAIR_BYTES, machine_memory()
    if need > total:
        raise MemoryError(f"{f'{what} = ' if what else ''}{n} world pairs need about {human_size(need)} of memory (at least "
                          f"{human_size(WORLD_PAIR_BYTES)} each) but this machine has {human_size(total)}; lower {what or 'it'}")
    return int(n)


def _image_bytes(image: Any) -> bytes:
    if hasattr(image, "tobytes") and hasattr(image, "mode"):  # PIL
        return f"{image.mode}{image.size}".encode() + image.tobytes()
    if isinstance(image, Tensor):
        return str(tuple(image.shape)).encode() + image.detach().cpu().contiguous().numpy().tobytes()
    arr = np.ascontiguousarray(np.asarray(image))
    return str(arr.shape).encode() + arr.tobytes()


def dataset_fingerprint(pairs: Sequence[tuple[Any, str]]) -> str:
    """sha256 over every caption and image (pixels, mode and size), in order."""
    h = hashlib.sha256()
    for image, caption in pairs:
        images = image if isinstance(image, (list, tuple)) else [image]
        for im in images:
            h.update(_image_bytes(im))
        h.update(b"\x00" + str(caption).encode() + b"\x01")
    return h.hexdigest()[:32]


def _image_key(image: Any) -> str:
    return hashlib.sha256(_image_bytes(image)).hexdigest()


def check_fingerprint(found: str | None, expected: str, what: str, fix: str) -> None:
    """One-line error when ``found`` (read from a capture, labels file or run) is not ``expected``."""
    if found is not None and found != expected:
        raise ValueError(f"{what} was made from other data (fingerprint {found[:12]}…, this data {expected[:12]}…); {fix}")


@dataclass
class _Source:
    """Shared behaviour: cached rows per part, pairs, items, fingerprints."""

    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    kind = "source"

    @property
    def parts(self) -> tuple[str, ...]:
        raise NotImplementedError

    def _load(self, part: str) -> Any:
        raise NotImplementedError

    def _check_part(self, part: str) -> str:
        if part not in self.parts:
            raise ValueError(f"unknown part {part!r} of this {self.kind} source; its parts are {list(self.parts)}")
        return part

    def dataset(self, part: str) -> Any:
        """The rows of ``part`` (a ``datasets.Dataset`` in the world schema)."""
        if part not in self._cache:
            self._cache[part] = self._load(self._check_part(part))
        return self._cache[part]

    def with_captions(self, part: str, captions: Sequence[str], how: str = "generated") -> None:
        """Replace the captions of ``part`` (e.g. by the VLM's own greedy captions, so that the text view pools
        text the model produces); the fingerprint and ``describe`` follow the new captions."""
        ds = self.dataset(part)
        if len(captions) != len(ds):
            raise ValueError(f"{len(captions)} captions for the {len(ds)} rows of part {part!r}; give one per row")
        self._cache[part] = ds.remove_columns(["caption"]).add_column("caption", [str(c) for c in captions])
        self._cache.pop(f"fingerprint:{part}", None)
        self._cache.pop(f"items:{part}", None)
        self._cache[f"captions:{part}"] = how

    def items(self, part: str) -> list[dict]:
        ds = self.dataset(part)
        return [ds[i] for i in range(len(ds))]

    def pairs(self, part: str) -> Any:
        """The (image, caption) pairs of ``part``: a list (world) or a lazy sequence that decodes each image
        when it is read (a caption dataset may not fit in memory); both have ``len`` and indexing."""
        return [(ex["image"], ex["caption"]) for ex in self.dataset(part)]

    def fingerprint(self, part: str) -> str:
        key = f"fingerprint:{part}"
        if key not in self._cache:
            self._cache[key] = dataset_fingerprint(self.pairs(part))
        return self._cache[key]

    def prepare(self, batch_map: Callable[..., list[Any]] | None = None) -> dict[str, str]:
        """Every part's rows and fingerprint, made now: ``{part: fingerprint}``.  ``batch_map(fn, spans, done)``
        computes the parts not made yet, one span each (default: one after another in this process; the protocol
        passes :func:`jsae.parallel.forked_map`, which shares them with a forked second process and sends back the rows
        a part had not loaded and its fingerprint); the rows and fingerprints are the same either way."""
        todo = [part for part in self.parts if f"fingerprint:{part}" not in self._cache]
        loaded = {part for part in todo if part in self._cache}  # rows already here: only the fingerprint comes back

        def one(k: int, _: int) -> tuple[Any, str]:
            part = todo[k]
            return (None if part in loaded else self.dataset(part)), self.fingerprint(part)

        spans = [(k, k + 1) for k in range(len(todo))]
        if batch_map is None:
            made = [one(*span) for span in spans]
        else:
            made = batch_map(one, spans, lambda span: None)
        for part, (rows, fp) in zip(todo, made):
            if part not in loaded:
                self._cache[part] = rows
            self._cache[f"fingerprint:{part}"] = fp
        return {part: self.fingerprint(part) for part in self.parts}

    def describe(self, part: str) -> dict[str, Any]:
        """What a manifest or labels file records about the data of ``part``."""
        return {"kind": self.kind, "part": part, "n": len(self.dataset(part)), "fingerprint": self.fingerprint(part),
                "captions": self._cache.get(f"captions:{part}", "dataset"), **self._settings(part)}

    def _settings(self, part: str) -> dict[str, Any]:
        return {}


@dataclass
class WorldSource(_Source):
    """The embedded world: ``parts`` maps a part name to ``(world split, n)``; deterministic for ``seed``."""

    split_sizes: Mapping[str, tuple[str, int]] = field(default_factory=lambda: {
        "train": ("train", 2000), "label": ("validation", 400), "eval": ("test", 1200)})
    seed: int = 0
    kind = "world"

    def __post_init__(self) -> None:
        for part, (split, n) in self.split_sizes.items():
            if split not in WORLD_SPLITS:
                raise ValueError(f"unknown world split {split!r} for part {part!r}; use one of {list(WORLD_SPLITS)}")
            if int(n) <= 0:
                raise ValueError(f"part {part!r} needs a positive number of pairs, got {n}")
        check_world_pairs(sum(int(n) for _, n in self.split_sizes.values()),
                          " + ".join(f"n_{part}" for part in self.split_sizes) if len(self.split_sizes) > 1 else "n")

    @classmethod
    def protocol(cls, n_train: int, n_label: int, n_eval: int, seed: int = 0) -> "WorldSource":
        return cls({"train": ("train", n_train), "label": ("validation", n_label), "eval": ("test", n_eval)}, seed)

    @classmethod
    def split(cls, split: str, n: int, seed: int = 0) -> "WorldSource":
        """One world split as the only part (named after the split), as the CLI's ``--split/--n/--seed``."""
        return cls({split: (split, n)}, seed)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.split_sizes)

    def _load(self, part: str) -> Any:
        from jsae.world.data import world_dataset

        split, n = self.split_sizes[part]
        return world_dataset(split, int(n), self.seed)

    def _settings(self, part: str) -> dict[str, Any]:
        split, n = self.split_sizes[part]
        return {"split": split, "seed": self.seed}

    @property
    def concepts(self) -> list[str]:
        from jsae.world.concepts import world_concepts

        return world_concepts()

    def presence(self, part: str) -> tuple[Tensor, list[str]]:
        """``([n, C] 0/1, concept names)``: which world concepts each image of ``part`` contains."""
        from jsae.world.concepts import concept_presence

        names = self.concepts
        return concept_presence([ex["objects"] for ex in self.items(part)], names), names

    def items(self, part: str) -> list[dict]:
        """The rows of ``part`` as dicts, images decoded once and kept (a world part is small: its memory is
        checked when the source is made), so the stages that read a part again decode nothing."""
        key = f"items:{part}"
        if key not in self._cache:
            self._cache[key] = super().items(part)
        return list(self._cache[key])

    def pairs(self, part: str) -> Any:
        return [(ex["image"], ex["caption"]) for ex in self.items(part)]

    def judge(self, model: Any = None, processor: Any = None) -> Any:
        from jsae.data.judges import WorldJudge

        return WorldJudge()


@dataclass
class CaptionSource(_Source):
    """A caption dataset (path or hub id) cut into consecutive slices ``part -> n`` in the order of
    ``sizes``; caption words that occur in ``min_count`` labelling captions are the concepts."""

    path: str = ""
    data_split: str = "train"
    sizes: Mapping[str, int] = field(default_factory=lambda: {"train": 2000, "label": 400, "eval": 1200})
    min_count: int = 5
    max_perplexity: float | None = None
    label_part: str = "label"
    dedup_images: bool = True  # one row per image (COCO has one row per caption), so the parts are disjoint in images
    seed: int = 0  # picks each image's caption among its captions, and the image order when ``shuffle``
    shuffle: bool = False  # a seeded sample of the images instead of the dataset's order
    kind = "captions"

    def __post_init__(self) -> None:
        if not self.path:
            raise ValueError("CaptionSource needs path=, a COCO-captions-style dataset (path or hub id)")
        if any(int(n) <= 0 for n in self.sizes.values()):
            raise ValueError(f"every part needs a positive number of rows, got {dict(self.sizes)}")

    @classmethod
    def protocol(cls, path: str, data_split: str, n_train: int, n_label: int, n_eval: int, *, min_count: int = 5,
                 max_perplexity: float | None = None) -> "CaptionSource":
        return cls(path=path, data_split=data_split, sizes={"train": n_train, "label": n_label, "eval": n_eval},
                   min_count=min_count, max_perplexity=max_perplexity)

    @classmethod
    def whole(cls, path: str, data_split: str = "train", min_count: int = 5) -> "CaptionSource":
        """Every row of ``data_split`` as one part named after it (the CLI's ``--data``)."""
        return cls(path=path, data_split=data_split, sizes={data_split: 10**12}, min_count=min_count, label_part=data_split)

    @property
    def parts(self) -> tuple[str, ...]:
        return tuple(self.sizes)

    def _rows(self) -> Any:
        if "rows" not in self._cache:
            from jsae.world.data import load_caption_dataset

            need = sum(int(n) for n in self.sizes.values())
            limit = None if need >= 10**12 or self.dedup_images or self.shuffle else need
            try:
                ds = load_caption_dataset(self.path, split=self.data_split, limit=limit)
            except Exception as exc:  # noqa: BLE001 - datasets, pyarrow and PIL fail deep inside on a malformed folder or image
                # jsae's own ValueErrors and a missing path say what to fix already; pyarrow's ArrowInvalid is a ValueError
                # too, and says only what it could not parse (datasets 3 reads metadata.jsonl with it: "Empty JSON file")
                if isinstance(exc, (FileNotFoundError, MemoryError)) or (
                        isinstance(exc, ValueError) and not type(exc).__module__.startswith("pyarrow")):
                    raise
                raise ValueError(f"could not read the caption dataset {self.path!r} (split {self.data_split!r}): "
                                 f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}; check its images "
                                 "and its metadata file (metadata.jsonl or .csv: one row per image, with file_name and a "
                                 "caption)") from None
            if len(ds) == 0:
                raise ValueError(f"the caption dataset {self.path!r} (split {self.data_split!r}) has no rows; give it "
                                 "(image, caption) rows")
            if self.dedup_images or self.shuffle:
                ds = self._one_row_per_image(ds, None if need >= 10**12 else need)
            if limit is None and need < 10**12 and len(ds) >= need:
                ds = ds.select(range(need))
            if need < 10**12 and len(ds) < need:
                names = " + ".join(f"n_{part}" for part in self.sizes)
                flags = " / ".join(f"--n-{part.replace('_', '-')}" for part in self.sizes)
                raise ValueError(f"{self.path!r} ({self.data_split}) has {len(ds)} rows but {names} = {need}; "
                                 f"lower {flags} or use a larger dataset")
            self._cache["rows"] = ds
        return self._cache["rows"]

    def prepare(self, batch_map: Callable[..., list[Any]] | None = None) -> dict[str, str]:
        """:meth:`_Source.prepare` with the dataset read and cut into its parts here first (the parts share its rows),
        so only the fingerprints are computed by ``batch_map``."""
        for part in self.parts:
            self.dataset(part)
        return super().prepare(batch_map)

    def _one_row_per_image(self, ds: Any, need: int | None) -> Any:
        """One row per image (``image_id``; the pixels where the data has no id column), its caption drawn
        with ``seed`` among the image's captions; the images in dataset order, or a seeded sample."""
        rng = np.random.default_rng(self.seed)
        ids = ds["image_id"]
        has_ids = len(set(ids)) < len(ids) or not all(str(i).startswith(f"{Path(self.path).name}-") for i in ids)
        groups: dict[str, list[int]] = {}
        for i in range(len(ds)):
            key = str(ids[i]) if has_ids or not self.dedup_images else _image_key(ds[i]["image"])
            groups.setdefault(key if self.dedup_images else str(i), []).append(i)
        order = list(groups)
        if self.shuffle:
            order = [order[j] for j in rng.permutation(len(order))]
        if need is not None:
            order = order[:need]
        keep, captions = [], []
        for key in order:
            rows = groups[key]
            refs = [c for r in rows for c in (ds[r]["captions"] or [ds[r]["caption"]])]
            keep.append(rows[0])
            captions.append(refs[int(rng.integers(len(refs)))] if len(refs) > 1 else refs[0])
        out = ds.select(keep)
        refs_all = [[c for r in groups[key] for c in (ds[r]["captions"] or [ds[r]["caption"]])] for key in order]
        out = out.remove_columns(["caption", "captions"]).add_column("caption", captions).add_column("captions", refs_all)
        return out.cast(ds.features)

    def _load(self, part: str) -> Any:
        ds, start = self._rows(), 0
        for name, n in self.sizes.items():
            stop = min(start + int(n), len(ds))
            if name == part:
                return ds if (start, stop) == (0, len(ds)) else ds.select(range(start, stop))
            start = stop
        raise AssertionError(part)

    def _settings(self, part: str) -> dict[str, Any]:
        return {"path": self.path, "split": self.data_split}

    def pairs(self, part: str) -> Any:
        return LazyPairs(self.dataset(part))

    @property
    def concepts(self) -> list[str]:
        from jsae.data.judges import concepts_from_captions

        key = "concepts"
        if key not in self._cache:
            _, self._cache[key] = concepts_from_captions([ex["caption"] for ex in self.dataset(self.label_part)],
                                                         min_count=self.min_count)
        return self._cache[key]

    def presence(self, part: str) -> tuple[Tensor, list[str]]:
        """``([n, C] 0/1, concept words)``: which caption words each row's reference captions have."""
        from jsae.data.judges import caption_presence

        names = self.concepts
        return caption_presence(self.items(part), names), names

    def judge(self, model: Any = None, processor: Any = None) -> Any:
        """The caption judge; its fluency guard is the no-image perplexity under ``model``."""
        from jsae.data.judges import CaptionJudge, text_perplexity

        if model is None:
            raise ValueError("the caption judge needs the VLM for its perplexity guard: pass model= and processor=")
        return CaptionJudge(self.concepts, lambda texts: text_perplexity(model, processor, texts),
                            max_perplexity=self.max_perplexity)


class LazyPairs:
    """``(image, caption)`` pairs read from a dataset on demand (``len``, indexing and slicing)."""

    def __init__(self, ds: Any):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        ex = self.ds[int(i)]
        return ex["image"], ex["caption"]

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))


DataSource = WorldSource | CaptionSource

__all__ = ["CaptionSource", "DataSource", "LazyPairs", "WORLD_PAIR_BYTES", "WorldSource", "check_fingerprint",
           "check_world_pairs", "dataset_fingerprint", "machine_memory"]
