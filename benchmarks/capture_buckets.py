"""Bucketed capture batches (issue 30): the padding and the wall time that grouping pairs by image-token count
saves.  ``python benchmarks/capture_buckets.py`` (from the repository root) writes
``benchmarks/results/capture_buckets.json``; one CPU thread throughout, the load average recorded.

**Padding** (no forward): LLaVA-v1.6-Mistral-7B's processor built offline from its published settings
(``tests/data/real_configs``, the PIL image processor, the Mistral SentencePiece tokenizer, as in
``tests/test_real_width.py``).  The data: every scikit-image sample photograph in :data:`PHOTOS` (14 sizes from
172×448 to 1411×1411: 1,320 to 2,928 image tokens) with captions of different lengths, ``--copies`` times each,
in one fixed shuffled order.  Each pair's sequence length is read from ``adapter.build_inputs`` (the real processor:
prompt, caption and expanded image tokens); for each batch size, the batches :func:`jsae.capture.capture_batches`
plans with and without bucketing (the default shard of 1,024 pairs) are padded to their longest row, as the
processor pads them (checked on real batches), and the positions counted: real tokens, padded positions (batch ×
padded length, what the decoder layers compute on) and the attention work Σ batch × length².

**Wall time**: ``capture_pairs(..., layers=[1])`` (both decoder layers run) on ``jsae.cost.instantiate`` of the same
model at real width (d = 4096, 2 decoder layers, 2 vision layers, float32, random weights) on the CPU, bucketed
against unbucketed over ``--time-pairs`` pairs at ``--time-batch``, timed in the order unbucketed, bucketed,
bucketed, unbucketed (drift in the machine's load cancels to first order); wall and CPU seconds of this process
are both recorded (on a machine shared with other work the CPU time is the steadier of the two).  One image at the published settings
costs tens of seconds of one CPU thread here, so the timed runs use tiles of ``--tile`` pixels (published: 336)
with the any-resolution pinpoints scaled alike: the same photographs then give 200 to 336 image tokens (a spread
of 1.7× instead of 2.2×).  The padded positions of the timed batches are reported beside the times, and the largest
difference between the bucketed and unbucketed pooled vectors (relative to the largest value): this random-weight
model is sensitive to left padding itself (a row left-padded in a batch differs from the same row alone by ~1e-3
relative; an unpadded row is bitwise equal), which bucketing does not add to: it pads less.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "capture_buckets.json"
MODEL = "llava-v1.6-mistral-7b-hf"
PHOTOS = ["astronaut", "chelsea", "coffee", "coffee_portrait", "rocket", "hubble_deep_field", "immunohistochemistry",
          "retina", "camera", "coins", "moon", "text", "clock", "page"]
CAPTIONS = ["A photograph.", "A picture taken outdoors on a sunny day.",
            "An image with several objects in it, some large and some small, seen from the front.",
            "A close view of one thing."]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def tiled_spec(spec: Any, tile: int) -> Any:
    """``spec`` with tiles of ``tile`` pixels (vision ``image_size``, processor size and crop) and its
    any-resolution pinpoints scaled by ``tile / 336``."""
    from jsae.cost import load_spec

    raw = copy.deepcopy(spec.raw)
    ip, cfg = raw["processor"]["image_processor"], raw["config"]
    side = int(cfg["vision_config"].get("image_size", 336))
    cfg["vision_config"] = {**cfg["vision_config"], "image_size": tile}
    ip.update(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile})
    cfg["image_grid_pinpoints"] = ip["image_grid_pinpoints"] = [[h * tile // side, w * tile // side]
                                                                for h, w in cfg["image_grid_pinpoints"]]
    return load_spec(raw)


def dataset(copies: int, seed: int = 0) -> list[tuple[Any, str]]:
    from test_real_width import photo

    pairs = [(photo(p), CAPTIONS[(i + c) % len(CAPTIONS)]) for c in range(copies) for i, p in enumerate(PHOTOS)]
    random.Random(seed).shuffle(pairs)
    return pairs


def row_lengths(adapter: Any, processor: Any, pairs: list[tuple[Any, str]]) -> list[int]:
    """Each pair's sequence length through the processor (its prompt, caption and expanded image tokens)."""
    return [int(adapter.build_inputs(processor, [im], [cap])["input_ids"].shape[1]) for im, cap in pairs]


