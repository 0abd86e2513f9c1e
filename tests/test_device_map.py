"""A model larger than one device (issue 30, item 3): capture with a ``device_map`` equals the one-device capture,
on the CPU.  The shipped toy MoE (``qwen3-vl-moe``, the real ``Qwen3VLMoeForConditionalGeneration``) is split
between the CPU and the disk (accelerate's offload hooks: the weights of the disk part are read back layer by
layer, as they move between GPUs on a multi-GPU machine), by ``device_map="auto"`` with ``max_memory``, by an
explicit map, and by a map that :func:`jsae.cost.plan_gpus` planned on the meta device for two "GPUs" (GPU 0 →
cpu, GPU 1 → disk).  And the dry run says how many GPUs a real, published config needs (meta device, no weights)."""

from __future__ import annotations

import gc
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from conftest import assert_same_capture
from typer.testing import CliRunner

from jsae import capture_pairs, load_vlm
from jsae.capture import read_manifest
from jsae.cost import GPU_RESERVE, estimate_capture, meta_model, plan_gpus
from jsae.data.sources import WorldSource
from jsae.vlm import check_device_map_modules, resolve_device_map, resolve_max_memory
from jsae.world.models import check_weights

CONFIGS = Path(__file__).parent / "data" / "real_configs"
LAYERS = [2, 6]
runner = CliRunner()


def _pairs(n: int = 6):
    return WorldSource.split("train", n, 0).pairs("train")


def _same_capture(a: Path, b: Path) -> None:
    assert_same_capture(a, b, ("fingerprint", "plan", "shards", "count", "complete", "model", "hook_names"))
    for s in read_manifest(a)["shards"]:
        assert all(bool(t.abs().sum() > 0) for t in load_file(a / s["file"]).values())  # real vectors, not zeros


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> Path:
    """The toy MoE on one device (the CPU): the capture every split model must equal."""
    out = tmp_path_factory.mktemp("one") / "cap"
    v = load_vlm("qwen3-vl-moe")
    capture_pairs(v.model, _pairs(), layers=LAYERS, out_dir=out, processor=v.processor, batch_size=2, shard_size=4,
                  progress=False)
    return out


def _split_capture(tmp_path: Path, **placement) -> dict:
    v = load_vlm("qwen3-vl-moe", **placement)
    hf = v.hf_model
    placed = dict(hf.hf_device_map)
    assert {"cpu", "disk"} <= set(placed.values()), placed  # split: part on the CPU, part offloaded
    # the offloaded weights are not in memory: their parameters are on the meta device until their module runs
    modules = dict(hf.named_modules())
    offloaded = [name for name, d in placed.items() if d == "disk" and list(modules[name].parameters())]
    assert offloaded and all(p.device.type == "meta" for name in offloaded for p in modules[name].parameters())
    assert all(p.device.type == "cpu" for name, d in placed.items() if d == "cpu" for p in modules[name].parameters())
    capture_pairs(v.model, _pairs(), layers=LAYERS, out_dir=tmp_path / "split", processor=v.processor, batch_size=2,
                  shard_size=4, progress=False)
    del v, hf, modules
    gc.collect()
    return placed


@pytest.mark.slow
def test_auto_with_max_memory_splits_cpu_and_disk_and_equals_one_device(tmp_path, one_device):
    before = set(Path(tempfile.gettempdir()).glob("jsae-offload-*"))
    placed = _split_capture(tmp_path, device_map="auto", max_memory="cpu=6MB")
    assert placed["lm_head"] == "disk" and placed["model.visual.blocks"] == "cpu"
    _same_capture(tmp_path / "split", one_device)
    assert set(Path(tempfile.gettempdir()).glob("jsae-offload-*")) <= before  # the temporary offload folder went with the model


