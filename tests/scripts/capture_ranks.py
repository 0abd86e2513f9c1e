"""Capture pairs of a tiny random-config VLM; used by the capture tests as a subprocess, under torchrun too.

usage: capture_ranks.py OUT KIND N [--batch B] [--shard S] [--kill-rank R --kill-at K] [--last-rank-n M]
Prints ``rank R forwards F`` (the forwards this rank ran).  With ``--kill-rank``, rank R SIGKILLs itself
inside its K-th forward (torchrun then stops the other ranks), as a job killed mid-capture.  With
``--last-rank-n``, the last rank is given M pairs instead of N (a mistake capture must refuse on every rank).
"""

import argparse
import os
import signal

import jsae  # noqa: F401  (before nnsight)
import torch

from jsae.capture import capture_pairs
from jsae.testing import tiny_vlm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("kind")
    ap.add_argument("n", type=int)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--shard", type=int, default=4)
    ap.add_argument("--kill-rank", type=int, default=-1)
    ap.add_argument("--kill-at", type=int, default=0)
    ap.add_argument("--last-rank-n", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    v = tiny_vlm(args.kind)
    forwards = []

    def count(*_):
        forwards.append(1)
        if rank == args.kill_rank and len(forwards) == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    v.hf.get_input_embeddings().register_forward_hook(count)
    last = rank == int(os.environ.get("WORLD_SIZE", "1")) - 1
    n = args.last_rank_n if last and args.last_rank_n is not None else args.n
    try:
        capture_pairs(v.model, v.pairs(n), layers=[0, 1], out_dir=args.out, processor=v.processor,
                      batch_size=args.batch, shard_size=args.shard, progress=False)
    except ValueError as exc:
        print(f"rank {rank} error: {exc}", flush=True)
        raise SystemExit(2) from None
    print(f"rank {rank} forwards {len(forwards)}", flush=True)


if __name__ == "__main__":
    main()