def padding(lengths: list[int], batch_size: int, tokens: list[int] | None, shard_size: int = 1024) -> dict[str, Any]:
    """Positions of the batches capture runs (bucketed when ``tokens`` are given): the processor pads a batch
    to its longest row (checked on real batches by :func:`check_padded_lengths`)."""
    from jsae.capture import capture_batches

    shard_size = -(-shard_size // batch_size) * batch_size
    padded = attention = 0
    widths = []
    for shard in capture_batches(len(lengths), batch_size, shard_size, tokens):
        for batch in shard:
            s = max(lengths[i] for i in batch)
            padded += len(batch) * s
            attention += len(batch) * s * s
            widths.append(s)
    real = sum(lengths)
    return {"batches": len(widths), "real_tokens": real, "padded_positions": padded,
            "padding_fraction": round(1 - real / padded, 4), "attention_positions2": attention, "batch_lengths": widths}


def check_padded_lengths(adapter: Any, processor: Any, pairs: list[tuple[Any, str]], lengths: list[int],
                         batch: list[int]) -> None:
    """The processor's batch of ``batch`` is as long as its longest row and holds exactly the rows' tokens."""
    enc = adapter.build_inputs(processor, [pairs[i][0] for i in batch], [pairs[i][1] for i in batch])
    assert enc["input_ids"].shape[1] == max(lengths[i] for i in batch)
    assert int(enc["attention_mask"].sum()) == sum(lengths[i] for i in batch)


def measure_padding(copies: int, batch_sizes: list[int]) -> dict[str, Any]:
    from test_real_width import mistral_tokenizer, photo, real_spec

    from jsae.adapters import for_model
    from jsae.capture import image_token_count
    from jsae.cost import build_processor, meta_model

    spec = real_spec(MODEL)
    processor = build_processor(spec, mistral_tokenizer())
    adapter = for_model(meta_model(spec))
    pairs = dataset(copies)
    load0, t0 = loadavg(), time.perf_counter()
    tokens = [image_token_count(adapter, processor, p) for p in pairs]
    lengths = row_lengths(adapter, processor, pairs)
    for batch in ([0, 1, 2, 3], [int(i) for i in sorted(range(len(pairs)), key=lambda i: -tokens[i])[:4]]):
        check_padded_lengths(adapter, processor, pairs, lengths, batch)
    rows = []
    for bs in batch_sizes:
        plain = padding(lengths, bs, None)
        bucketed = padding(lengths, bs, tokens)
        assert plain["real_tokens"] == bucketed["real_tokens"]
        rows.append({"batch_size": bs, "unbucketed": plain, "bucketed": bucketed,
                     "positions_saved": round(1 - bucketed["padded_positions"] / plain["padded_positions"], 4),
                     "attention_saved": round(1 - bucketed["attention_positions2"] / plain["attention_positions2"], 4)})
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("unbucketed", "bucketed")}), flush=True)
    return {"model": MODEL, "settings": "published (tests/data/real_configs)", "photos": PHOTOS, "copies": copies,
            "pairs": len(pairs), "image_tokens_per_photo": {p: image_token_count(adapter, processor, (photo(p), "")) for p in PHOTOS},
            "by_batch_size": rows, "seconds": round(time.perf_counter() - t0, 1), "loadavg_before": load0,
            "loadavg_after": loadavg()}


