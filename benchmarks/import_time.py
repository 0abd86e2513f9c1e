"""Start-up cost of jsae against SAELens, measured in one run.

``python benchmarks/import_time.py`` times, in fresh interpreter processes run in alternation (``--rounds``
rounds, median reported): ``import sae_lens`` (the baseline: jsae must import it to register its
architecture), ``import jsae``, ``import jsae.cli`` and the console script ``jsae --help`` (and each
group's ``--help``).  Prints the medians and the ratios to ``import sae_lens``; writes
``benchmarks/results/import_time.json``.  Run it with one thread per process (``OMP_NUM_THREADS=1``)
so that a busy machine disturbs it less; say in the report whether the machine was busy.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _jsae_script() -> list[str]:
    exe = Path(sys.executable).with_name("jsae")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "jsae.cli"]


def commands() -> dict[str, list[str]]:
    py = sys.executable
    cmds = {
        "import sae_lens": [py, "-c", "import sae_lens"],
        "import jsae": [py, "-c", "import jsae"],
        "jsae --help": [*_jsae_script(), "--help"],
    }
    for group in ("run", "sae", "look", "release", "world", "vista"):
        cmds[f"jsae {group} --help"] = [*_jsae_script(), group, "--help"]
    return cmds


def time_once(cmd: list[str]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr[-500:]}")
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "import_time.json")
    args = p.parse_args()
    cmds = commands()
    for cmd in cmds.values():  # warm the page cache and .pyc files
        time_once(cmd)
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(args.rounds):
        for name, cmd in cmds.items():
            times[name].append(time_once(cmd))
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["import sae_lens"]
    load = os.getloadavg()[0]
    print(f"{'what':<28}{'median s':>10}{'vs import sae_lens':>20}   (1-min load average {load:.2f}, {args.rounds} rounds)")
    for k, v in med.items():
        print(f"{k:<28}{v:>10.3f}{v / base:>19.2f}x")
    from jsae.files import write_json

    write_json(args.out, {"rounds": args.rounds, "load_average_1min": load, "median_s": med, "all_s": times,
                          "ratio_to_import_sae_lens": {k: v / base for k, v in med.items()}})


if __name__ == "__main__":
    main()
