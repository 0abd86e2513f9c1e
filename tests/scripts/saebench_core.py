"""SAEBench's own core evaluation, offline, on a JSAE branch and on a SAELens SAE of the same size.

Run with the Python of an environment that has SAEBench (``bash .ci/saebench`` builds ``.saebench-venv``)::

    .saebench-venv/bin/python tests/scripts/saebench_core.py --out OUT

The JSAE is the shipped release ``jsae-shapes-llava-l4`` (text branch, d_sae 128, layer 4 of the toy LLaVA);
the SAELens SAE is a TopK SAE of the same width trained here by SAELens's ``SAETrainer`` on the per-token states
of plain-text world captions at the same layer.  Both are evaluated by ``sae_bench.evals.core.main.run_evals``
on the toy LLaVA's language model through TransformerLens's bridge, on locally generated captions.  Prints one
JSON object: ``{name: {"metrics": ..., "path": ...}}`` (SAEBench's result files are in OUT)."""

from __future__ import annotations

import argparse
import json

import torch

import jsae  # noqa: F401  (registers the jsae architecture and releases with SAELens)
from jsae.releases.saebench import saebench_core
from jsae.saes.joint_sae import JointSAE
from jsae.training.recipes import train_saelens_topk
from jsae.vista.core import collect_text_states
from jsae.vlm import load_vlm
from jsae.world.data import iter_world

RELEASE = "jsae-shapes-llava-l4"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for SAEBench's result JSON files")
    ap.add_argument("--n-texts", type=int, default=512)
    ap.add_argument("--n-batches", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1500, help="training steps of the SAELens TopK SAE")
    args = ap.parse_args()
    torch.manual_seed(0)
    jsae_sae = JointSAE.from_pretrained(RELEASE)
    layer = int(jsae_sae.cfg.metadata["layer"])
    vlm = load_vlm("llava")
    captions = [rec["caption"] for _, rec in iter_world("train", 2000, 0)]
    states, _, _ = collect_text_states(vlm.model, vlm.processor, vlm.adapter, captions, [layer], progress=False)
    k = 16  # about the JSAE text branch's L0 on its own data (14.4)
    topk = train_saelens_topk(states[layer], jsae_sae.cfg.d_sae, k, args.steps, 512, 3e-4, seed=0)
    topk.cfg.metadata.hook_name = f"model.language_model.layers.{layer}"
    topk.cfg.metadata.model_name = "llava"
    topk.cfg.metadata.prepend_bos = True
    out = saebench_core({f"{RELEASE}-text": jsae_sae, f"saelens-topk-{jsae_sae.cfg.d_sae}-l{layer}": topk}, "llava",
                        n_texts=args.n_texts, n_batches=args.n_batches, out_dir=args.out)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
