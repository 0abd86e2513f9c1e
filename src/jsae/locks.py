"""Advisory directory locks: one writer per capture, checkpoint or run directory.

``with DirLock(path, "capture"):`` takes an exclusive ``fcntl.flock`` on ``path/.jsae.lock`` (the directory
is created) and writes the holder's pid into it; a second process asking for the same directory gets a
one-line :class:`DirectoryLocked` error naming the holder's pid instead of silently replacing its files.
The lock lives as long as the open file: a killed holder releases it at once (the kernel drops ``flock``
locks with the process), so a stale lock file never blocks a retry.  The holder deletes the file when it
releases the lock; a process that opened the old file meanwhile notices (the inode at the path changed)
and locks the new one, so two processes never both hold a directory.

On a platform without ``fcntl`` the lock is a no-op.  Re-entrant within one process (a nested ``DirLock``
of a directory this process already holds is allowed), so a function that locks may call another that does.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux / macOS
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".jsae.lock"
_HELD: dict[str, int] = {}  # resolved directory -> nesting depth in this process


class DirectoryLocked(RuntimeError):
    """Another process holds the directory."""


def holder(path: str | os.PathLike[str]) -> int | None:
    """The pid written by the current holder of ``path``'s lock, or None when nobody holds it."""
    f = Path(path) / LOCK_FILE
    if not f.is_file() or fcntl is None:
        return None
    with open(f, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            text = fh.read().strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


class DirLock:
    """Exclusive advisory lock on a directory (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], what: str = "jsae job"):
        self.path, self.what = Path(path), what
        self._fh: Any = None
        self._key = ""

    def acquire(self) -> "DirLock":
        self.path.mkdir(parents=True, exist_ok=True)
        self._key = str(self.path.resolve())
        if self._key in _HELD:
            _HELD[self._key] += 1
            return self
        if fcntl is None:
            _HELD[self._key] = 1
            return self
        while True:
            fh = open(self.path / LOCK_FILE, "a+")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                pid = fh.read().strip() or "unknown"
                fh.close()
                raise DirectoryLocked(f"{self.path} is in use by another {self.what} (pid {pid}); wait for it to finish, "
                                      "stop it, or use another folder") from None
            try:  # the holder before us may have removed the file after we opened it: lock the file that is there
                same = os.fstat(fh.fileno()).st_ino == os.stat(self.path / LOCK_FILE).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            fh.close()
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        _HELD[self._key] = 1
        return self

    def release(self) -> None:
        if not self._key or self._key not in _HELD:
            return
        _HELD[self._key] -= 1
        if _HELD[self._key] > 0:
            return
        del _HELD[self._key]
        if self._fh is not None:
            try:
                (self.path / LOCK_FILE).unlink(missing_ok=True)  # while still held: see acquire()
                fcntl.flock(self._fh, fcntl.LOCK_UN)
            finally:
                self._fh.close()
                self._fh = None

    def __enter__(self) -> "DirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


__all__ = ["LOCK_FILE", "DirLock", "DirectoryLocked", "holder"]