@pytest.mark.slow
def test_an_explicit_map_as_json_equals_one_device(tmp_path, one_device):
    dm = {"model.visual": "cpu", "model.language_model.embed_tokens": "disk", "model.language_model.norm": "disk",
          "lm_head": "cpu", **{f"model.language_model.layers.{i}": ("cpu" if i % 3 == 0 else "disk") for i in range(8)}}
    (tmp_path / "map.json").write_text(json.dumps(dm))
    placed = _split_capture(tmp_path, device_map=str(tmp_path / "map.json"))
    assert {k: placed[k] for k in dm} == dm
    _same_capture(tmp_path / "split", one_device)


@pytest.mark.slow
def test_a_map_planned_on_the_meta_device_for_two_gpus_loads_and_equals_one_device(tmp_path, one_device):
    """plan_gpus on the toy MoE's config with 'GPUs' of 10 MB (its float32 weights are 16 MB): two, each within
    its memory, every parameter placed; loaded with GPU 0 -> cpu and GPU 1 -> disk it captures the same vectors."""
    directory = check_weights("qwen3-vl-moe", None)
    plan = plan_gpus(directory, 10_000_000, model_dtype=torch.float32, reserve_bytes=0)
    model = load_vlm("qwen3-vl-moe").hf_model
    total = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers())
    assert plan.n_gpus == 2 == math.ceil(total / 10_000_000)
    assert sum(plan.weight_bytes) == total and all(w <= 10_000_000 for w in plan.weight_bytes)
    assert sorted(set(plan.device_map.values())) == [0, 1]
    check_device_map_modules(plan.device_map, model)  # names real modules, places every parameter
    as_cpu = {k: ("cpu", "disk")[d] for k, d in plan.device_map.items()}
    placed = _split_capture(tmp_path, device_map=as_cpu)
    assert {k: placed[k] for k in as_cpu} == as_cpu
    _same_capture(tmp_path / "split", one_device)


@pytest.mark.slow
def test_the_command_line_with_device_map_auto_equals_one_device(tmp_path):
    from jsae.cli import app

    base = ["run", "capture", "--model", "qwen3-vl-moe", "--layers", "2,6", "--n", "6", "--batch-size", "2"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "one")])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "auto"), "--device-map", "auto", "--max-memory", "cpu=6MB"])
    assert r.exit_code == 0, r.output
    _same_capture(tmp_path / "auto", tmp_path / "one")
    for args, words in (
            (["--device-map", "gpu"], ["--device-map 'gpu' is not a strategy, a device or a map", "use auto"]),
            (["--device-map", '{"model.visul": "cpu", "": "cpu"}'], ["'model.visul', which is not a module of "
                                                                      "Qwen3VLMoeForConditionalGeneration"]),
            (["--device-map", '{"model.visual": "cpu"}'], ["places no device for", "model.language_model"]),
            (["--device-map", '{"": 0}'], ["--device-map[''] is 0 but this machine has no usable CUDA GPU"]),
            (["--device-map", "auto", "--max-memory", "cpu=8"], ["--max-memory['cpu'] '8' is not a size", "80GiB"]),
            (["--device-map", "auto", "--max-memory", "gpu0=8GiB"], ["'gpu0' is not a device"]),
            (["--max-memory", "cpu=8GiB"], ["pass --device-map auto with it"])):
        r = runner.invoke(app, [*base, "--out", str(tmp_path / "bad"), *args])
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.output)
        assert all(w in lines[0] for w in words), (args, lines[0])
    assert not (tmp_path / "bad").exists()


