"""Atomic writes, the one home for them: a file or a directory appears complete or not at all
(written to a temporary sibling, then renamed)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename (parents are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(path)
    try:
        with writing(path):
            tmp.write_bytes(data.encode() if isinstance(data, str) else data)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def apply_umask(path: str | Path) -> Path:
    """Give ``path`` (and, for a directory, every file under it) the mode a plain ``open`` would: 0666 less the
    process umask.  safetensors writes through a private temporary file (mode 0600); weights should be as readable
    as every other file the user writes."""
    path = Path(path)
    mask = os.umask(0)
    os.umask(mask)
    for f in [path] if path.is_file() else (p for p in path.rglob("*") if p.is_file()):
        os.chmod(f, 0o666 & ~mask)
    return path


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the complete directory ``tmp`` to ``final``, replacing what is there without a moment where
    ``final`` holds a mix of old and new files (its files get the umask's mode: :func:`apply_umask`)."""
    apply_umask(tmp)
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


@contextlib.contextmanager
def writing(path: str | Path, fix: str = "free some disk space, or write somewhere else") -> Iterator[None]:
    """Turn a failed write inside the block into one ``OSError`` line that names ``path``: safetensors reports a
    full disk or a read-only folder as ``SafetensorError: Error while serializing: IoError(...)``, without the
    file; an ``OSError`` without a file name gets it too (the errno is kept)."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error type
        if not (type(exc).__name__ == "SafetensorError" or (isinstance(exc, OSError) and not exc.filename)):
            raise
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        code = getattr(exc, "errno", None)
        import re

        found = re.search(r"os error (\d+)", text)  # safetensors: "I/O error: No space left on device (os error 28)"
        if code is None and found:
            code = int(found.group(1))
        for errno_, words in ((errno.ENOSPC, "No space left"), (errno.EACCES, "Permission denied"),
                              (errno.EROFS, "Read-only file system"), (errno.EDQUOT, "Disk quota")):
            if code is None and words.lower() in text.lower():
                code = errno_
        err = OSError(f"could not write {path} ({os.strerror(code) if code else text}); {fix}")
        err.errno = code or errno.EIO
        raise err from None


def write_json(path: str | Path, obj: Any) -> Path:
    """:func:`write_atomic` of ``obj`` as indented JSON (numpy scalars as floats)."""
    return write_atomic(path, json.dumps(obj, indent=2, default=float))


def tmp_sibling(path: str | Path, tag: str = "tmp") -> Path:
    """A unique hidden temporary name next to ``path`` (same file system, so a rename is atomic)."""
    path = Path(path)
    return path.parent / f".{path.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def write_dir_atomic(final: str | Path, fill: Any) -> Path:
    """Let ``fill(tmp_dir)`` write a directory, then swap it in for ``final`` with :func:`replace_dir`."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(final)
    try:
        tmp.mkdir()
        fill(tmp)
        replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


__all__ = ["apply_umask", "replace_dir", "tmp_sibling", "write_atomic", "write_dir_atomic", "write_json", "writing"]
