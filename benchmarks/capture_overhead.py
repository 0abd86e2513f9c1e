"""Capture overhead, as ratios measured in one run (prints a table).

1. all-layer pooled capture (one nnsight trace, every decoder layer pooled over image and caption
   tokens, stop after the last layer) vs a plain transformers forward on the same inputs (target <= 1.05x);
   a bare nnsight trace (no reads) is shown for reference;
2. capture of layer L only (forward stopped after L) vs the full forward: target about (L+1)/N when the
   language model dominates the cost.

Times are this process's CPU time (``time.process_time``, one torch thread), medians of interleaved
repeats: on a CPU shared with other jobs, wall time mostly measures the neighbours.

Tiny random-config model from jsae.testing, scaled up as far as is comfortable on a small CPU:
    python benchmarks/capture_overhead.py [--kind llava] [--hidden 512] [--layers 8] [--batch 16] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jsae  # noqa: F401  (before nnsight)
import torch
from _common import wrapped_and_plain

from jsae.capture import _capture_batch
from jsae.testing import build_processor


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        out.append(time.process_time() - t)
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kind", default="llava")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hf, hf_plain, model, adapter, images, texts = wrapped_and_plain(args.kind, args.layers, args.hidden, args.batch)
    inputs = adapter.build_inputs(build_processor(args.kind), images, texts)
    kwargs = adapter.model_kwargs(inputs)
    N = adapter.n_layers
    L = N // 4

    def plain():
        with torch.no_grad():
            hf_plain(**kwargs)

    def bare_trace():
        with torch.no_grad(), model.trace(**kwargs):
            pass

    def capture_all():
        _capture_batch(model, adapter, inputs, list(range(N)), "mean")

    def capture_one():
        _capture_batch(model, adapter, inputs, [L], "mean")

    fns = {"plain HF forward": plain, "bare nnsight trace": bare_trace, f"capture all {N} layers": capture_all,
           f"capture layer {L} (early stop)": capture_one}
    for fn in fns.values():  # warm up
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):  # interleaved, so drift on a shared CPU hits every variant alike
        for k, fn in fns.items():
            times[k] += timed(fn, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain HF forward"]
    seq = kwargs["input_ids"].shape[1]
    print(f"{type(hf).__name__}: {N} layers, hidden {args.hidden}, batch {args.batch} x {seq} tokens, "
          f"{sum(p.numel() for p in hf.parameters()) / 1e6:.1f} M params, {torch.get_num_threads()} thread(s), CPU time, "
          f"median of {args.repeats}")
    for k, t in med.items():
        print(f"  {k:32s} {t * 1e3:8.1f} ms   {t / base:5.3f}x")
    print(f"all-layer capture / plain forward: {med[f'capture all {N} layers'] / base:.3f}x (target <= 1.05)")
    print(f"early stop at layer {L} of {N} / plain forward: {med[f'capture layer {L} (early stop)'] / base:.3f}x "
          f"(target about (L+1)/N = {(L + 1) / N:.3f})")


if __name__ == "__main__":
    main()
