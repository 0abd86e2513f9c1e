"""A battery of bad or unlucky inputs, each classified by what jsae does with it:

* ``clear``: a one-line error raised by jsae (not from deep inside a dependency) and nothing left behind;
* ``handled``: no error, and the result is correct (checked);
* ``unclear``: a one-line error from inside a dependency, or the CLI's "unexpected failure" line;
* ``traceback``: a multi-line error;
* ``silent``: accepted without a word where it should not be, or a wrong result;
* ``partial``: an error, but files were left behind that should not be.

usage: OMP_NUM_THREADS=1 python tests/scripts/bad_inputs.py [-v] [--json OUT]   (about a minute; prints counts,
       --json writes every input's class and answer; tests/test_bad_inputs_battery.py runs it in the suite)
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import jsae  # (before nnsight)
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from jsae.cli import app
from jsae.interventions import Clamp, ProjectOut, Splice, Steer, intervene
from jsae.labels import FeatureLabels, label_features
from jsae.testing import tiny_vlm
from jsae.training import JointSAETrainer, JointTrainerConfig, PairedTensorData
from jsae.testing import pairs_with

SRC = str(Path(jsae.__file__).resolve().parent)
ROOT = Path(tempfile.mkdtemp(prefix="jsae-bad-"))
runner = CliRunner()
CASES: list[tuple[str, Callable[[], Any], Callable[[], bool] | None, Callable[[Any], bool] | None]] = []


def case(name: str, leftover: Callable[[], bool] | None = None, ok: Callable[[Any], bool] | None = None):
    """Register ``fn`` as a bad input; ``leftover()`` says whether files were left behind after an error;
    ``ok(result)`` says whether a run without error is the correct handling."""
    def deco(fn):
        CASES.append((name, fn, leftover, ok))
        return fn
    return deco


def d(name: str) -> Path:
    return ROOT / name


pairs = pairs_with(n=64, d=16, rank=4)  # the shared synthetic pairs (jsae.testing)


def trainer(data=None, steps=10, sae_kw=None, meta=None, **kw):
    cfg = jsae.TrainingJointSAEConfig(d_in=16, d_sae=32, **(sae_kw or {}))
    for k, v in (meta or {}).items():
        cfg.metadata[k] = v
    tcfg = JointTrainerConfig(total_steps=steps, lr=3e-3, progress=False, log_every=5, **kw)
    return JointSAETrainer.from_config(cfg, tcfg, data if data is not None else PairedTensorData(*pairs(), batch_size=8))


def cli(*args: str) -> Any:
    r = runner.invoke(app, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip() and "it/s]" not in ln]
    if r.exit_code == 0:
        return r.output
    if r.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "unexpected failure" not in lines[0]:
        raise CliClear(lines[0])
    raise CliUnclear("\n".join(lines))


class CliClear(Exception):
    pass


class CliUnclear(Exception):
    pass


V = tiny_vlm("llava")
SAE = jsae.JointSAE(jsae.JointSAEConfig(d_in=V.adapter.d_in, d_sae=64))
ENC = V.adapter.build_inputs(V.processor, V.images(2, start=1), ["a red square", "a dog"])
a_file = d("a_file")
a_file.write_text("keep")

# ---- trainer configuration ------------------------------------------------------------------------
for i, kw in enumerate([{"log_every": 0}, {"keep_checkpoints": 0}, {"checkpoint_every": -1, "checkpoint_dir": "x"},
                        {"grad_clip_norm": float("nan")}, {"device": "cuda" if not torch.cuda.is_available() else "cuda:99"},
                        {"device": "potato"}, {"total_steps": 0}, {"lr": float("nan")}, {"lr": -1.0},
                        {"optimizer": "sgd"}, {"epochs": 3, "total_steps": 5}, {"checkpoint_every": 5},
                        {"lr_scheduler": "cosine"}, {"lr_warm_up_steps": 50, "lr_decay_steps": 60},
                        {"mse_norm_batches": 0}, {"dead_feature_window": 0}]):
    def _cfg(kw=kw):
        JointTrainerConfig(**{"total_steps": 10, **kw})
    case(f"JointTrainerConfig({kw})")(_cfg)

# ---- SAE configuration and weights ----------------------------------------------------------------
case("JointSAEConfig(d_sae=10**12)")(lambda: jsae.JointSAE(jsae.JointSAEConfig(d_in=16, d_sae=10**12)))
case("TrainingJointSAE(d_in=4096, d_sae=10**9)")(lambda: jsae.TrainingJointSAE(jsae.TrainingJointSAEConfig(d_in=4096, d_sae=10**9)))
case("JointSAEConfig(k=0, topk)")(lambda: jsae.JointSAEConfig(d_in=16, d_sae=32, activation="topk", k=0))
case("JointSAEConfig(activation='gelu')")(lambda: jsae.JointSAEConfig(d_in=16, d_sae=32, activation="gelu"))
case("JointSAEConfig(d_in=0)")(lambda: jsae.JointSAEConfig(d_in=0, d_sae=32))
case("TrainingJointSAEConfig(alignment='bogus')")(lambda: jsae.TrainingJointSAEConfig(d_in=16, d_sae=32, alignment="bogus"))
case("TrainingJointSAEConfig(l1_coefficient=nan)")(lambda: jsae.TrainingJointSAEConfig(d_in=16, d_sae=32, l1_coefficient=float("nan")))


def _saved(name: str, change: Callable[[dict], dict]) -> Path:
    p = d(name)
    jsae.JointSAE(jsae.JointSAEConfig(d_in=16, d_sae=32)).save_model(p)
    w = load_file(p / "sae_weights.safetensors")
    save_file(change(w), p / "sae_weights.safetensors")
    return p


def _nan(w):
    w = {k: v.clone() for k, v in w.items()}
    w["text.W_dec"][0, 0] = float("nan")
    return w


case("load int8 SAE weights")(lambda: jsae.JointSAE.load_from_disk(_saved("int8", lambda w: {k: v.to(torch.int8) for k, v in w.items()})))
case("load NaN SAE weights")(lambda: jsae.JointSAE.load_from_disk(_saved("nan", _nan)))
case("load truncated SAE weights")(lambda: (lambda p: ((p / "sae_weights.safetensors").write_bytes((p / "sae_weights.safetensors").read_bytes()[:100]), jsae.JointSAE.load_from_disk(p)))(_saved("trunc", lambda w: w)))
case("load a folder without cfg.json")(lambda: jsae.JointSAE.load_from_disk(d("nothing_here")))
case("load a corrupt cfg.json")(lambda: (lambda p: ((p / "cfg.json").write_text("{"), jsae.JointSAE.load_from_disk(p)))(_saved("badcfg", lambda w: w)))
case("encode an int tensor")(lambda: SAE.encode(torch.zeros(3, V.adapter.d_in, dtype=torch.long)))
case("encode the wrong width")(lambda: SAE.encode(torch.zeros(3, 5)))
case("encode with modality 'audio'")(lambda: SAE.encode(torch.zeros(3, V.adapter.d_in), "audio"))

# ---- training data and divergence -----------------------------------------------------------------
case("PairedTensorData vision/text of different widths")(lambda: PairedTensorData(torch.zeros(10, 4), torch.zeros(10, 5), 2))
case("PairedTensorData 10 vs 8 pairs")(lambda: PairedTensorData(torch.zeros(10, 4), torch.zeros(8, 4), 2))
case("PairedTensorData int tensors")(lambda: PairedTensorData(torch.zeros(10, 4, dtype=torch.int64), torch.zeros(10, 4), 2))
case("PairedTensorData batch_size 0")(lambda: PairedTensorData(*pairs(), batch_size=0))
case("train on NaN activations")(lambda: trainer(PairedTensorData(pairs()[0] * float("nan"), pairs()[1], batch_size=8)).fit())
case("train on activations near 1e20")(lambda: trainer(PairedTensorData(*pairs(scale=1e20), batch_size=8)).fit())
case("variance normalisation with batch size 1")(lambda: trainer(PairedTensorData(*pairs(), batch_size=1), sae_kw={"mse_normalization": "variance"}).fit())
case("variance normalisation on constant rows")(lambda: trainer(PairedTensorData(torch.ones(64, 16), pairs()[1], batch_size=8), sae_kw={"mse_normalization": "variance"}).fit())
case("variance normalisation on 1e20 activations")(lambda: trainer(PairedTensorData(*pairs(scale=1e20), batch_size=8), sae_kw={"mse_normalization": "variance"}).fit())
case("train on data of the wrong d_in")(lambda: trainer(PairedTensorData(*pairs(d=8), batch_size=8)).fit())
case("train on a plain list of non-tensors")(lambda: trainer([("a", "b")]).fit())
case("checkpoint_dir is a file", leftover=lambda: a_file.read_text() != "keep")(lambda: trainer(checkpoint_dir=str(a_file)).fit())


def _layer_swap():
    ck = d("ckpt_layers")
    trainer(checkpoint_dir=str(ck), meta={"layer": 2, "model_name": "llava"}).fit()
    return trainer(checkpoint_dir=str(ck), meta={"layer": 5, "model_name": "llava"}).fit()


case("resume a layer-2 checkpoint as layer 5")(_layer_swap)


def _data_swap():
    ck = d("ckpt_data")
    trainer(checkpoint_dir=str(ck)).fit()
    return trainer(PairedTensorData(*pairs(seed=9), batch_size=8), checkpoint_dir=str(ck)).fit()


case("resume a checkpoint on other data")(_data_swap)


def _truncated_ckpt():
    ck = d("ckpt_trunc")
    trainer(checkpoint_dir=str(ck), steps=10, checkpoint_every=5).fit()
    w = ck / "step-0000010" / "trainer_state.safetensors"
    w.write_bytes(w.read_bytes()[:50])
    trainer(checkpoint_dir=str(ck), steps=10, checkpoint_every=5).fit()


case("resume a truncated checkpoint")(_truncated_ckpt)


def _resave_killed():
    ck = d("ckpt_resave")
    a = trainer(checkpoint_dir=str(ck), steps=10, checkpoint_every=5).fit()
    (ck / "step-0000010").rename(ck / ".step-0000010.old-12345678")  # killed mid re-save
    (ck / ".tmp-step-0000010-1-abcd").mkdir()
    b = trainer(checkpoint_dir=str(ck), steps=10, checkpoint_every=5).fit()
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values())) and \
        sorted(p.name for p in ck.iterdir()) == ["latest.json", "step-0000005", "step-0000010"]


case("re-save killed between its two renames", ok=bool)(_resave_killed)

# ---- interventions --------------------------------------------------------------------------------
DIR = torch.randn(V.adapter.d_in)
case("Steer with NaN strength")(lambda: Steer(1, "image", direction=DIR, strength=float("nan")))
case("Steer with inf direction")(lambda: Steer(1, "image", direction=DIR * float("inf")))
case("ProjectOut with NaN direction")(lambda: ProjectOut(1, "image", direction=DIR * float("nan")))
case("Clamp with NaN strength")(lambda: Clamp(1, "image", sae=SAE, features=[1], strength=float("nan")))
case("Clamp with a feature out of range")(lambda: intervene(V.model, [Clamp(1, "image", sae=SAE, features=[999])], ENC).__enter__())
case("Steer at layer 99")(lambda: intervene(V.model, [Steer(99, "image", direction=DIR)], ENC).__enter__())
case("Steer at positions 'middle'")(lambda: Steer(1, "middle", direction=DIR))
case("Steer direction of the wrong size")(lambda: intervene(V.model, [Steer(1, "image", direction=torch.ones(7))], ENC).__enter__())


def _sae_meta(**meta):
    s = jsae.JointSAE(jsae.JointSAEConfig(d_in=V.adapter.d_in, d_sae=64))
    for k, v in meta.items():
        s.cfg.metadata[k] = v
    return s


def _apply(iv):
    with torch.no_grad(), intervene(V.model, [iv], ENC):
        V.hf(**V.adapter.model_kwargs(ENC))


case("Clamp with an SAE of layer 4 at layer 1")(lambda: _apply(Clamp(1, "image", sae=_sae_meta(layer=4), features=[1], strength=3.0)))
case("Splice with a Qwen SAE on LLaVA (same d_in)")(lambda: _apply(Splice(1, "text", sae=_sae_meta(layer=1, model_name="qwen3-vl-moe", model_class="Qwen3VLMoeForConditionalGeneration"))))
case("Intervention.apply with a float mask")(lambda: Steer(1, "image", direction=DIR).apply(torch.zeros(2, 5, V.adapter.d_in), torch.zeros(2, 5)))


def _second_forward():
    kw = V.adapter.model_kwargs(ENC)
    with torch.no_grad():
        base = V.hf(**kw).logits
        with intervene(V.model, [Steer(1, "image", direction=DIR * 5)], ENC):
            a, b = V.hf(**kw).logits, V.hf(**kw).logits
    return torch.equal(a, b) and not torch.equal(a, base)


case("a second forward inside intervene() (image edit)", ok=bool)(_second_forward)


def _exception_inside():
    kw = V.adapter.model_kwargs(ENC)
    hooks = sum(len(m._forward_hooks) for m in V.hf.modules())
    with torch.no_grad():
        base = V.hf(**kw).logits
        try:
            with intervene(V.model, [Steer(1, "image", direction=DIR * 5)], ENC):
                raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        return torch.equal(V.hf(**kw).logits, base) and sum(len(m._forward_hooks) for m in V.hf.modules()) == hooks


case("an exception inside intervene()", ok=bool)(_exception_inside)

# ---- labels ---------------------------------------------------------------------------------------
case("label_features with int codes")(lambda: label_features(torch.zeros(10, 8, dtype=torch.long), torch.zeros(10, 8), torch.zeros(10, 3), list("abc")))
case("label_features with 10 vs 8 pairs")(lambda: label_features(torch.zeros(10, 8), torch.zeros(8, 8), torch.zeros(10, 3), list("abc")))
case("label_features with 2 names for 3 concepts")(lambda: label_features(torch.zeros(10, 8), torch.zeros(10, 8), torch.zeros(10, 3), list("ab")))
case("label_features with min_corr 2")(lambda: label_features(torch.zeros(10, 8), torch.zeros(10, 8), torch.zeros(10, 3), list("abc"), 2.0))
case("load a corrupt labels.json")(lambda: (d("labels.json").write_text("{"), FeatureLabels.load(d("labels.json"))))

# ---- capture --------------------------------------------------------------------------------------
def _cap(out, prs, **kw):
    return jsae.capture_pairs(V.model, prs, layers=kw.pop("layers", [0]), out_dir=out, processor=V.processor,
                              progress=False, **kw)


PAIRS = V.pairs(16)
case("capture a caption None at pair 13", leftover=lambda: d("cap_none").exists())(
    lambda: _cap(d("cap_none"), PAIRS[:13] + [(PAIRS[13][0], None)] + PAIRS[14:], batch_size=4))
case("capture an image None", leftover=lambda: d("cap_img").exists())(lambda: _cap(d("cap_img"), [(None, "a dog"), *PAIRS[:3]]))
case("capture an empty caption", leftover=lambda: d("cap_empty").exists())(lambda: _cap(d("cap_empty"), [*PAIRS[:3], (PAIRS[3][0], " ")], fingerprint="x"))
case("capture out_dir is a file", leftover=lambda: a_file.read_text() != "keep")(lambda: _cap(a_file, PAIRS[:2]))
case("capture a generator of pairs")(lambda: _cap(d("cap_gen"), iter(PAIRS)))
case("capture no pairs")(lambda: _cap(d("cap_nopairs"), []))
case("capture layer 99")(lambda: _cap(d("cap_l99"), PAIRS[:2], layers=[99]))
case("capture batch_size 0")(lambda: _cap(d("cap_b0"), PAIRS[:2], batch_size=0))
case("capture dtype int8")(lambda: _cap(d("cap_int8"), PAIRS[:2], dtype=torch.int8))


def _corrupt_manifest():
    out = d("cap_corrupt")
    out.mkdir()
    (out / "manifest.json").write_text('{"layers": [0], "shards": [')
    _cap(out, PAIRS[:2])


case("capture into a folder with a corrupt manifest.json")(_corrupt_manifest)


def _fixed_retry():
    out = d("cap_retry")
    try:
        _cap(out, PAIRS[:3] + [(PAIRS[3][0], None)], batch_size=2)
    except ValueError:
        pass
    _cap(out, PAIRS[:4], batch_size=2)  # the corrected data
    return json.loads((out / "manifest.json").read_text())["complete"]


case("retry a capture that failed on bad data, with the data fixed", ok=bool)(_fixed_retry)
case("read_layer of a layer not captured")(lambda: (_cap(d("cap_ok"), PAIRS[:2]), jsae.training.load_pairs(d("cap_ok"), 3)))
case("load_pairs of a missing capture")(lambda: jsae.training.load_pairs(d("no_capture"), 0))

# ---- hub ------------------------------------------------------------------------------------------
from jsae.releases import hub  # noqa: E402


def _traversal():
    jsae.JointSAE(jsae.JointSAEConfig(d_in=16, d_sae=32)).save_model(d("hub_sae"))
    root = d("hub")
    hub.push(d("hub_sae"), "org/name", endpoint=root)
    payload = b"evil"
    (root / "evil.bashrc").write_bytes(payload)
    m = json.loads((root / "org" / "name" / hub.MANIFEST).read_text())
    m["files"]["../../evil.bashrc"] = {"sha256": hashlib.sha256(payload).hexdigest(), "size": 4}
    (root / "org" / "name" / hub.MANIFEST).write_text(json.dumps(m))
    hub.pull("org/name", d("pull") / "a" / "b", endpoint=root)


case("hub pull of a manifest listing ../../.bashrc", leftover=lambda: (d("pull") / "evil.bashrc").exists())(_traversal)
case("hub pull into a non-empty foreign folder", leftover=lambda: not (d("home") / ".bashrc").exists())(
    lambda: ((d("home")).mkdir(), (d("home") / ".bashrc").write_text("x"), hub.push(d("hub_sae"), "org/clean", endpoint=d("hub")),
             hub.pull("org/clean", d("home"), endpoint=d("hub"))))
case("hub pull of a repo id with ..")(lambda: hub.pull("org/../x", d("p2"), endpoint=d("hub")))
case("hub pull of a missing repo")(lambda: hub.pull("org/missing", d("p3"), endpoint=d("hub")))
case("hub push of a folder without an SAE")(lambda: hub.push(d("nothing_dir"), "org/x", endpoint=d("hub")))

# ---- command line ---------------------------------------------------------------------------------
CAP = ["capture", "--layers", "2", "--n", "4"]
case("jsae capture --out FILE", leftover=lambda: a_file.read_text() != "keep")(lambda: cli(*CAP, "--out", str(a_file)))
case("jsae capture --split dev", leftover=lambda: d("c1").exists())(lambda: cli(*CAP, "--out", str(d("c1")), "--split", "dev"))
case("jsae capture --n 0", leftover=lambda: d("c2").exists())(lambda: cli("capture", "--layers", "2", "--n", "0", "--out", str(d("c2"))))
case("jsae capture --model llava2", leftover=lambda: d("c3").exists())(lambda: cli(*CAP, "--out", str(d("c3")), "--model", "llava2"))
case("jsae capture --data /no/such/data", leftover=lambda: d("c4").exists())(lambda: cli(*CAP, "--out", str(d("c4")), "--data", "/no/such/data"))
case("jsae capture --layers x")(lambda: cli("capture", "--layers", "x", "--out", str(d("c5"))))
case("jsae capture --pooling median")(lambda: cli(*CAP, "--out", str(d("c6")), "--pooling", "median"))
case("jsae capture --device cuda on CPU" if not torch.cuda.is_available() else "jsae capture --device cuda:99")(
    lambda: cli(*CAP, "--out", str(d("c7")), "--device", "cuda" if not torch.cuda.is_available() else "cuda:99"))
cli(*CAP, "--out", str(d("cap_cli")))
TRAIN = ["train", "--capture", str(d("cap_cli")), "--layer", "2", "--steps", "3", "--batch-size", "2", "--d-sae", "16"]
case("jsae train --out FILE")(lambda: cli(*TRAIN, "--out", str(a_file)))
case("jsae train --checkpoint-dir FILE", leftover=lambda: d("t1").exists())(lambda: cli(*TRAIN, "--out", str(d("t1")), "--checkpoint-dir", str(a_file)))
case("jsae train --layer 5 (not captured)")(lambda: cli(*TRAIN, "--layer", "5", "--out", str(d("t2"))))
case("jsae train --capture missing")(lambda: cli("train", "--capture", str(d("nope")), "--layer", "2", "--out", str(d("t3"))))
case("jsae train --preset fancy")(lambda: cli(*TRAIN, "--out", str(d("t4")), "--preset", "fancy"))


def _train_layer_swap():
    cli("capture", "--layers", "2,5", "--n", "4", "--out", str(d("cap25")))
    base = ["train", "--capture", str(d("cap25")), "--steps", "3", "--batch-size", "2", "--d-sae", "16",
            "--checkpoint-dir", str(d("ck25"))]
    cli(*base, "--layer", "2", "--out", str(d("sae2")))
    cli(*base, "--layer", "5", "--out", str(d("sae5")))


case("jsae train --layer 5 with a finished layer-2 --checkpoint-dir", leftover=lambda: d("sae5").exists())(_train_layer_swap)


def _label_other_model():
    other = jsae.JointSAE(jsae.JointSAEConfig(d_in=128, d_sae=16))
    for k, v in {"model_name": "qwen3-vl-moe", "layer": 2}.items():
        other.cfg.metadata[k] = v
    other.save_model(d("qwen_sae"))
    cli("label", "--sae", str(d("qwen_sae")), "--capture", str(d("cap_cli")), "--layer", "2", "--split", "train", "--n", "4")


case("jsae label a Qwen SAE on a LLaVA capture", leftover=lambda: (d("qwen_sae") / "labels.json").exists())(_label_other_model)
case("jsae label on a capture of another split")(lambda: (cli(*TRAIN, "--out", str(d("sae_l"))), cli("label", "--sae", str(d("sae_l")), "--capture", str(d("cap_cli")), "--layer", "2", "--split", "test", "--n", "4")))
case("jsae label --layer 3 for a layer-2 SAE")(lambda: cli("label", "--sae", str(d("sae_l")), "--capture", str(d("cap_cli")), "--layer", "3", "--split", "train", "--n", "4"))
recipe = d("recipe.yaml")
case("jsae release build with steps: many")(lambda: (recipe.write_text("release: r\nmodel: llava\nlayer: 2\nsteps: many\n"), cli("release", "build", "--config", str(recipe), "--out", str(d("rel")))))
case("jsae release build with a YAML tag")(lambda: (recipe.write_text("release: r\nmodel: !!python/name:os.system\nlayer: 2\n"), cli("release", "build", "--config", str(recipe), "--out", str(d("rel")))))
case("jsae release build with an unknown key")(lambda: (recipe.write_text("release: r\nmodel: llava\nlayer: 2\nstepz: 3\n"), cli("release", "build", "--config", str(recipe), "--out", str(d("rel")))))
case("jsae demo --layers 9", leftover=lambda: d("demo9").exists())(lambda: cli("demo", "--out", str(d("demo9")), "--layers", "9", "--n-train", "8"))
case("jsae demo --out FILE")(lambda: cli("demo", "--out", str(a_file), "--n-train", "8"))
case("jsae demo --preset fancy")(lambda: cli("demo", "--out", str(d("demo_p")), "--preset", "fancy"))
case("jsae steer --alpha nan")(lambda: cli("steer", "--sae", str(d("sae_l")), "--concept", "dog", "--layer", "2", "--alpha", "nan"))


# ---- issue 32: captures against their manifest, provenance in every command, what escaped ------------
import shutil  # noqa: E402
import subprocess  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

LLAVA_L4 = Path(SRC) / "pretrained" / "jsae-shapes-llava-l4" / "model.language_model.layers.4"
L4_CONCEPT = next(lab["label"] for lab in json.loads((LLAVA_L4 / "labels.json").read_text())["labels"] if lab["label"])
STEER_L4 = ["steer", "--sae", str(LLAVA_L4), "--concept", L4_CONCEPT, "--layer", "4", "--alpha", "2"]


def _cap_copy(name: str) -> Path:
    dst = d(name)
    shutil.copytree(d("cap_cli"), dst)
    return dst


def _train_on(cap: Path, out: str):
    return cli("train", "--capture", str(cap), "--layer", "2", "--steps", "3", "--batch-size", "2", "--d-sae", "16",
               "--out", str(d(out)))


def _narrow_shards():
    cap = _cap_copy("cap_narrow")
    w = load_file(cap / "shard-00000.safetensors")
    save_file({k: v[:, :64].contiguous() for k, v in w.items()}, cap / "shard-00000.safetensors")
    return _train_on(cap, "sae_narrow")


def _short_shard():
    cap = _cap_copy("cap_short")
    w = load_file(cap / "shard-00000.safetensors")
    save_file({k: v[:2].contiguous() for k, v in w.items()}, cap / "shard-00000.safetensors")
    return _train_on(cap, "sae_short")


def _inflated_manifest():
    cap = _cap_copy("cap_inflated")
    m = json.loads((cap / "manifest.json").read_text())
    m.update(count=3 * m["count"], total=3 * m["total"])
    (cap / "manifest.json").write_text(json.dumps(m))
    return _train_on(cap, "sae_inflated")


def _truncated_shard():
    cap = _cap_copy("cap_trunc")
    p = cap / "shard-00000.safetensors"
    p.write_bytes(p.read_bytes()[:300])
    return _train_on(cap, "sae_trunc")


def _shard_missing_view():
    cap = _cap_copy("cap_noview")
    w = load_file(cap / "shard-00000.safetensors")
    del w["layer_2.text"]
    save_file(w, cap / "shard-00000.safetensors")
    return _train_on(cap, "sae_noview")


case("jsae train on shards narrower than the manifest's model", leftover=lambda: d("sae_narrow").exists())(_narrow_shards)
case("jsae train on a shard with fewer rows than listed", leftover=lambda: d("sae_short").exists())(_short_shard)
case("jsae train on a manifest claiming 3x its rows", leftover=lambda: d("sae_inflated").exists())(_inflated_manifest)
case("jsae train on a truncated shard", leftover=lambda: d("sae_trunc").exists())(_truncated_shard)
case("jsae train on a shard missing layer_2.text", leftover=lambda: d("sae_noview").exists())(_shard_missing_view)

case("jsae sae steer with a LLaVA SAE on --model qwen3-vl-moe")(lambda: cli(*STEER_L4, "--model", "qwen3-vl-moe", "--n", "2"))
case("jsae sae steer --n -2")(lambda: cli(*STEER_L4, "--n", "-2"))
case("jsae sae steer --n 0")(lambda: cli(*STEER_L4, "--n", "0"))
case("jsae look features of a LLaVA SAE with --model qwen3-vl-moe", leftover=lambda: d("f.html").exists())(
    lambda: cli("look", "features", str(LLAVA_L4), "--model", "qwen3-vl-moe", "--out", str(d("f.html")), "--n-pairs", "8"))
case("jsae run capture --n 1000000000000", leftover=lambda: d("c_huge").exists())(
    lambda: cli("run", "capture", "--layers", "2", "--n", "1000000000000", "--out", str(d("c_huge"))))
case("jsae demo --n-train -5")(lambda: cli("demo", "--out", str(d("demo_neg")), "--n-train", "-5"))
case("jsae sae train --lr 0")(lambda: cli("train", "--capture", str(d("cap_cli")), "--layer", "2", "--lr", "0", "--out",
                                         str(d("sae_lr0"))))
case("jsae world sample --seed 99999999999")(lambda: cli("world", "sample", "--out", str(d("ws")), "--seed", "99999999999"))


def _sixteen_bit_capture():
    g16 = (np.arange(48 * 48).reshape(48, 48) * 28).astype("<u2")
    wide = Image.frombytes("I;16", (48, 48), g16.tobytes())
    hand = Image.fromarray(np.repeat(np.floor(g16 / 257 + 0.5).astype(np.uint8)[..., None], 3, -1))
    _cap(d("cap16"), [(wide, "a red square")], fingerprint="x", layers=[1])
    _cap(d("cap16h"), [(hand, "a red square")], fingerprint="x", layers=[1])
    return torch.equal(jsae.capture.read_layer(d("cap16"), 1)[0], jsae.capture.read_layer(d("cap16h"), 1)[0])


case("capture a 16-bit grayscale image", ok=bool)(_sixteen_bit_capture)


def _sixteen_bit_dataset():
    from jsae.data.images import to_rgb
    from jsae.data.sources import CaptionSource

    folder = d("ds16")
    folder.mkdir()
    g16 = (np.arange(48 * 48).reshape(48, 48) * 28).astype("<u2")
    Image.frombytes("I;16", (48, 48), g16.tobytes()).save(folder / "g.png")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "g.png", "caption": "a gray square"}) + "\n")
    image = to_rgb(CaptionSource.whole(str(folder)).pairs("train")[0][0])
    return np.array_equal(np.asarray(image)[..., 0], np.floor(g16 / 257 + 0.5).astype(np.uint8))


case("a 16-bit grayscale PNG in a caption dataset", ok=bool)(_sixteen_bit_dataset)


def _broken_image_folder():
    folder = d("imgs_broken")
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return cli(*STEER_L4, "--images", str(folder))


case("jsae sae steer --images with a broken file")(_broken_image_folder)


def _empty_metadata():
    folder = d("ds_empty")
    folder.mkdir()
    (folder / "metadata.jsonl").write_text("")
    return cli("run", "capture", "--layers", "2", "--data", str(folder), "--out", str(d("c_empty")))


case("jsae run capture --data with an empty metadata.jsonl", leftover=lambda: d("c_empty").exists())(_empty_metadata)


def _labels_out_of_range():
    folder = d("sae_badlabels")
    shutil.copytree(d("sae_l"), folder)
    (folder / "labels.json").write_text(json.dumps({"concepts": ["dog"], "labels": [
        {"feature": 99999, "label": "dog", "kind": "shared", "purity": 1.0, "vision_corr": 0.9, "text_corr": 0.9}]}))
    return cli("steer", "--sae", str(folder), "--concept", "dog", "--layer", "2", "--alpha", "1")


case("jsae sae steer with labels.json naming feature 99999 of 16")(_labels_out_of_range)
case("jsae sae label on the SAE's own training capture", ok=lambda out: "in-sample" in out)(
    lambda: cli("label", "--sae", str(d("sae_l")), "--capture", str(d("cap_cli")), "--layer", "2", "--split", "train",
                "--n", "4"))


def _nan_sae(name: str) -> Path:
    folder = d(name) / "model.language_model.layers.2"
    s = jsae.JointSAE(jsae.JointSAEConfig(d_in=16, d_sae=32))
    s.save_model(folder)
    w = load_file(folder / "sae_weights.safetensors")
    w["vision.W_dec"][0, 0] = float("nan")
    save_file(w, folder / "sae_weights.safetensors")
    return d(name)


case("jsae release push of an SAE with NaN in vision.W_dec", leftover=lambda: (d("hub32") / "org" / "nan").exists())(
    lambda: cli("release", "push", str(_nan_sae("nan_push")), "--repo", "org/nan", "--hub", str(d("hub32"))))


def _two_revisions():
    src = d("rev_src") / "model.language_model.layers.2"
    firsts = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        s = jsae.JointSAE(jsae.JointSAEConfig(d_in=16, d_sae=32))
        s.save_model(src)
        firsts.append(s.vision.W_dec.detach().clone())
        hub.push(d("rev_src"), "org/rev", endpoint=d("hub32"))
    old = hub.revisions("org/rev", endpoint=d("hub32"))[1]
    got = hub.pull("org/rev", d("rev_old"), endpoint=d("hub32"), revision=old)
    return torch.equal(jsae.JointSAE.load_from_disk(got / "model.language_model.layers.2").vision.W_dec, firsts[0])


case("hub pull of an earlier revision", ok=bool)(_two_revisions)
case("jsae release pull --revision doesnotexist", leftover=lambda: d("rev_x").exists())(
    lambda: cli("release", "pull", "org/rev", "--out", str(d("rev_x")), "--hub", str(d("hub32")), "--revision",
                "doesnotexist"))


_LIMITED = (
    "import resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))\n"
    "from jsae.cli import app\n"
    "sys.argv = ['jsae', *sys.argv[2:]]\n"
    "app()\n")


def _full_disk(limit: int, *args: str) -> Any:
    """A real process whose writes past ``limit`` bytes fail (as on a full disk)."""
    import os

    r = subprocess.run([sys.executable, "-c", _LIMITED, str(limit), *args], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and "%|" not in ln and "it/s]" not in ln]
    if r.returncode == 0:
        return r.stdout
    if r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "unexpected failure" not in lines[0]:
        raise CliClear(lines[0])
    raise CliUnclear("\n".join(lines))


case("a full disk while training", leftover=lambda: (d("sae_full") / "cfg.json").exists())(
    lambda: _full_disk(3000, "train", "--capture", str(d("cap_cli")), "--layer", "2", "--steps", "3", "--batch-size",
                       "2", "--d-sae", "64", "--out", str(d("sae_full"))))
case("a full disk while capturing", leftover=lambda: any(p.name.startswith(".shard") for p in d("cap_full").glob(".*")))(
    lambda: _full_disk(20_000, "capture", "--layers", "2", "--n", "64", "--batch-size", "16", "--out", str(d("cap_full"))))
case("capture to a disk too small for its shards")(
    lambda: jsae.capture.check_capture_disk(d("cap_toolarge"), 10**12, 4, 4096))


def _vista_other_model():
    from sae_lens import StandardSAE, StandardSAEConfig

    from jsae.vista.core import check_text_sae

    s = StandardSAE(StandardSAEConfig(d_in=V.adapter.d_in, d_sae=16))
    s.cfg.metadata.hook_name, s.cfg.metadata.model_name = V.adapter.hook_name(1), "qwen3-vl-moe"
    check_text_sae(s, V.adapter, 1)


case("VISTA with a text SAE of another model (same width)")(_vista_other_model)


# ---- upstream: release YAML, SAEBench -------------------------------------------------------------
case("jsae release yaml --neuronpedia with a folder that does not exist")(
    lambda: cli("release", "yaml", "--neuronpedia", str(ROOT / "no-such-export")))


def _saebench_zero_texts():
    from jsae.releases.saebench import saebench_core

    return saebench_core({"x": jsae.JointSAE(jsae.JointSAEConfig(d_in=16, d_sae=32))}, n_texts=0)


case("saebench_core with n_texts=0")(_saebench_zero_texts)


# ---- run ------------------------------------------------------------------------------------------
def classify(name, fn, leftover, ok) -> tuple[str, str]:
    try:
        result = fn()
    except (CliClear, CliUnclear) as exc:
        kind = "clear" if isinstance(exc, CliClear) else ("traceback" if "\n" in str(exc) else "unclear")
        if leftover is not None and leftover():
            kind = "partial"
        return kind, str(exc)
    except BaseException as exc:  # noqa: BLE001
        if isinstance(exc, SystemExit):
            return "unclear", f"SystemExit {exc}"
        msg = str(exc).strip()
        frames = traceback.extract_tb(exc.__traceback__)
        inner = frames[-1].filename if frames else ""
        from_jsae = inner.startswith(SRC) or "/adapters/" in inner
        if "\n" in msg or not msg or isinstance(exc, (KeyError, AttributeError, IndexError, AssertionError)):
            kind = "traceback"
        else:
            kind = "clear" if from_jsae else "unclear"
        if leftover is not None and leftover():
            kind = "partial"
        return kind, f"{type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"
    if ok is not None:
        return ("handled" if ok(result) else "silent"), "ok" if ok(result) else "wrong result"
    return "silent", "accepted without an error"


def main() -> None:
    verbose = "-v" in sys.argv
    out = sys.argv[sys.argv.index("--json") + 1] if "--json" in sys.argv else None
    counts: Counter[str] = Counter()
    results = {}
    for name, fn, leftover, ok in CASES:
        kind, why = classify(name, fn, leftover, ok)
        counts[kind] += 1
        results[name] = {"kind": kind, "why": why}
        if verbose or kind not in ("clear", "handled"):
            print(f"[{kind:9}] {name}: {why[:220]}")
    print(f"{len(CASES)} inputs: " + ", ".join(f"{k} {counts[k]}" for k in
                                               ("clear", "handled", "unclear", "traceback", "silent", "partial")))
    if out:
        Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
