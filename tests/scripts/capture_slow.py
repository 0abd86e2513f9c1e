"""Capture pooled pairs of a tiny VLM, holding the first forward until the file GO exists (or at once when GO
is "-"), so a test can race a second process against a running capture.
usage: capture_slow.py OUT_DIR N_PAIRS GO"""

import os
import sys
import time

import jsae  # noqa: F401  (before nnsight)
import torch

from jsae.capture import capture_pairs
from jsae.testing import tiny_vlm


def main() -> None:
    out, n, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    v = tiny_vlm("llava")

    def hold(*args: object) -> None:
        t0 = time.time()
        while go != "-" and not os.path.exists(go) and time.time() - t0 < 300:
            time.sleep(0.05)

    handle = v.hf.model.language_model.layers[0].register_forward_pre_hook(hold)  # (forward hooks of the last layer read never run: the trace stops there)
    try:
        capture_pairs(v.model, v.pairs(n), layers=[0], out_dir=out, processor=v.processor, batch_size=2, shard_size=2,
                      progress=False)
    finally:
        handle.remove()


if __name__ == "__main__":
    main()