def test_device_map_values_are_checked_in_one_line():
    assert resolve_device_map("auto") == "auto" and resolve_device_map(" sequential ") == "sequential"
    assert resolve_device_map("cpu") == "cpu" and resolve_device_map(None) is None
    assert resolve_device_map('{"model": "cpu", "lm_head": "disk"}') == {"model": "cpu", "lm_head": "disk"}
    assert resolve_max_memory("0=70GiB, cpu=8GB") == {0: 70 * 2**30, "cpu": 8 * 10**9}
    assert resolve_max_memory({"cpu": 1000}) == {"cpu": 1000}
    for bad, match in (("balance", "not a strategy"), ({"model": -1}, "is -1, not a device"),
                       ({"model": "cuda"}, "no usable CUDA GPU"), ({1: "cpu"}, "keys are module names"),
                       ({"model": "meta"}, "holds no weights"), ("meta", "holds no weights"),
                       ("{model: cpu}", "not valid JSON"), ({}, "not a strategy"), (True, "not a strategy")):
        with pytest.raises(ValueError, match=match) as e:
            resolve_device_map(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="not both"):
        load_vlm("qwen3-vl-moe", device="cpu", device_map="auto")
    with pytest.raises(ValueError, match="pass device_map='auto'"):
        load_vlm("qwen3-vl-moe", max_memory="cpu=1GiB")


# ---- the dry run: how many GPUs a published config needs ----------------------------------------


@pytest.mark.parametrize("gib,want", [(80, 1), (40, 2), (24, 3)])
def test_gpus_a_real_config_needs(gib, want):
    """Qwen3-VL-30B-A3B-Instruct's published config on the meta device: 31.1e9 parameters = 57.9 GiB in bfloat16,
    which fit one 80 GiB GPU, two of 40 GiB and three of 24 GiB (each keeping the activations + 1 GiB free)."""
    spec = CONFIGS / "qwen3-vl-30b-a3b-instruct.json"
    est = estimate_capture(spec, [(480, 640), (640, 427)], [24], batch_size=8, gpu_memory=f"{gib}GiB")
    plan, meta = est.gpus, meta_model(spec)
    n_params = sum(p.numel() for p in meta.parameters())
    buffers = 2 * sum(b.numel() for b in meta.buffers())  # the rotary frequencies, placed with their module
    assert 31.0e9 < n_params < 31.2e9 and est.weight_bytes == 2 * n_params and 0 < buffers < 1000
    assert plan.n_gpus == want and len(plan.weight_bytes) == want
    assert plan.reserve_bytes == est.activation_bytes + GPU_RESERVE
    budget = gib * 2**30 - plan.reserve_bytes
    assert sum(plan.weight_bytes) == est.weight_bytes + buffers and all(w <= budget for w in plan.weight_bytes)
    assert math.ceil(est.weight_bytes / budget) == want  # no fewer GPUs could hold the weights
    check_device_map_modules(plan.device_map, meta)  # every parameter placed, on GPUs 0..want-1
    assert set(plan.device_map.values()) == set(range(want))
    line = str(est).splitlines()[-1]
    assert line.startswith(f"GPUs of {gib} GiB") and f" {want} " in f" {line.split('  ')[-1]}"


@pytest.mark.slow
def test_the_dry_run_says_how_many_gpus(tmp_path):
    from jsae.cli import app

    spec = CONFIGS / "qwen3-vl-30b-a3b-instruct.json"
    base = ["run", "capture", "--dry-run", "--model", str(spec), "--layers", "24", "--n", "4", "--batch-size", "8"]
    r = runner.invoke(app, [*base, "--gpu-memory", "24GiB"])
    assert r.exit_code == 0, r.output
    assert "GPUs of 24 GiB        3 with --device-map auto (weights " in r.output, r.output
    assert "run one process with --device-map auto, not torchrun" in r.output
    r = runner.invoke(app, base)  # default: 80 GiB
    assert r.exit_code == 0 and "GPUs of 80 GiB        1 (weights 57.9 GiB" in r.output, r.output
    r = runner.invoke(app, [*base, "--gpu-memory", "1GiB"])
    assert r.exit_code == 0 and "GPUs of 1 GiB         none: one forward needs about" in r.output, r.output
    r = runner.invoke(app, [*base, "--gpu-memory", "80"])
    assert r.exit_code == 2 and r.output.strip() == ("error: --gpu-memory '80' is not a size; write a number with its "
                                                     "unit, e.g. 80GiB, 24GB or 512MiB")
