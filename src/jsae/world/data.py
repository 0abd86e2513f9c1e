"""Hugging Face ``datasets`` views of the world and of real caption data, with one shared schema.

Schema (``FEATURES``): ``image_id`` (str), ``image`` (Image), ``caption`` (str), ``captions`` (list of
str), ``objects`` (list of {name, category, color, size, position, bbox [x, y, w, h], mask}), ``qa`` (list
of {question, answer}). Real data fills what it has and leaves the rest empty, so the pipeline cannot
tell the world from COCO.
"""

from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from jsae.world import grammar
from jsae.world.scenes import Scene, WorldConfig, check_seed, generate_scene

SPLITS = {"train": 0, "validation": 1, "test": 2}

_OBJECT = {"name": "string", "category": "string", "color": "string", "size": "string", "position": "string"}


def _list_feature():
    """datasets' list feature: ``List`` (datasets >= 4); on datasets 3 the same schema spelled with its
    ``Sequence`` (lists of values) and a ``[feature]`` literal (lists of records)."""
    try:
        from datasets import List

        return List
    except ImportError:  # datasets 3.x
        from datasets import Sequence

        def List(feature, length: int = -1):  # noqa: N802 - datasets' spelling
            return [feature] if isinstance(feature, dict) else Sequence(feature, length=length)

        return List


def features():
    from datasets import Features, Image, Value

    List = _list_feature()  # noqa: N806
    obj = {k: Value(v) for k, v in _OBJECT.items()}
    obj["bbox"] = List(Value("float32"), length=4)
    obj["mask"] = List(Value("int8"))
    return Features({
        "image_id": Value("string"),
        "image": Image(),
        "caption": Value("string"),
        "captions": List(Value("string")),
        "objects": List(obj),
        "qa": List({"question": Value("string"), "answer": Value("string")}),
    })


