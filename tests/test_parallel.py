"""jsae.parallel: the map shared with a forked second process (capture, training, sweep, report) and how many
processes share it."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

from jsae import parallel
from jsae.parallel import forked_map


def _both(fn):
    """``fn`` where each process, at its first span, waits (at most 60 s) until the other has taken one too, so both
    compute spans however the two are scheduled on a loaded machine; results tagged with the pid."""
    ctx = mp.get_context("fork")
    parent, here, child = os.getpid(), ctx.Event(), ctx.Event()

    def tagged(lo, hi):
        mine, other = (here, child) if os.getpid() == parent else (child, here)
        mine.set()
        other.wait(60)
        return fn(lo, hi), os.getpid()

    return tagged


def test_forked_map_order_results_and_done():
    """Every span's result in order from two processes (the child's results come back), ``done`` once per span;
    one worker (or one span) runs in this process alone."""
    spans = [(i, i + 1) for i in range(9)]
    seen = []
    out = forked_map(_both(lambda lo, hi: lo * 10 + hi), spans, 2, seen.append)
    assert [v for v, _ in out] == [i * 10 + i + 1 for i in range(9)]
    assert sorted(seen) == spans
    assert len({pid for _, pid in out}) == 2  # both processes computed spans
    assert forked_map(lambda lo, hi: (lo, os.getpid()), spans, 1) == [(i, os.getpid()) for i in range(9)]
    assert forked_map(lambda lo, hi: (lo, os.getpid()), spans[:1], 2) == [(0, os.getpid())]


def _fails_in_child(exc: BaseException):
    parent = os.getpid()

    def fn(lo, hi):
        if os.getpid() != parent:
            raise exc
        return lo

    return _both(fn)


def test_a_failure_in_the_child_is_the_same_exception_with_its_traceback():
    """The child's exception is raised here as what one process would raise (type and one-line message), the
    child's traceback its cause."""
    spans = [(i, i + 1) for i in range(6)]
    with pytest.raises(ValueError, match=r"^boom in the child$") as info:
        forked_map(_fails_in_child(ValueError("boom in the child")), spans, 2)
    cause = info.value.__cause__
    assert isinstance(cause, RuntimeError) and "in the forked second process" in str(cause)
    assert "Traceback" in str(cause) and "raise exc" in str(cause) and "ValueError: boom in the child" in str(cause)


class _Unpicklable(Exception):
    def __init__(self, msg, extra):  # two arguments: unpickling calls it with one and fails
        super().__init__(msg)
        self.extra = extra

    def __reduce__(self):
        return (_Unpicklable, (str(self),))


def test_an_exception_that_does_not_come_back_whole_is_a_runtime_error_with_the_traceback():
    spans = [(i, i + 1) for i in range(6)]
    with pytest.raises(RuntimeError, match="forked second process .* failed; its traceback is the cause") as info:
        forked_map(_fails_in_child(_Unpicklable("odd", 1)), spans, 2)
    assert "_Unpicklable: odd" in str(info.value.__cause__)


def test_a_child_that_dies_without_results_is_a_one_line_error_naming_one_process():
    parent = os.getpid()

    def fn(lo, hi):
        if os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return lo

    with pytest.raises(RuntimeError, match=r"ended without its results \(exit code -9\); run with one process: "
                                           r"jsae.parallel.WORKERS = 1$"):
        forked_map(_both(fn), [(i, i + 1) for i in range(6)], 2)


def test_a_failure_in_this_process_stops_the_child():
    """A failure in the parent is raised as is and the child (still working) is killed, not waited for."""
    parent = os.getpid()

    def fn(lo, hi):
        if os.getpid() == parent:
            raise KeyError("parent fails")
        time.sleep(30)  # the child would be waited for 30 s per span
        return lo

    t = time.time()
    with pytest.raises(KeyError, match="parent fails"):
        forked_map(fn, [(i, i + 1) for i in range(4)], 2)
    assert time.time() - t < 10


def test_workers_follow_the_cores_and_the_override(monkeypatch):
    """Two processes where the machine has a core for each of two processes' threads, one otherwise; WORKERS wins."""
    monkeypatch.setattr(parallel, "WORKERS", None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert parallel.workers() == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert parallel.workers() == 1  # two threads on two cores: no core to spare
    monkeypatch.setattr(parallel, "WORKERS", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert parallel.workers() == 1
    monkeypatch.setattr(parallel, "WORKERS", None)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert parallel.workers() == 1  # one core


def _rows(source, part):
    return [(ex["image"].tobytes(), ex["caption"], ex["image_id"]) for ex in source.items(part)]


def test_data_parts_made_by_two_processes_are_those_of_one(tmp_path):
    """``prepare`` with forked_map: every part's rows and fingerprint are what one process makes, the world's rows
    made in the child come back (the parent holds every part), and a caption dataset's parts, cut here, send back
    only their fingerprints; parts already fingerprinted are not made again."""
    import datasets

    from jsae.data.sources import CaptionSource, WorldSource
    from jsae.world import world_dataset

    def two(fn, spans, done):
        out = forked_map(_both(fn), spans, 2, done)
        pids.extend(p for _, p in out)
        return [r for r, _ in out]

    sizes = {"train": ("train", 30), "label": ("validation", 12), "eval": ("test", 20)}
    one = WorldSource(sizes, seed=3)
    pids: list[int] = []
    forked = WorldSource(sizes, seed=3)
    fps = forked.prepare(two)
    assert fps == one.prepare() == {part: one.fingerprint(part) for part in one.parts}
    assert len(set(pids)) == 2  # both processes made parts
    for part in one.parts:
        assert _rows(forked, part) == _rows(one, part)
    pids.clear()
    assert forked.prepare(two) == fps and pids == []  # nothing left to make

    base = world_dataset("validation", 9, seed=5)
    datasets.Dataset.from_list([{"image": ex["image"], "caption": ex["caption"]} for ex in base]).save_to_disk(str(tmp_path / "c"))
    cap_one = CaptionSource(path=str(tmp_path / "c"), sizes={"train": 4, "label": 3, "eval": 2}, min_count=1, seed=0)
    cap_two = CaptionSource(path=str(tmp_path / "c"), sizes={"train": 4, "label": 3, "eval": 2}, min_count=1, seed=0)
    cut = {part: cap_two.dataset(part) for part in cap_two.parts}
    assert cap_two.prepare(two) == cap_one.prepare() and len(set(pids)) == 2
    assert all(cap_two.dataset(part) is rows for part, rows in cut.items())  # the rows cut here stay, not replaced
    for part in cap_one.parts:
        assert _rows(cap_two, part) == _rows(cap_one, part)