def measure_time(n: int, batch_size: int, tile: int) -> dict[str, Any]:
    import torch
    from nnsight import NNsight
    from test_real_width import mistral_tokenizer, real_spec

    from jsae.adapters import for_model
    from jsae.capture import capture_pairs, image_token_count, read_layer
    from jsae.cost import build_processor, instantiate

    torch.set_num_threads(1)
    spec = tiled_spec(real_spec(MODEL), tile)
    processor = build_processor(spec, mistral_tokenizer())
    t0 = time.perf_counter()
    hf = instantiate(spec, 2, vision_layers=2, dtype=torch.float32)
    build_s = time.perf_counter() - t0
    model = NNsight(hf)
    adapter = for_model(model)
    pairs = dataset(1)[:n]
    tokens = [image_token_count(adapter, processor, p) for p in pairs]
    runs: dict[str, list[float]] = {"unbucketed": [], "bucketed": []}
    cpu: dict[str, list[float]] = {"unbucketed": [], "bucketed": []}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(layers=[1], processor=processor, batch_size=batch_size, progress=False)
        capture_pairs(model, pairs[:1], out_dir=f"{tmp}/warm", **kw)
        for i, bucket in enumerate((False, True, True, False)):
            name = "bucketed" if bucket else "unbucketed"
            loads.append(loadavg())
            t0, c0 = time.perf_counter(), time.process_time()
            capture_pairs(model, pairs, out_dir=f"{tmp}/{name}{i}", bucket=bucket, **kw)
            runs[name].append(round(time.perf_counter() - t0, 2))
            cpu[name].append(round(time.process_time() - c0, 2))
            print(json.dumps({name: runs[name][-1], "cpu": cpu[name][-1], "loadavg": loads[-1]}), flush=True)
        loads.append(loadavg())
        bv, bt, _ = read_layer(f"{tmp}/bucketed1", 1)
        uv, ut, _ = read_layer(f"{tmp}/unbucketed0", 1)
        diff = max(float((bv - uv).abs().max() / uv.abs().max()), float((bt - ut).abs().max() / ut.abs().max()))
    lengths = row_lengths(adapter, processor, pairs)
    plain, bucketed = padding(lengths, batch_size, None), padding(lengths, batch_size, tokens)
    u, b = sum(runs["unbucketed"]), sum(runs["bucketed"])
    uc, bc = sum(cpu["unbucketed"]), sum(cpu["bucketed"])
    return {"model": MODEL, "width": "real (d_model 4096), 2 decoder layers, 2 vision layers, float32, random weights",
            "tile": tile, "pairs": n, "batch_size": batch_size, "image_tokens": tokens, "build_seconds": round(build_s, 1),
            "wall_seconds": runs, "wall_time_saved": round(1 - b / u, 4), "cpu_seconds": cpu,
            "cpu_time_saved": round(1 - bc / uc, 4),
            "padded_positions": {"unbucketed": plain["padded_positions"], "bucketed": bucketed["padded_positions"]},
            "positions_saved": round(1 - bucketed["padded_positions"] / plain["padded_positions"], 4),
            "max_relative_difference_bucketed_vs_unbucketed": diff, "loadavg": loads}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--copies", type=int, default=8, help="padding: pairs per photograph (14 photographs)")
    ap.add_argument("--batch-sizes", default="4,8,16", help="padding: batch sizes")
    ap.add_argument("--time-pairs", type=int, default=8, help="wall time: pairs per run")
    ap.add_argument("--time-batch", type=int, default=4, help="wall time: batch size")
    ap.add_argument("--tile", type=int, default=112, help="wall time: tile side in pixels (published: 336)")
    ap.add_argument("--skip-time", action="store_true", help="only the padding")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT / "tests"))
    import jsae  # noqa: F401  (before nnsight)
    import torch

    torch.set_num_threads(1)
    result: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "torch_threads": 1, "torch": torch.__version__}}
    result["padding"] = measure_padding(a.copies, [int(x) for x in a.batch_sizes.split(",")])
    if not a.skip_time:
        result["wall_time"] = measure_time(a.time_pairs, a.time_batch, a.tile)
        print(json.dumps({k: result["wall_time"][k] for k in ("wall_time_saved", "cpu_time_saved", "positions_saved")}), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