def scene_seed(seed: int, split: str, index: int) -> int:
    """The scene seed of item ``index`` of ``split`` for a world seed (splits never share scenes)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {list(SPLITS)}")
    ss = np.random.SeedSequence([check_seed(seed), SPLITS[split], int(index)])
    return int(ss.generate_state(1, dtype=np.uint32)[0]) * 4 + SPLITS[split]


def scene_record(scene: Scene, image_id: str, rng: np.random.Generator, n_questions: int = 4) -> dict:
    caps = grammar.all_captions(scene)
    return {
        "image_id": image_id,
        "image": scene.image,
        "caption": caps[int(rng.integers(len(caps)))],
        "captions": caps,
        "objects": [o.to_record() for o in scene.objects],
        "qa": [{"question": q, "answer": a} for q, a in grammar.sample_questions(scene, n_questions, rng)],
    }


def iter_world(split: str = "train", n: int = 1000, seed: int = 0, config: WorldConfig | None = None,
               start: int = 0) -> Iterator[tuple[Scene, dict]]:
    """Yield ``(scene, record)`` for items ``start .. start+n-1`` of a split."""
    seed = check_seed(seed)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    for i in range(start, start + n):
        s = scene_seed(seed, split, i)
        scene = generate_scene(s, config)
        rng = np.random.default_rng(s + 1)
        yield scene, scene_record(scene, f"world-{split}-{seed}-{i}", rng)


def world_dataset(split: str = "train", n: int = 1000, seed: int = 0, config: WorldConfig | None = None):
    """The world as a ``datasets.Dataset`` (deterministic for ``seed``; disjoint train/validation/test)."""
    from datasets import Dataset

    rows = [rec for _, rec in iter_world(split, n, seed, config)]
    return Dataset.from_list(rows, features=features())


def world_splits(n_train: int = 2000, n_validation: int = 500, n_test: int = 500, seed: int = 0,
                 config: WorldConfig | None = None):
    """A ``DatasetDict`` with train / validation / test."""
    from datasets import DatasetDict

    return DatasetDict({"train": world_dataset("train", n_train, seed, config),
                        "validation": world_dataset("validation", n_validation, seed, config),
                        "test": world_dataset("test", n_test, seed, config)})


# ----------------------------------------------------------------------------------------------------
# real data

_CAPTION_COLUMNS = ("caption", "captions", "sentences", "text", "sentences_raw", "answer")
_IMAGE_COLUMNS = ("image", "img", "picture")
_ID_COLUMNS = ("image_id", "cocoid", "id", "filename", "file_name")  # what identifies an image (COCO: one row per caption)


def _as_captions(v) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, dict):  # e.g. {"raw": [...]} / {"text": [...]}
        for k in ("raw", "text", "caption", "captions"):
            if k in v:
                return _as_captions(v[k])
        return []
    out: list[str] = []
    for x in v:
        out.extend(_as_captions(x))
    return out


def _as_objects(v, names: list[str] | None) -> list[dict]:
    if not v:
        return []
    if isinstance(v, dict):  # dict of lists (COCO-style detection features)
        keys = list(v)
        n = len(v[keys[0]]) if keys else 0
        v = [{k: v[k][i] for k in keys} for i in range(n)]
    out = []
    for o in v:
        name = o.get("name", o.get("category", o.get("label", "")))
        if isinstance(name, (int, np.integer)) and names:
            name = names[int(name)]
        bbox = o.get("bbox") or [0.0, 0.0, 0.0, 0.0]
        out.append({"name": str(name), "category": str(o.get("supercategory", o.get("category_name", ""))),
                    "color": str(o.get("color", "")), "size": str(o.get("size", "")),
                    "position": str(o.get("position", "")), "bbox": [float(b) for b in list(bbox)[:4]],
                    "mask": [int(m) for m in o.get("mask", [])] if isinstance(o.get("mask", []), list) else []})
    return out


def load_caption_dataset(path_or_id: str, split: str = "train", image_column: str | None = None,
                         caption_column: str | None = None, objects_column: str | None = "objects",
                         limit: int | None = None, **load_kwargs):
    """Load a COCO-captions-style dataset (local directory, data files or hub id) into the world schema.

    Accepts a directory written by ``save_to_disk``, an image folder with ``metadata.jsonl``/``.csv``
    (``file_name`` + caption column), data files (json/jsonl/csv/parquet), or a hub id (needs network).
    Captions may be a string or a list (the first becomes ``caption``). Objects, if present, are mapped
    to the world's object records (``bbox`` as x, y, w, h).
    """
    import datasets as hf

    if not isinstance(path_or_id, (str, os.PathLike)) or not str(path_or_id):
        raise ValueError(f"path_or_id must be a non-empty path or hub id, got {path_or_id!r}")
    p = str(path_or_id)
    if os.path.isdir(p) and os.path.exists(os.path.join(p, "dataset_info.json")) or (
            os.path.isdir(p) and os.path.exists(os.path.join(p, "dataset_dict.json"))):
        ds = hf.load_from_disk(p)
        if isinstance(ds, hf.DatasetDict):
            ds = ds[split]
    elif os.path.isdir(p) and any(f.startswith("metadata.") for f in os.listdir(p)):
        ds = hf.load_dataset("imagefolder", data_dir=p, split=split, **load_kwargs)
    elif os.path.isfile(p):
        ext = p.rsplit(".", 1)[-1].lower()
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
        if builder is None:
            raise ValueError(f"unsupported data file {p!r}; use .json/.jsonl/.csv/.parquet or a dataset directory")
        ds = hf.load_dataset(builder, data_files={split: p}, split=split, **load_kwargs)
    elif os.path.exists(p):
        raise ValueError(f"{p!r} is neither a saved dataset, an image folder with metadata, nor a data file")
    else:
        try:
            ds = hf.load_dataset(p, split=split, **load_kwargs)
        except Exception as e:  # offline / unknown id
            raise ValueError(f"could not load dataset {p!r} (split {split!r}): {type(e).__name__}: {e}. "
                             "Pass a local path, or check the hub id and network access.") from e
    cols = ds.column_names
    image_column = image_column or next((c for c in _IMAGE_COLUMNS if c in cols), None)
    caption_column = caption_column or next((c for c in _CAPTION_COLUMNS if c in cols), None)
    if image_column not in cols:
        raise ValueError(f"no image column in {p!r} (columns {cols}); pass image_column=")
    if caption_column not in cols:
        raise ValueError(f"no caption column in {p!r} (columns {cols}); pass caption_column=")
    names = None
    if objects_column in cols:
        try:
            names = ds.features[objects_column].feature["category"].names  # ClassLabel names
        except Exception:
            names = None
    if limit is not None:
        ds = ds.select(range(min(int(limit), len(ds))))
    base = os.path.basename(p.rstrip("/")) or "data"
    ds = ds.cast_column(image_column, hf.Image()) if not isinstance(ds.features[image_column], hf.Image) else ds

    def rows():
        for i, ex in enumerate(ds):
            caps = _as_captions(ex[caption_column])
            img = ex[image_column]  # as stored: made 8-bit RGB where it meets a model (jsae.data.images.to_rgb in build_inputs)
            key = next((k for k in _ID_COLUMNS if ex.get(k) is not None), None)
            yield {"image_id": str(ex[key]) if key else f"{base}-{split}-{i}", "image": img,
                   "caption": caps[0] if caps else "", "captions": caps,
                   "objects": _as_objects(ex.get(objects_column), names) if objects_column in cols else [],
                   "qa": []}

    return hf.Dataset.from_list(list(rows()), features=features())
