"""SAEBench's own core evaluation (``sae_bench.evals.core.main.run_evals``), offline, on a JSAE branch and on a
SAELens SAE of the same size, on the toy LLaVA's language model through TransformerLens's bridge.

SAEBench lives in its own environment (``bash .ci/saebench`` builds ``.saebench-venv`` on top of ``.venv``; its
normal install would replace the CPU torch); the slow test runs ``tests/scripts/saebench_core.py`` there.  Under
CI the environment must exist (CI builds it); elsewhere the test skips, naming the command that builds it."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import jsae  # noqa: F401
import pytest
import torch

from jsae.releases.saebench import JSAEBranchSAE, kl_divergence, saebench_core, saebench_sae
from jsae.saes.joint_sae import JointSAE, JointSAEConfig

ROOT = Path(__file__).resolve().parents[1]
SAEBENCH_PY = Path(os.environ.get("JSAE_SAEBENCH_PYTHON", ROOT / ".saebench-venv" / "bin" / "python"))


def test_kl_divergence_is_torchs() -> None:
    torch.manual_seed(0)
    p, q = torch.randn(3, 5, 11), torch.randn(3, 5, 11)
    ref = torch.nn.functional.kl_div(q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_divergence(p, q), ref, atol=1e-6)
    assert torch.allclose(kl_divergence(p, p), torch.zeros(3, 5), atol=1e-6)


def test_saebench_sae_names_the_bridge_hook() -> None:
    from sae_lens import TopKSAE, TopKSAEConfig

    cfg = JointSAEConfig(d_in=16, d_sae=24)
    cfg.metadata["model_name"], cfg.metadata["hook_name"] = "llava", "model.language_model.layers.3"
    bench = saebench_sae(JointSAE(cfg))
    assert isinstance(bench, JSAEBranchSAE) and bench.modality == "text"
    assert (bench.cfg.hook_name, bench.cfg.hook_layer, bench.cfg.model_name) == ("blocks.3.hook_out", 3, "llava")
    topk = TopKSAE(TopKSAEConfig(d_in=16, d_sae=24, k=4, rescale_acts_by_decoder_norm=True))
    topk.cfg.metadata.hook_name = "model.language_model.layers.5"
    with torch.no_grad():
        topk.W_dec.mul_(3.0)
    x = torch.randn(7, 16)
    before = topk(x)
    same = saebench_sae(topk, model_name="llava")
    assert same is topk and topk.cfg.metadata.hook_name == "blocks.5.hook_out"
    assert topk.cfg.metadata.hf_hook_name == "model.language_model.layers.5" and topk.cfg.metadata.model_name == "llava"
    assert torch.allclose(topk.W_dec.norm(dim=-1), torch.ones(24), atol=1e-5)  # folded, as SAEBench requires
    assert torch.allclose(topk(x), before, atol=1e-4)  # folding keeps the reconstructions
    with pytest.raises(TypeError, match="expected a JointSAE"):
        saebench_sae(torch.nn.Linear(2, 2))


def test_saebench_core_without_saebench_says_how_to_install() -> None:
    try:
        import sae_bench  # noqa: F401
        pytest.skip("SAEBench is importable here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"pip install --no-deps sae-bench") as exc:
        saebench_core({"x": JointSAE(JointSAEConfig(d_in=4, d_sae=4))})
    assert "\n" not in str(exc.value)


@pytest.mark.slow
def test_saebench_core_runs_offline_on_a_jsae_and_a_saelens_sae(tmp_path: Path) -> None:
    if not SAEBENCH_PY.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{SAEBENCH_PY} missing: .ci/run builds it with `bash .ci/saebench`")
        pytest.skip(f"SAEBench's environment is not built ({SAEBENCH_PY}); build it with `bash .ci/saebench`")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([str(SAEBENCH_PY), str(ROOT / "tests" / "scripts" / "saebench_core.py"), "--out", str(tmp_path),
                        "--n-texts", "256", "--n-batches", "4", "--steps", "400"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout[r.stdout.index("{"):])
    jsae_m, topk_m = out["jsae-shapes-llava-l4-text"]["metrics"], out["saelens-topk-128-l4"]["metrics"]
    groups = {"model_behavior_preservation", "model_performance_preservation", "reconstruction_quality", "shrinkage",
              "sparsity", "token_stats", "misc_metrics"}
    assert set(jsae_m) == set(topk_m) == groups
    for m in (jsae_m, topk_m):
        # the same model and the same tokens for both: the SAE-free references agree exactly
        assert m["model_behavior_preservation"]["kl_div_with_ablation"] == jsae_m["model_behavior_preservation"]["kl_div_with_ablation"] > 0
        assert m["model_performance_preservation"]["ce_loss_without_sae"] == jsae_m["model_performance_preservation"]["ce_loss_without_sae"]
        assert m["token_stats"]["total_tokens_eval_reconstruction"] == 4 * 8 * 32
        assert 0 < m["sparsity"]["l0"] <= 128 and 0 < m["misc_metrics"]["frac_alive"] <= 1
        assert m["model_behavior_preservation"]["kl_div_with_sae"] < m["model_behavior_preservation"]["kl_div_with_ablation"]
    assert topk_m["sparsity"]["l0"] == pytest.approx(16.0)  # TopK k=16 on every non-special token
    assert topk_m["reconstruction_quality"]["explained_variance"] > 0.7  # trained per token on this very kind of text
    for name, res in out.items():
        saved = json.loads(Path(res["path"]).read_text())  # SAEBench's own CoreEvalOutput file
        assert saved["eval_type_id"] == "core" and saved["sae_lens_release_id"] == name
        assert saved["eval_result_metrics"]["sparsity"]["l0"] == pytest.approx(res["metrics"]["sparsity"]["l0"])
        cfg = saved["sae_cfg_dict"]
        assert (cfg.get("hook_name") or cfg["metadata"]["hook_name"]) == "blocks.4.hook_out" and cfg["d_sae"] == 128
        assert len(saved["eval_result_details"]) == 128  # one record per latent
