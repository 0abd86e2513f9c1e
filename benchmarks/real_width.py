"""What a real run costs, measured at real width on this machine (issue 15): capture per image and the JSAE
training step at the paper's size.  ``python benchmarks/real_width.py`` (from the repository root) writes
``benchmarks/results/real_width.json``.

Every measurement runs in its own subprocess (its peak RSS is its own) with one thread; the machine's load
average is recorded before and after each.

**Capture** (per model of ``tests/data/real_configs``): ``jsae.cost.instantiate`` at real width with 2
decoder layers and 2 vision layers (bf16, random weights), the real image processor and a tokenizer as in
``tests/test_real_width.py``; ``capture_pairs(..., layers=[1], batch_size=1)`` over scikit-image photographs.
Two settings: ``small`` (the tests' shrunken pixel limits: tens of image tokens) for every model, and
``published`` (the published processor settings: hundreds to thousands of image tokens) where one image
fits in a few minutes of one CPU thread.  Reported per image: seconds (after one untimed warm-up image),
peak RSS above the built model (``VmHWM`` reset after the warm-up), the estimate's activation bytes and FLOPs for the same truncated model,
and the effective rate ``R = FLOPs / seconds``.  The stated formula for the full-depth model is then

    seconds / image ≈ jsae.cost.estimate_capture(model, data, layers).flops_per_pair / R

with ``R`` the rate of the device (here: the CPU's bf16 rate measured below; on a GPU its sustained bf16
matmul rate), since the forward stops after the last captured layer and is dominated by matmuls.

**JSAE training at the paper's size**: ``TrainingJointSAEConfig(d_in=4096, d_sae=16384, activation="relu",
alignment="cosine")`` (MSE + L1 + cosine), ``JointSAETrainer`` with Adam, at batch 8 (the reference's) and
4096 pairs; the median time of the trainer's ``_train_step`` over the timed steps, in units of one dense
encoder matmul ``x[batch, 4096] @ W[4096, 16384]`` (float32, timed in the same process), and the process's
peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "real_width.json"
NAMES = ["llava-1.5-7b-hf", "llava-v1.6-mistral-7b-hf", "llama3-llava-next-8b-hf", "qwen3-vl-30b-a3b-instruct",
         "qwen3-vl-4b-instruct"]
# (model, photograph) measured at the published settings: one image within a few CPU minutes
PUBLISHED = [("qwen3-vl-30b-a3b-instruct", "chelsea"), ("qwen3-vl-4b-instruct", "chelsea"), ("llava-1.5-7b-hf", "chelsea")]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def status_gb(key: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last :func:`reset_peak`) of this process, in GB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024 / 1e9
    return float("nan")


def reset_peak() -> None:
    """Linux: restart the peak-RSS counter (VmHWM) at the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


# ================================================================================================
# One capture measurement (child process)
# ================================================================================================


def capture_one(name: str, setting: str, photos: list[str]) -> dict[str, Any]:
    sys.path.insert(0, str(ROOT / "tests"))
    import jsae  # noqa: F401
    import torch
    from nnsight import NNsight
    from test_real_width import SHORT, photo, real_spec, small_spec, tokenizer_for

    from jsae.adapters import for_model
    from jsae.capture import capture_pairs
    from jsae.cost import build_processor, estimate_capture, instantiate, load_spec, truncated_config

    torch.set_num_threads(1)
    spec = small_spec(name) if setting == "small" else real_spec(name)
    t0 = time.perf_counter()
    hf = instantiate(spec, 2, vision_layers=2, dtype=torch.bfloat16)
    build_s = time.perf_counter() - t0
    model = NNsight(hf)
    processor = build_processor(spec, tokenizer_for(real_spec(name)))
    adapter = for_model(model)
    images = [photo(p) for p in photos]
    pairs = [(im, SHORT[i % 2]) for i, im in enumerate(images)]
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        capture_pairs(model, pairs[:1], layers=[1], out_dir=f"{tmp}/warm", processor=processor, batch_size=1, progress=False)
        base_rss = status_gb("VmRSS")
        reset_peak()
        load0 = loadavg()
        t0 = time.perf_counter()
        capture_pairs(model, pairs, layers=[1], out_dir=f"{tmp}/run", processor=processor, batch_size=1, progress=False)
        seconds = (time.perf_counter() - t0) / len(pairs)
        load1 = loadavg()
        peak = status_gb("VmHWM")
    tokens = [adapter.num_image_tokens(im.height, im.width, processor) for im in images]
    truncated = load_spec({"config": truncated_config(spec, 2, 2).to_dict(), "processor": spec.processor})
    est = estimate_capture(truncated, pairs, [1], batch_size=1, processor=processor, model_dtype=torch.bfloat16)
    return {"model": name, "setting": setting, "photos": photos, "image_tokens": tokens,
            "text_tokens": list(est.text_tokens), "build_seconds": round(build_s, 2),
            "seconds_per_image": round(seconds, 3), "peak_rss_gb": round(peak, 3), "process_peak_rss_gb": round(rss_gb(), 3),
            "peak_rss_above_model_gb": round(peak - base_rss, 3),
            "estimated_activation_gb": round(est.activation_bytes / 1e9, 3),
            "estimated_gflop_per_image": round(est.flops_per_pair / 1e9, 2),
            "effective_gflop_per_s": round(est.flops_per_pair / 1e9 / seconds, 2),
            "weights_gb": round(sum(p.numel() * p.element_size() for p in hf.parameters()) / 1e9, 3),
            "loadavg_before": load0, "loadavg_after": load1}


