"""An SAE folder on disk (SAELens's layout: ``cfg.json`` + ``sae_weights.safetensors``): written atomically, and
validated with one-line errors before SAELens reads it (missing, foreign, corrupt, truncated, quantised, NaN/inf)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"


def atomic_save(path: str | Path, write: Callable[[Path], tuple[Path, Path]]) -> tuple[Path, Path]:
    """Let ``write`` fill a temporary sibling directory, then move its files into ``path``."""
    from jsae.files import apply_umask, writing

    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with writing(path / WEIGHTS_FILE):
            write(tmp)
        apply_umask(tmp)
        path.mkdir(parents=True, exist_ok=True)
        for name in (WEIGHTS_FILE, CFG_FILE):  # cfg last: a directory with a cfg.json is complete
            os.replace(tmp / name, path / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path / WEIGHTS_FILE, path / CFG_FILE


def check_sae_dir(path: str | Path) -> dict[str, Any]:
    """Validate a SAELens-layout jsae directory; returns its cfg dict or raises a one-line error."""
    from safetensors import safe_open

    path = Path(path)
    if not (path / CFG_FILE).is_file():
        raise FileNotFoundError(f"no {CFG_FILE} in {path}; pass the folder that holds {CFG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads((path / CFG_FILE).read_text())
    except ValueError as exc:
        raise ValueError(f"{path / CFG_FILE} is not valid JSON ({exc}); re-save the SAE with save_model") from exc
    arch = cfg.get("architecture")
    if arch != "jsae":
        raise ValueError(f"{path} holds a {arch!r} SAE, not a 'jsae' one; load it with sae_lens.SAE.load_from_disk")
    missing = [k for k in ("d_in", "d_sae") if k not in cfg]
    if missing:
        raise ValueError(f"{path / CFG_FILE} lacks the field(s) {missing}; re-save the SAE with save_model")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path}; re-save the SAE with save_model or re-download it")
    try:
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{weights} is corrupt or truncated ({str(exc).splitlines()[0]}); re-save or re-download it") from exc
    size = weights.stat().st_size
    with open(weights, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise ValueError(f"{weights} is truncated ({size} bytes, header promises {8 + header_len + end}); re-save or re-download it")
    not_float = sorted(f"{k} ({v['dtype']})" for k, v in header.items()
                       if k != "__metadata__" and v.get("dtype") not in ("F32", "F16", "BF16", "F64"))
    if not_float:
        raise ValueError(f"{weights} holds non-float weights {not_float[:3]}; a JSAE's weights are float32/bfloat16/"
                         "float16 (a quantised or corrupt file): re-save the SAE with save_model")
    return cfg


def check_finite_weights(path: str | Path, fix: str = "use another checkpoint or retrain") -> None:
    """One-line ``ValueError`` when the weights file of the SAE folder ``path`` holds NaN or inf (a diverged run or a
    corrupt file), read one tensor at a time."""
    from safetensors import safe_open

    weights = Path(path) / WEIGHTS_FILE
    bad = []
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(key)
    if bad:
        raise ValueError(f"{weights} holds NaN/inf values in {sorted(bad)[:3]} (a diverged run or a corrupt file); {fix}")


def check_finite_state(sae: Any, path: Path) -> None:
    bad = sorted(k for k, v in sae.state_dict().items() if isinstance(v, Tensor) and v.is_floating_point()
                 and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"refusing to save an SAE with NaN/inf weights {bad[:3]} to {path} (a diverged run); lower the "
                         "learning rate or use an earlier checkpoint")


def check_state_dict(sae: Any, state_dict: dict[str, Any]) -> None:
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state_dict) if tuple(state_dict[k].shape) != expected[k])
    if missing or unexpected or wrong:
        raise ValueError(
            f"the weights do not fit this JSAE config (missing {missing}, unexpected {unexpected}, wrong shape {wrong}); "
            "the cfg.json and sae_weights.safetensors come from different SAEs"
        )
    not_float = sorted(f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state_dict.items()
                       if isinstance(v, Tensor) and not v.is_floating_point())
    if not_float:
        raise ValueError(f"the SAE weights {not_float[:3]} are not floating point; a JSAE's weights are float32/bfloat16/"
                         "float16 (a quantised or corrupt file): re-save the SAE with save_model")
    bad = sorted(k for k, v in state_dict.items() if isinstance(v, Tensor) and not bool(torch.isfinite(v).all()))
    if bad:
        raise ValueError(f"the SAE weights {bad[:3]} hold NaN/inf values (a diverged run or a corrupt file); "
                         "use another checkpoint or retrain")
