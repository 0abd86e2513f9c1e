"""Work shared with one forked second process where the machine has a core for it: the one home of
:func:`workers` (how many processes) and :func:`forked_map` (the map itself), used by the capture's batches, the
training of the protocol's layers, the sweep's caption batches and the parts of a run's report.

Each process takes the next span not yet taken; the child inherits the parent's model and data by ``fork`` and sends
its results back with cloudpickle, so every result is what one process gives alone.  ``WORKERS = 1`` keeps one
process everywhere (``jsae.parallel.WORKERS = 1``)."""

from __future__ import annotations

from typing import Any, Callable

#: processes that share the work (``None``: :func:`workers` decides)
WORKERS: int | None = None


def workers() -> int:
    """How many processes share the work: :data:`WORKERS` when set, else two where the machine has a core for each
    of two processes' torch threads (``jsae``'s default, one thread per two cores, leaves the second core of a
    2-core machine idle), ``fork`` exists and CUDA is not in use, else one."""
    if WORKERS is not None:
        return max(1, int(WORKERS))
    import multiprocessing as mp
    import os

    import torch

    if not hasattr(os, "fork") or mp.current_process().daemon:  # no fork (Windows), or a daemon may not have children
        return 1
    if torch.cuda.is_initialized():  # CUDA cannot run in a forked child; a GPU has its own parallelism
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 2 if cores >= 2 * torch.get_num_threads() else 1


def forked_map(fn: Callable[..., Any], spans: list[tuple[int, int]], n_workers: int,
               done: Callable[[tuple[int, int]], None] = lambda span: None) -> list[Any]:
    """``[fn(*span) for span in spans]``, the spans shared with one forked child process when ``n_workers`` > 1 (each
    process takes the next span not yet taken; the child inherits the parent's model and sends its results back
    with cloudpickle, which also takes the lambdas some objects keep, such as SAELens's SAEs), so every result is what
    ``fn`` gives in one process.  ``done(span)``: called in this process for every span, as its result is known.  A
    failure in the child is raised here as the same exception (type and message: a one-line error stays one line),
    with the child's traceback as its cause (a ``RuntimeError`` where the exception does not pickle); a child that
    dies without its results (killed, out of memory) is a one-line ``RuntimeError`` naming the way back to one process."""
    if n_workers < 2 or len(spans) < 2:
        out = []
        for span in spans:
            out.append(fn(*span))
            done(span)
        return out
    import multiprocessing as mp
    import pickle
    import traceback

    import cloudpickle

    ctx = mp.get_context("fork")
    taken = ctx.Value("i", 0)

    def take() -> int:
        with taken.get_lock():
            k = taken.value
            taken.value = k + 1
        return k

    def child(send: Any) -> None:
        got: dict[int, Any] = {}
        try:
            while (k := take()) < len(spans):
                got[k] = fn(*spans[k])
            send.send_bytes(cloudpickle.dumps(("ok", got)))
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent, which raises it
            try:  # the exception itself where it pickles, so the parent raises what one process would
                error = cloudpickle.dumps(exc) if isinstance(exc, Exception) else None
            except Exception:  # noqa: BLE001 - an exception that does not pickle: its traceback alone
                error = None
            send.send_bytes(cloudpickle.dumps(("error", (error, traceback.format_exc()))))
        finally:
            send.close()

    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=child, args=(send,), daemon=True)
    proc.start()
    send.close()
    results: dict[int, Any] = {}
    finished = False
    try:
        while (k := take()) < len(spans):
            results[k] = fn(*spans[k])
            done(spans[k])
        try:
            status, got = pickle.loads(recv.recv_bytes())
        except EOFError:
            proc.join(timeout=10)  # reaped, so its exit code is known (-9: killed, as by the out-of-memory killer)
            raise RuntimeError(f"the forked second process (capture, training, sweep or report) ended without its results (exit code {proc.exitcode}); "
                               "run with one process: jsae.parallel.WORKERS = 1") from None
        if status != "ok":
            error, trace = got
            raise _child_error(error) from RuntimeError(f"in the forked second process:\n{trace}")
        for k, v in got.items():
            results[k] = v
            done(spans[k])
        finished = True
    finally:
        recv.close()
        if not finished:  # a failure here: the child's work is not wanted
            proc.kill()
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    return [results[k] for k in range(len(spans))]


def _child_error(error: bytes | None) -> BaseException:
    """The child's exception as the parent raises it: the same exception (type and message) where it came back
    whole, else a ``RuntimeError`` (its traceback is the cause either way)."""
    import pickle

    try:
        exc = pickle.loads(error) if error is not None else None
    except Exception:  # noqa: BLE001 - a class that does not unpickle here
        exc = None
    return exc if isinstance(exc, Exception) else RuntimeError(
        "the forked second process (capture, training, sweep or report) failed; its traceback is the cause below")


__all__ = ["WORKERS", "forked_map", "workers"]