# ================================================================================================
# The JSAE step at the paper's size (child process)
# ================================================================================================


def jsae_step(batch: int, steps: int) -> dict[str, Any]:
    import jsae  # noqa: F401
    import torch

    from jsae.saes.joint_sae import TrainingJointSAE, TrainingJointSAEConfig
    from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData

    torch.set_num_threads(1)
    d_in, d_sae = 4096, 16384
    g = torch.Generator().manual_seed(0)
    n = max(batch * (steps + 1), batch * 2)
    vision, text = torch.randn(n, d_in, generator=g), torch.randn(n, d_in, generator=g)
    x, w = torch.randn(batch, d_in, generator=g), torch.randn(d_in, d_sae, generator=g) / d_in**0.5
    x @ w
    mm = []
    for _ in range(5 if batch > 64 else 21):
        t0 = time.perf_counter()
        x @ w
        mm.append(time.perf_counter() - t0)
    matmul = statistics.median(mm)
    del x, w
    cfg = TrainingJointSAEConfig(d_in=d_in, d_sae=d_sae, activation="relu", alignment="cosine")
    torch.manual_seed(0)
    sae = TrainingJointSAE(cfg)
    trainer = JointSAETrainer(sae, JointTrainerConfig(total_steps=steps, progress=False, log_every=10**9),
                              PairedTensorData(vision, text, batch, seed=0))
    times: list[float] = []
    step = trainer._train_step

    def timed(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = step(*a, **k)
        times.append(time.perf_counter() - t0)
        return out

    trainer._train_step = timed  # type: ignore[method-assign]
    load0 = loadavg()
    trainer.fit(resume=False)
    load1 = loadavg()
    timed_steps = times[1:] if len(times) > 1 else times  # the first step allocates Adam's state
    med = statistics.median(timed_steps)
    n_params = sum(p.numel() for p in sae.parameters())
    return {"batch": batch, "d_in": d_in, "d_sae": d_sae, "activation": "relu", "losses": "mse + l1 + cosine",
            "steps_timed": len(timed_steps), "step_seconds_median": round(med, 4), "matmul_seconds": round(matmul, 5),
            "step_in_matmuls": round(med / matmul, 2), "sae_parameters": n_params, "peak_rss_gb": round(rss_gb(), 3),
            "loadavg_before": load0, "loadavg_after": load1}


# ================================================================================================
# Driver
# ================================================================================================


def child(args: list[str], timeout: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    if r.returncode != 0:
        return {"args": args, "error": (r.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capture", nargs=3, metavar=("MODEL", "SETTING", "PHOTOS"), help=argparse.SUPPRESS)
    ap.add_argument("--jsae", nargs=2, type=int, metavar=("BATCH", "STEPS"), help=argparse.SUPPRESS)
    ap.add_argument("--skip-published", action="store_true", help="only the small settings")
    ap.add_argument("--jsae-4096-steps", type=int, default=3, help="timed steps at batch 4096 (each takes about a minute here)")
    a = ap.parse_args()
    if a.capture:
        print(json.dumps(capture_one(a.capture[0], a.capture[1], a.capture[2].split(","))))
        return
    if a.jsae:
        print(json.dumps(jsae_step(*a.jsae)))
        return
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "threads": 1, "torch_threads": 1},
                               "capture": [], "jsae": []}
    for name in NAMES:
        r = child(["--capture", name, "small", "coffee,astronaut,chelsea"], 900)
        print(json.dumps(r), flush=True)
        results["capture"].append(r)
    if not a.skip_published:
        for name, p in PUBLISHED:
            r = child(["--capture", name, "published", p], 1800)
            print(json.dumps(r), flush=True)
            results["capture"].append(r)
    for batch, steps in ((8, 21), (4096, a.jsae_4096_steps + 1)):
        r = child(["--jsae", str(batch), str(steps)], 3600)
        print(json.dumps(r), flush=True)
        results["jsae"].append(r)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
