"""Training on a GPU: the JSAE trainer against SAELens's trainer at the paper's size, in bf16 (not a test).

``python benchmarks/gpu_check.py`` (defaults: CUDA, bfloat16, d_in 4096, d_sae 16384, 1024 pairs a step, 20 steps
from initialisation) trains, for ReLU + L1 and for TopK (k 32), SAELens's trainer of the same architecture fed both
modalities (``2 * batch`` vectors a step) and the JSAE trainer with its defaults, in alternation, each from
initialisation on structured pairs (:class:`jsae.protocol.synthetic.PairedSyntheticData`), and prints per trainer the
median step (the trainer's own step method, CUDA-synchronised before and after; each run's first step is left out),
the ratio to SAELens, the JSAE's path and code density, and the peak GPU memory of the run
(``torch.cuda.max_memory_allocated``).  ``--adapters`` adds the adapter checks: reload of a cuda-trained SAE
against CPU float32, and an nnsight trace with steered and SAE-ablated ``jsae.generate`` on a tiny LLaVA in bf16.

Without a CUDA device it stops with a one-line message, unless ``--device cpu`` (a dry run of the same code at a small
size, e.g. ``--device cpu --dtype float32 --d-in 64 --d-sae 256 --batch 64 --steps 3``).  Results go to ``--out``
(default ``benchmarks/results/gpu_check.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch


def _timed(obj: Any, name: str, sink: list[float], sync: Callable[[], None]) -> None:
    inner = getattr(obj, name)

    def timed(*args: Any, **kwargs: Any) -> Any:
        sync()
        t0 = time.perf_counter()
        out = inner(*args, **kwargs)
        sync()
        sink.append(time.perf_counter() - t0)
        return out

    setattr(obj, name, timed)


def run_saelens(arch: str, vision: torch.Tensor, text: torch.Tensor, a: argparse.Namespace, sync: Callable[[], None]) -> list[float]:
    from sae_lens import (SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE,
                          TopKTrainingSAEConfig)
    from sae_lens.config import LoggingConfig, SAETrainerConfig

    vectors = torch.cat([vision, text])

    def provider() -> Iterator[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        while True:
            order = torch.randperm(vectors.shape[0], generator=g)
            for i in range(0, vectors.shape[0] - 2 * a.batch + 1, 2 * a.batch):
                yield vectors[order[i:i + 2 * a.batch]].to(a.device, getattr(torch, a.dtype))

    torch.manual_seed(0)
    kw = dict(d_in=a.d_in, d_sae=a.d_sae, dtype=a.dtype, device=a.device)
    sae: Any = (StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=0.03, **kw)) if arch == "relu"
                else TopKTrainingSAE(TopKTrainingSAEConfig(k=a.k, **kw)))
    cfg = SAETrainerConfig(total_training_samples=a.steps * 2 * a.batch, train_batch_size_samples=2 * a.batch, lr=3e-4,
                           lr_end=3e-4, device=a.device, logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=cfg, sae=sae, data_provider=provider())
    steps: list[float] = []
    _timed(trainer, "_train_step", steps, sync)
    trainer.fit()
    return steps


def run_jsae(arch: str, vision: torch.Tensor, text: torch.Tensor, a: argparse.Namespace,
             sync: Callable[[], None]) -> tuple[list[float], list[tuple[str, float | None]]]:
    from jsae.saes.joint_sae import TrainingJointSAE, TrainingJointSAEConfig
    from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData

    extra = {"activation": "topk", "k": a.k} if arch == "topk" else {}
    torch.manual_seed(0)
    sae = TrainingJointSAE(TrainingJointSAEConfig(d_in=a.d_in, d_sae=a.d_sae, dtype=a.dtype, device=a.device, **extra))
    paths: list[tuple[str, float | None]] = []
    inner = sae.paired_forward_pass

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = inner(*args, **kwargs)
        paths.append((out.path, out.density))
        return out

    sae.paired_forward_pass = forward  # type: ignore[method-assign]
    trainer = JointSAETrainer(sae, JointTrainerConfig(total_steps=a.steps, device=a.device, progress=False),
                              PairedTensorData(vision, text, a.batch))
    steps: list[float] = []
    _timed(trainer, "_train_step", steps, sync)
    trainer.fit(resume=False)
    return steps, paths


def throughput(a: argparse.Namespace) -> dict[str, Any]:
    from jsae.protocol.synthetic import PairedSyntheticData

    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    s = PairedSyntheticData(d_in=a.d_in, n_shared=a.d_in, n_private=a.d_in, shared_firing_prob=0.02,
                            private_firing_prob=0.02).sample(max(4 * a.batch, 2048))
    out: dict[str, Any] = {}
    for arch in ("relu", "topk"):
        rec: dict[str, Any] = {}
        for kind in ("saelens", "jsae"):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            if kind == "saelens":
                steps = run_saelens(arch, s.vision, s.text, a, sync)
                extra: dict[str, Any] = {}
            else:
                steps, paths = run_jsae(arch, s.vision, s.text, a, sync)
                dens = [d for _, d in paths if d is not None]
                extra = {"paths": sorted({p for p, _ in paths}), "density_first_last": [dens[0], dens[-1]] if dens else None}
            timed = steps[1:] if len(steps) > 1 else steps
            rec[kind] = dict(step_ms=statistics.median(timed) * 1e3, steps=len(steps),
                             peak_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None, **extra)
            import gc

            gc.collect()
        rec["ratio_vs_saelens"] = rec["saelens"]["step_ms"] / rec["jsae"]["step_ms"]
        out[arch] = rec
        print(f"{arch:5s} {a.dtype} {a.d_in}->{a.d_sae}, {a.batch} pairs, {a.steps} steps from init: SAELens "
              f"{rec['saelens']['step_ms']:.1f} ms/step, JSAE {rec['jsae']['step_ms']:.1f} ms/step "
              f"({rec['ratio_vs_saelens']:.2f}x; path {rec['jsae']['paths']}, density {rec['jsae']['density_first_last']}); "
              f"peak GiB SAELens {rec['saelens']['peak_gib']}, JSAE {rec['jsae']['peak_gib']}", flush=True)
    return out


def adapters(a: argparse.Namespace) -> dict[str, Any]:
    """Reload parity of a trained SAE, and nnsight trace + steered / ablated generate on a tiny LLaVA."""
    import tempfile

    import nnsight
    from sae_lens import SAE
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    import jsae

    dt = getattr(torch, a.dtype)
    sae = jsae.TrainingJointSAE(jsae.TrainingJointSAEConfig(d_in=64, d_sae=256, dtype=a.dtype, device=a.device))
    d = tempfile.mkdtemp()
    sae.save_model(d)
    cpu = SAE.load_from_disk(d, device="cpu", dtype="float32")
    dev = SAE.load_from_disk(d, device=a.device)
    x = torch.randn(64, 64)
    diff = (dev(x.to(a.device, dev.dtype), "vision").float().cpu() - cpu(x, "vision")).abs().max().item()
    txt = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    vis = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=16,
                           patch_size=4, projection_dim=32)
    hf = LlavaForConditionalGeneration(LlavaConfig(vision_config=vis, text_config=txt, image_token_index=100,
                                                   image_seq_length=16, vision_feature_layer=-1,
                                                   vision_feature_select_strategy="default")).eval().to(a.device, dt)
    model = nnsight.NNsight(hf)
    adapter = jsae.adapters.for_model(model)
    ids = torch.tensor([[1, 5, 6] + [100] * 16 + [7, 8, 9], [1, 9, 6] + [100] * 16 + [7, 3, 4]], device=a.device)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(2, 3, 16, 16, device=a.device, dtype=dt)}
    with model.trace(**inputs):
        h = adapter.layers[2].output.save()
    direction = torch.randn(64, device=a.device)
    plain = jsae.generate(model, inputs, [], max_new_tokens=6, return_ids=True)
    steered = jsae.generate(model, inputs, [jsae.Steer(2, "image", direction=direction, strength=8.0)], max_new_tokens=6,
                            return_ids=True)
    ablated = jsae.generate(model, inputs, [jsae.Ablate(2, "image", sae=dev, features=list(range(128)))],
                            max_new_tokens=6, return_ids=True)
    again = jsae.generate(model, inputs, [], max_new_tokens=6, return_ids=True)
    rec = {"reload_max_abs_diff": diff, "trace": [str(h.device), str(h.dtype), list(h.shape)],
           "steered_differs": not torch.equal(plain, steered), "ablated_differs": not torch.equal(plain, ablated),
           "clean_after": torch.equal(plain, again)}
    print(f"adapters on {a.device} {a.dtype}: {rec}", flush=True)
    return rec


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="JSAE vs SAELens training on a GPU in bf16 at the paper's size (needs CUDA "
                                            "unless --device cpu)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a dry run")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--d-in", type=int, default=4096, help="input width (>= 1)")
    p.add_argument("--d-sae", type=int, default=16384, help="latents (>= 1)")
    p.add_argument("--k", type=int, default=32, help="TopK's k (>= 1)")
    p.add_argument("--batch", type=int, default=1024, help="pairs a step (>= 1)")
    p.add_argument("--steps", type=int, default=20, help="steps of each run (>= 2)")
    p.add_argument("--adapters", action="store_true", help="also the reload and adapter (nnsight, generate) checks")
    p.add_argument("--out", default="benchmarks/results/gpu_check.json")
    a = p.parse_args(argv)
    for name, low in (("d_in", 1), ("d_sae", 1), ("k", 1), ("batch", 1), ("steps", 2)):
        if getattr(a, name) < low:
            p.error(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(a, name)}")
    if a.k > a.d_sae:
        p.error(f"--k ({a.k}) must be at most --d-sae ({a.d_sae})")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, "
                 "or pass --device cpu for a dry run at a small size")
    import jsae  # noqa: F401
    from jsae.files import write_json

    res: dict[str, Any] = {"device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else "cpu",
                           "torch": torch.__version__, "settings": vars(a), "throughput": throughput(a)}
    if a.adapters:
        res["adapters"] = adapters(a)
    print(f"wrote {write_json(Path(a.out), res)}")
    return res


if __name__ == "__main__":
    main()
