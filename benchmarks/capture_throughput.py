"""Capture throughput (issue 30): pairs/s of whole ``jsae run capture`` runs on the toy world, in one process and
data-parallel under ``torchrun --nproc_per_node 2`` (gloo, CPU).  ``python benchmarks/capture_throughput.py``
(from the repository root) writes ``benchmarks/results/capture_throughput.json``.

Each run is the command line a user types, timed from launch to exit (Python start-up, imports, loading the toy
model, building the world pairs, the capture, the manifest), so pairs/s = pairs / wall seconds of the whole run:

    1 process:  jsae run capture --model llava --layers 2 --pairs N --batch-size B --shard-size S --out DIR
    2 processes: torchrun --nproc_per_node 2 --no-python jsae run capture ...the same...

every process with ``OMP_NUM_THREADS=--threads`` (default 1: one core per process).  The runs are interleaved
(1, 2, 2, 1, 1, 2, ...) so that drift in the machine's load falls on both alike; the 1-minute load average is
recorded before and after each run, and the CPU seconds (user + system) of the run's processes beside the wall
time (on a shared machine the CPU time is the steadier of the two).  After the runs the 2-process capture is
checked against the 1-process one: the same manifest (fingerprint, plan, shards) and bitwise the same shards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(procs: int, out: Path, args: argparse.Namespace) -> list[str]:
    capture = ["run", "capture", "--model", args.model, "--layers", args.layers, "--pairs", str(args.pairs),
               "--batch-size", str(args.batch_size), "--shard-size", str(args.shard_size), "--out", str(out)]
    if procs == 1:
        return [str(BIN / "jsae"), *capture]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
            str(_free_port()), "--no-python", str(BIN / "jsae"), *capture]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_once(procs: int, out: Path, args: argparse.Namespace) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_DISABLE": "1"}
    load_before = os.getloadavg()
    cpu0, t0 = _children_cpu(), time.perf_counter()
    res = subprocess.run(_command(procs, out, args), env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - cpu0
    load_after = os.getloadavg()
    if res.returncode != 0:
        raise SystemExit(f"{procs}-process run failed:\n{res.stderr[-3000:]}")
    return {"processes": procs, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "pairs_per_s": round(args.pairs / wall, 2),
            "load_1min_before": round(load_before[0], 2), "load_1min_after": round(load_after[0], 2),
            "load_5min_before": round(load_before[1], 2)}


def same_capture(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    from jsae.capture import read_manifest

    ma, mb = read_manifest(a), read_manifest(b)
    if any(ma[k] != mb[k] for k in ("fingerprint", "plan", "shards", "count", "complete")):
        return False
    for s in ma["shards"]:
        ta, tb = load_file(a / s["file"]), load_file(b / s["file"])
        if ta.keys() != tb.keys() or not all(torch.equal(ta[k], tb[k]) for k in ta):
            return False
    return True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llava", help="a shipped toy model")
    p.add_argument("--layers", default="2")
    p.add_argument("--pairs", type=int, default=256, help="world pairs per run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-size", type=int, default=32, help="pairs per shard (the unit of work of a rank)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each kind, interleaved 1, 2, 2, 1, ...")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "capture_throughput.json")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="jsae-capture-throughput-"))
    runs: list[dict] = []
    try:
        for r in range(args.repeats):
            for procs in ((1, 2) if r % 2 == 0 else (2, 1)):
                res = run_once(procs, work / f"p{procs}", args)
                runs.append(res)
                print(json.dumps(res), flush=True)
        equal = same_capture(work / "p1", work / "p2")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = {}
    for procs in (1, 2):
        mine = [r for r in runs if r["processes"] == procs]
        summary[str(procs)] = {"pairs_per_s_median": round(statistics.median(r["pairs_per_s"] for r in mine), 2),
                               "wall_s_median": round(statistics.median(r["wall_s"] for r in mine), 2),
                               "cpu_s_median": round(statistics.median(r["cpu_s"] for r in mine), 2)}
    result = {"benchmark": "capture_throughput", "command": " ".join(_command(1, Path("OUT"), args)[1:]),
              "settings": {k: v for k, v in vars(args).items() if k != "out"},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "gpu": "none (CPU only)"},
              "runs": runs, "median": summary,
              "speedup_2_vs_1": round(summary["2"]["pairs_per_s_median"] / summary["1"]["pairs_per_s_median"], 2),
              "two_process_capture_equals_one_process": equal,
              "load_1min_range": [min(r["load_1min_before"] for r in runs), max(r["load_1min_after"] for r in runs)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(json.dumps({k: result[k] for k in ("median", "speedup_2_vs_1", "two_process_capture_equals_one_process",
                                             "load_1min_range")}, indent=1))


if __name__ == "__main__":
    main()
