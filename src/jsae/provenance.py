"""Provenance: where a checkpoint, an SAE, a labels file or a run came from, and the one comparison of two
such records.

A record is a plain dict with any of the keys ``model`` (a hub id, path or toy name), ``model_class``,
``layer``, ``hook_name``, ``pooling``, ``data`` (a data fingerprint) and ``d_in``.  :func:`mismatches` lists
the keys on which two records disagree, ignoring keys unknown to either side (files written before a key
existed stay usable); :func:`check_same` turns them into one :class:`ProvenanceError` line that names both
values and the override.
"""

from __future__ import annotations

from typing import Any, Mapping

KEYS = ("model", "model_class", "layer", "hook_name", "pooling", "d_in", "data")


class ProvenanceError(ValueError):
    """Something made in one context is being used in another."""


def _model_key(name: Any) -> str:
    """A model's name without its folder or organisation: ``/x/models/llava``, ``llava`` and ``org/llava``
    name the same model; ``Qwen/Qwen3-VL-8B`` and ``llava`` do not."""
    return str(name).rstrip("/").replace("\\", "/").rsplit("/", 1)[-1].lower()


def same_model(a: Any, b: Any) -> bool:
    """Whether two model names (hub ids, paths, toy names) may name the same model (unknown: yes)."""
    return a is None or b is None or a == b or _model_key(a) == _model_key(b)


def mismatches(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``[(key, a's value, b's value)]`` for the keys both records know and disagree on."""
    out = []
    for key in KEYS:
        x, y = a.get(key), b.get(key)
        if x is None or y is None:
            continue
        if key == "model":
            if not same_model(x, y):
                out.append((key, x, y))
        elif key == "layer":
            if int(x) != int(y):
                out.append((key, x, y))
        elif x != y:
            out.append((key, x, y))
    return out


def check_same(found: Mapping[str, Any], here: Mapping[str, Any], what: str, where: str, fix: str) -> None:
    """One-line :class:`ProvenanceError` when ``found`` (the record of ``what``) disagrees with ``here``."""
    bad = mismatches(found, here)
    if bad:
        def short(v: Any) -> str:  # a data fingerprint (long hex) to its first 12 characters
            s = str(v)
            return s[:12] + "…" if len(s) > 24 and all(c in "0123456789abcdef" for c in s) else s

        diff = ", ".join(f"{k} {short(x)!s} vs {short(y)!s}" for k, x, y in bad)
        raise ProvenanceError(f"{what} was made for another context than {where} ({diff}); {fix}")


def sae_record(sae_or_cfg: Any) -> dict[str, Any]:
    """The provenance of an SAE (SAELens ``cfg.metadata``: model_name, layer, hook_name, pooling, data); its hook is
    the module path (``hf_hook_name``, as captures and adapters name it) when the metadata has one."""
    cfg = getattr(sae_or_cfg, "cfg", sae_or_cfg)
    meta = getattr(cfg, "metadata", None)
    get = (lambda k: meta.get(k) if hasattr(meta, "get") else getattr(meta, k, None)) if meta is not None else (lambda k: None)
    out = {"model": get("model_name"), "model_class": get("model_class"), "layer": get("layer"),
           "hook_name": get("hf_hook_name") or get("hook_name"), "pooling": get("pooling"), "data": get("data_fingerprint"),
           "d_in": getattr(cfg, "d_in", None)}
    return {k: v for k, v in out.items() if v is not None}


def manifest_record(manifest: Mapping[str, Any], layer: int | None = None) -> dict[str, Any]:
    """The provenance of one layer of a capture (its ``manifest.json``)."""
    hooks = dict(zip(manifest.get("layers", []), manifest.get("hook_names", [])))
    out = {"model": manifest.get("model"), "model_class": manifest.get("model_class"), "layer": layer,
           "hook_name": hooks.get(layer) if layer is not None else None, "pooling": manifest.get("pooling"),
           "data": manifest.get("fingerprint"), "d_in": manifest.get("d_in")}
    return {k: v for k, v in out.items() if v is not None}


__all__ = ["KEYS", "ProvenanceError", "check_same", "manifest_record", "mismatches", "same_model", "sae_record"]
