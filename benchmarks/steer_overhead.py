"""Steering overhead in generation, as ratios measured in one run (prints a table).

Steered ``jsae.generate`` (a Steer at every step on all positions of one middle layer, and the same plus an
SAE clamp) vs plain transformers ``generate`` on the same inputs (target <= 1.05x).

Times are this process's CPU time (``time.process_time``, one torch thread), medians of interleaved
repeats: on a CPU shared with other jobs, wall time mostly measures the neighbours.

    python benchmarks/steer_overhead.py [--kind llava] [--hidden 512] [--layers 8] [--batch 4] [--new 32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jsae  # (before nnsight)
import torch
from _common import wrapped_and_plain

from jsae.interventions import Clamp, Steer, generate
from jsae.testing import build_processor


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kind", default="llava")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hf, hf_plain, model, adapter, images, texts = wrapped_and_plain(args.kind, args.layers, args.hidden, args.batch)
    inputs = adapter.build_inputs(build_processor(args.kind), images, texts, add_generation_prompt=True)
    kwargs = adapter.model_kwargs(inputs)
    L = adapter.n_layers // 2
    direction = torch.randn(adapter.d_in)
    sae = jsae.JointSAE(jsae.JointSAEConfig(d_in=adapter.d_in, d_sae=4 * adapter.d_in))
    gen = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0)

    def plain():
        with torch.no_grad():
            hf_plain.generate(**kwargs, **gen)

    def wrapped():
        with torch.no_grad():
            hf.generate(**kwargs, **gen)

    def steered():
        generate(model, inputs, [Steer(L, "all", direction=direction, strength=0.5)], return_ids=True, **gen)

    def steered_sae():
        generate(model, inputs, [Steer(L, "all", direction=direction, strength=0.5),
                                 Clamp(L, "image", sae=sae, features=[1, 2], strength=3.0)], return_ids=True, **gen)

    fns = {"plain HF generate": plain, "HF generate, nnsight-wrapped model": wrapped, "jsae.generate + Steer": steered, "jsae.generate + Steer + SAE clamp": steered_sae}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t = time.process_time()
            fn()
            times[k].append(time.process_time() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain HF generate"]
    print(f"{type(hf).__name__}: {adapter.n_layers} layers, hidden {args.hidden}, batch {args.batch}, "
          f"{kwargs['input_ids'].shape[1]} prompt + {args.new} new tokens, {torch.get_num_threads()} thread(s), CPU time, median of {args.repeats}")
    for k, t in med.items():
        print(f"  {k:36s} {t * 1e3:8.1f} ms   {t / base:5.3f}x")
    print(f"steered generate / plain generate: {med['jsae.generate + Steer'] / base:.3f}x (target <= 1.05)")


if __name__ == "__main__":
    main()
