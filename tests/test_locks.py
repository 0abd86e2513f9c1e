"""One writer per directory: two real processes on one checkpoint folder or one capture folder; the second
gets a one-line error naming the first's pid and the first finishes untouched.  A killed holder releases
its lock at once (the retry works); the lock file never blocks and disappears after a clean exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jsae.capture import read_manifest
from jsae.locks import LOCK_FILE, DirectoryLocked, DirLock, holder

SCRIPTS = Path(__file__).parent / "scripts"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_lock(folder: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.time()
    while holder(folder) is None:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < timeout, "the first process never took the lock"
        time.sleep(0.1)


def test_two_trainers_on_one_checkpoint_folder_and_a_killed_holder(tmp_path):
    """The second trainer is refused while the first runs; once the first is SIGKILLed its lock is gone with it
    (a stale lock file, no holder) and a retry resumes from the checkpoint and finishes."""
    ckpt = tmp_path / "ckpt"
    first = _start(str(SCRIPTS / "train_paired.py"), str(tmp_path / "a.safetensors"), str(ckpt), "40", "--slow", "5")  # 200 s: outlives a slow start of the second under load
    try:
        _wait_for_lock(ckpt, first)
        second = subprocess.run([sys.executable, str(SCRIPTS / "train_paired.py"), str(tmp_path / "b.safetensors"),
                                 str(ckpt), "40"], env=ENV, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first trainer ended before the race"
        assert second.returncode != 0
        last = second.stderr.strip().splitlines()[-1]
        assert f"is in use by another jsae trainer (pid {first.pid})" in last, last
        assert not (tmp_path / "b.safetensors").exists()
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    assert holder(ckpt) is None
    retry = subprocess.run([sys.executable, str(SCRIPTS / "train_paired.py"), str(tmp_path / "c.safetensors"), str(ckpt),
                            "40"], env=ENV, capture_output=True, text=True, timeout=300)
    assert retry.returncode == 0, retry.stderr[-2000:]
    assert (tmp_path / "c.safetensors").is_file() and not (ckpt / LOCK_FILE).exists()


def test_two_captures_into_one_folder(tmp_path):
    out = tmp_path / "cap"
    go = tmp_path / "go"
    first = _start(str(SCRIPTS / "capture_slow.py"), str(out), "10", str(go))
    try:
        _wait_for_lock(out, first)
        second = subprocess.run([sys.executable, str(SCRIPTS / "capture_slow.py"), str(out), "10", "-"], env=ENV,
                                capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first capture ended before the race"
        assert second.returncode != 0
        last = second.stderr.strip().splitlines()[-1]
        assert f"is in use by another jsae run capture (pid {first.pid})" in last, last
        go.touch()
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err[-2000:]
    finally:
        first.kill()
    m = read_manifest(out)
    assert m["complete"] and m["count"] == 10 and len(m["shards"]) == 5
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", *[f"shard-{i:05d}.safetensors" for i in range(5)]]


def test_the_lock_in_one_process():
    """Re-entrant inside a process; a holder in another process is named by pid (a real second process)."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with DirLock(d, "test"), DirLock(d, "test"):  # nested: allowed
            assert holder(d) is None or holder(d) == os.getpid()
        assert not (Path(d) / LOCK_FILE).exists()
        code = ("import sys, time; from jsae.locks import DirLock; l = DirLock(sys.argv[1], 'x').acquire(); "
                "print('held', flush=True); time.sleep(60)")
        other = subprocess.Popen([sys.executable, "-c", code, d], env=ENV, stdout=subprocess.PIPE, text=True)
        try:
            assert other.stdout.readline().strip() == "held"
            with pytest.raises(DirectoryLocked, match=f"in use by another demo run \\(pid {other.pid}\\)"):
                DirLock(d, "demo run").acquire()
        finally:
            other.kill()
            other.wait()
        with DirLock(d, "demo run"):  # the kernel dropped the dead holder's lock
            pass
