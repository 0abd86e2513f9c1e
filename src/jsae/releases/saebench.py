"""One branch of a JSAE as a SAEBench custom SAE, and SAELens's core evaluation metrics on a toy LM.

:class:`JSAEBranchSAE` implements SAEBench's ``BaseSAE`` contract (``sae_bench.custom_saes.base_sae``):
``W_enc [d_in, d_sae]``, ``W_dec [d_sae, d_in]`` with unit-norm rows (checked by
``check_decoder_norms()``), ``b_enc``, ``b_dec``, ``encode``/``decode``/``forward``, ``device``,
``dtype`` and a ``cfg`` with the fields of SAEBench's ``CustomSAEConfig`` (``model_name``, ``d_in``,
``d_sae``, ``hook_layer``, ``hook_name``, ...).  The decoder norms are folded into the encoder (exact
for ReLU; for TopK the latents are chosen on the unfolded pre-activations, so codes and
reconstructions equal the JSAE's).  SAEBench itself (``pip install sae-bench``) pins ``numpy<2`` and
``datasets<4``, so it does not install next to jsae's stack; the contract is implemented here as a
``torch.nn.Module`` and, when ``sae_bench`` is importable, the config is its own ``CustomSAEConfig``.

:func:`saebench_core` runs **SAEBench's own core evaluation** (``sae_bench.evals.core.main.run_evals``, the
function its ``multiple_evals`` calls once it has loaded a model and a dataset by name) on SAEs at a decoder
layer of a jsae model's language model, offline: the model is TransformerLens's ``TransformerBridge`` on the
local weights (:func:`jsae.load_bridge`), the text a locally generated ``datasets.Dataset`` of world
captions, tokenised by SAELens's ``ActivationsStore``; the results are written by SAEBench's own
``save_single_eval_result`` (its ``CoreEvalOutput`` schema).  A JSAE is evaluated as its text branch
(:class:`JSAEBranchSAE`), a SAELens SAE as itself.  SAEBench is imported only there: ``pip install --no-deps
sae-bench`` plus ``pydantic pandas tabulate`` (its normal install pulls a CUDA torch through torchvision, and
pins ``numpy<2``, ``datasets<4``); ``.ci/saebench`` builds such an environment.

:func:`core_metrics` computes SAELens's core metrics (``sae_lens.evals.run_evals`` names and formulas)
for one branch at the caption tokens of the toy VLM (image + caption inputs), which SAEBench cannot feed:
per caption token at the SAE's layer, with the SAE spliced into the LM by a forward hook for the CE / KL
scores.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from jsae.adapters import saelens_hook_name
from jsae.saes.joint_sae import JointSAE, check_modality


@dataclass
class CustomSAEConfig:
    """The fields of ``sae_bench.custom_saes.custom_sae_config.CustomSAEConfig`` (used when SAEBench is absent)."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int
    hook_name: str
    context_size: int | None = None
    hook_head_index: int | None = None
    architecture: str = ""
    apply_b_dec_to_input: bool | None = None
    finetuning_scaling_factor: bool | None = None
    activation_fn_str: str = ""
    activation_fn_kwargs: dict[str, Any] = field(default_factory=dict)
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = ""
    device: str = ""
    model_from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_path: str = ""
    dataset_trust_remote_code: bool = False  # never run a dataset's own code unless asked
    seqpos_slice: tuple = (None,)
    training_tokens: int = -100_000
    sae_lens_training_version: str | None = None
    neuronpedia_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _config_class() -> Any:
    try:
        from sae_bench.custom_saes.custom_sae_config import CustomSAEConfig as Upstream  # type: ignore

        return Upstream
    except Exception:  # noqa: BLE001 - SAEBench not installed (its pins clash with jsae's stack)
        return CustomSAEConfig


class JSAEBranchSAE(nn.Module):
    """One modality branch of a :class:`~jsae.sae.JointSAE` (default: ``"text"``) as a SAEBench custom SAE.

    ``hook_name`` defaults to TransformerLens's ``blocks.{layer}.hook_resid_post`` (the output of decoder
    layer ``layer``, what jsae's ``model.language_model.layers.{layer}`` hooks), which SAEBench expects."""

    def __init__(self, sae: JointSAE, modality: str = "text", *, model_name: str | None = None,
                 hook_layer: int | None = None, hook_name: str | None = None):
        super().__init__()
        check_modality(modality)
        if sae.cfg.normalize_activations not in ("none", None):
            raise ValueError(f"this JSAE normalises its inputs ({sae.cfg.normalize_activations!r}); fold the scaling "
                             "factor first (sae.fold_activation_norm_scaling_factor)")
        meta = sae.cfg.metadata
        layer = hook_layer if hook_layer is not None else meta.get("layer")
        if layer is None:
            raise ValueError("the JSAE's metadata has no layer; pass hook_layer=")
        self.modality, self.activation, self.k = modality, sae.cfg.activation, sae.cfg.k
        with torch.no_grad():
            W_dec = sae.W_dec_of(modality).detach().float()
            norms = W_dec.norm(dim=-1).clamp(min=1e-8)
            self.W_enc = nn.Parameter(sae.W_enc_of(modality).detach().float() * norms[None, :])
            self.W_dec = nn.Parameter(W_dec / norms[:, None])
            self.b_enc = nn.Parameter(sae.b_enc_of(modality).detach().float() * norms)
            self.b_dec = nn.Parameter(sae.b_dec_of(modality).detach().float().clone())
        self.register_buffer("decoder_norms", norms.clone())
        self.apply_b_dec_to_input = bool(sae.cfg.apply_b_dec_to_input)
        self.device: torch.device = torch.device("cpu")
        self.dtype: torch.dtype = torch.float32
        self.jsae_hook_name = meta.get("hf_hook_name") or meta.get("hook_name")
        self.cfg = _config_class()(
            model_name or meta.get("model_name") or "", d_in=sae.cfg.d_in, d_sae=sae.cfg.d_sae, hook_layer=int(layer),
            hook_name=hook_name or saelens_hook_name(int(layer)),
        )
        self.cfg.architecture = f"jsae-{modality}"
        self.cfg.dataset_trust_remote_code = False  # SAEBench's own default runs a dataset's code; never by default
        self.cfg.apply_b_dec_to_input = self.apply_b_dec_to_input
        self.cfg.activation_fn_str = self.activation
        self.cfg.dtype = "float32"

    @classmethod
    def from_pretrained(cls, release: str, sae_id: str | None = None, modality: str = "text", **kwargs: Any) -> "JSAEBranchSAE":
        return cls(JointSAE.from_pretrained(release, sae_id), modality, **kwargs)

    def encode(self, x: Tensor) -> Tensor:
        x = x.to(self.W_enc.dtype)
        pre = (x - self.b_dec * self.apply_b_dec_to_input) @ self.W_enc + self.b_enc
        acts = torch.relu(pre)
        if self.activation == "topk":  # choose on the JSAE's own (unfolded) pre-activations
            idx = (acts / self.decoder_norms).topk(self.k, dim=-1, sorted=False).indices
            acts = torch.zeros_like(acts).scatter(-1, idx, acts.gather(-1, idx))
        return acts

    def decode(self, feature_acts: Tensor) -> Tensor:
        return feature_acts @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def to(self, *args: Any, **kwargs: Any) -> "JSAEBranchSAE":  # type: ignore[override]
        super().to(*args, **kwargs)
        for a in args:
            if isinstance(a, torch.dtype):
                kwargs.setdefault("dtype", a)
            elif isinstance(a, (str, torch.device)):
                kwargs.setdefault("device", torch.device(a))
        if kwargs.get("device") is not None:
            self.device = torch.device(kwargs["device"])
        if kwargs.get("dtype") is not None:
            self.dtype = kwargs["dtype"]
            self.cfg.dtype = str(self.dtype).removeprefix("torch.")
        return self

    @torch.no_grad()
    def check_decoder_norms(self) -> bool:
        norms = self.W_dec.norm(dim=1)
        tol = 1e-2 if self.W_dec.dtype in (torch.bfloat16, torch.float16) else 1e-5
        return bool(torch.allclose(norms, torch.ones_like(norms), atol=tol))


# ---- SAELens core metrics on the toy LM ---------------------------------------------------------


def kl_divergence(original_logits: Tensor, new_logits: Tensor) -> Tensor:
    """KL(original || new) of the next-token distributions, per position (SAELens's and SAEBench's KL metric)."""
    log_p = torch.log_softmax(original_logits.float(), dim=-1)
    log_q = torch.log_softmax(new_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _nest(flat: dict[str, float]) -> dict[str, dict[str, float]]:
    groups = {
        "model_behavior_preservation": ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae"),
        "model_performance_preservation": ("ce_loss_score", "ce_loss_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae"),
        "reconstruction_quality": ("explained_variance", "explained_variance_legacy", "mse", "cossim"),
        "shrinkage": ("l2_norm_in", "l2_norm_out", "l2_ratio", "relative_reconstruction_bias"),
        "sparsity": ("l0", "l1"),
        "token_stats": ("total_tokens_eval_reconstruction", "total_tokens_eval_sparsity_variance"),
    }
    return {g: {k: flat[k] for k in keys if k in flat} for g, keys in groups.items()}


class CoreMetrics:
    """SAELens's core metrics (``sae_lens.evals.get_sparsity_and_variance_metrics`` and
    ``get_downstream_reconstruction_metrics``), accumulated batch by batch from the SAE's inputs, codes and outputs
    and from the logits of the clean, SAE-spliced and zero-ablated runs; :meth:`compute` gives them under SAELens's
    names.  Per-token metrics (norms, L0, L1, MSE, cosine, CE, KL) are means over every token added, and
    ``explained_variance`` is SAELens's own streaming calculator, as in SAELens; ``explained_variance_legacy``
    centres each batch on its own mean, as SAELens does.  One definition differs by design:
    ``relative_reconstruction_bias`` is pooled over all tokens (Σ‖x̂‖² / Σ x·x̂), where SAELens averages the ratio
    of each batch; the two agree for one batch (``tests/test_core_metrics_vs_saelens.py`` checks both)."""

    KEYS = ("l2_norm_in", "l2_norm_out", "l2_ratio", "l0", "l1", "mse", "cossim", "explained_variance_legacy",
            "kl_div_with_sae", "kl_div_with_ablation", "ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_with_ablation")

    def __init__(self) -> None:
        from sae_lens.evals import ExplainedVarianceCalculator

        self.ev = ExplainedVarianceCalculator()
        self.sums: dict[str, list[Tensor]] = {k: [] for k in self.KEYS}
        self.rrb_num, self.rrb_den, self.n_tokens = 0.0, 0.0, 0

    @torch.no_grad()
    def add_reconstruction(self, x: Tensor, z: Tensor, x_hat: Tensor) -> None:
        """One batch of SAE inputs ``x`` (tokens × d_in), codes ``z`` and outputs ``x_hat``."""
        sums = self.sums
        n_in, n_out = x.norm(dim=-1), x_hat.norm(dim=-1)
        sums["l2_norm_in"].append(n_in)
        sums["l2_norm_out"].append(n_out)
        sums["l2_ratio"].append(n_out / torch.where(n_in.abs() < 1e-4, torch.ones_like(n_in), n_in))
        self.rrb_num += float((n_out ** 2).sum())
        self.rrb_den += float((x * x_hat).sum())
        sums["l0"].append((z != 0).float().sum(-1))
        sums["l1"].append(z.abs().sum(-1))
        resid = (x - x_hat).pow(2).sum(-1)
        sums["mse"].append(resid)
        sums["explained_variance_legacy"].append(1 - resid / (x - x.mean(0)).pow(2).sum(-1).clamp(min=1e-12))
        sums["cossim"].append(torch.nn.functional.cosine_similarity(x, x_hat, dim=-1))
        self.ev.add_batch(sae_output=x_hat, hidden_acts=x)
        self.n_tokens += len(x)

    @torch.no_grad()
    def add_downstream(self, ids: Tensor, attn: Tensor, mask: Tensor, clean: Tensor, sae: Tensor,
                       ablation: Tensor) -> None:
        """One batch of logits (batch × seq × vocab) of the clean run and with the SAE spliced in / the states
        zero-ablated at ``mask``: next-token CE where the target is a ``mask`` token after an attended one, KL at
        ``mask``."""
        target_ok = mask[:, 1:] & attn[:, :-1]
        tgt = ids[:, 1:]
        for logits, key in ((clean, "ce_loss_without_sae"), (sae, "ce_loss_with_sae"), (ablation, "ce_loss_with_ablation")):
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tgt, reduction="none")
            self.sums[key].append(ce[target_ok])
        self.sums["kl_div_with_sae"].append(kl_divergence(clean, sae)[mask])
        self.sums["kl_div_with_ablation"].append(kl_divergence(clean, ablation)[mask])

    def compute(self) -> dict[str, float]:
        """The metrics under SAELens's names (flat), with the KL and CE scores and the token counts."""
        flat = {k: float(torch.cat(v).mean()) for k, v in self.sums.items() if v}
        flat["explained_variance"] = self.ev.compute()
        flat["relative_reconstruction_bias"] = self.rrb_num / self.rrb_den if self.rrb_den else float("nan")
        if "kl_div_with_sae" in flat:
            flat["kl_div_score"] = (flat["kl_div_with_ablation"] - flat["kl_div_with_sae"]) / flat["kl_div_with_ablation"]
            flat["ce_loss_score"] = ((flat["ce_loss_with_ablation"] - flat["ce_loss_with_sae"])
                                     / (flat["ce_loss_with_ablation"] - flat["ce_loss_without_sae"]))
        flat["total_tokens_eval_reconstruction"] = flat["total_tokens_eval_sparsity_variance"] = self.n_tokens
        return flat


@torch.no_grad()
def core_metrics(sae: JSAEBranchSAE | JointSAE, model: str = "llava", *, n_captions: int = 256, batch_size: int = 64,
                 split: str = "validation", seed: int = 0, featurewise: bool = False) -> dict[str, Any]:
    """SAELens's core metrics of the (text) branch at the caption tokens of the toy VLM's language model
    (world image + caption inputs; the SAE replaces the caption-token states), nested as
    ``sae_lens.evals.run_evals`` returns them (``reconstruction_quality/explained_variance``, ...)."""
    from sae_lens.evals import get_featurewise_weight_based_metrics

    from jsae.activations import read_layers
    from jsae.interventions import Splice, ZeroAblate, intervene
    from jsae.vlm import load_vlm
    from jsae.world import world_dataset

    bench = sae if isinstance(sae, JSAEBranchSAE) else JSAEBranchSAE(sae, "text")
    if not bench.check_decoder_norms():
        raise ValueError("the decoder rows are not unit norm; build the wrapper with JSAEBranchSAE(sae)")
    m, processor, adapter = load_vlm(model)
    layer = int(bench.cfg.hook_layer)
    adapter.check_layer(layer)
    from types import SimpleNamespace

    from jsae.interventions import check_sae_site

    site = sae if isinstance(sae, JointSAE) else SimpleNamespace(cfg=SimpleNamespace(d_in=bench.cfg.d_in, metadata={
        "model_name": bench.cfg.model_name or None, "layer": layer, "hook_name": bench.jsae_hook_name}))
    check_sae_site(site, layer, adapter, "core-metrics run", f"pass the --model it was trained on "
                   f"({bench.cfg.model_name or 'see its cfg.json'}), or leave --model out")
    ds = world_dataset(split, n_captions, seed)
    images, captions = [ex["image"] for ex in ds], [ex["caption"] for ex in ds]
    acc = CoreMetrics()
    for i in range(0, len(captions), batch_size):
        enc = adapter.build_inputs(processor, images[i:i + batch_size], captions[i:i + batch_size])
        attn = enc["attention_mask"].bool()
        mask = enc["caption_mask"].bool() & attn  # the caption tokens (what the text branch was trained on)
        clean = read_layers(m, adapter, enc, [layer], logits=True)
        logits = {"clean": clean["logits"].float()}
        # the SAE spliced in at the caption tokens, then those states zero-ablated ("text" = the caption mask)
        for name, iv in (("sae", Splice(layer=layer, positions="text", timing="prefill", sae=bench)),
                         ("ablation", ZeroAblate(layer=layer, positions="text", timing="prefill"))):
            with intervene(m, iv, enc, adapter):
                logits[name] = read_layers(m, adapter, enc, [], logits=True)["logits"].float()
        x = clean[layer][mask].float()
        z = bench.encode(x)
        acc.add_reconstruction(x, z, bench.decode(z))
        acc.add_downstream(enc["input_ids"], attn, mask, logits["clean"], logits["sae"], logits["ablation"])
    flat = acc.compute()
    out: dict[str, Any] = {"model": model, "layer": layer, "hook_name": bench.jsae_hook_name, "modality": bench.modality,
                           "metrics": _nest(flat)}
    if featurewise:
        out["featurewise"] = get_featurewise_weight_based_metrics(bench)  # type: ignore[arg-type]
    return out


# ---- SAEBench's own core evaluation, offline ----------------------------------------------------

SAEBENCH_INSTALL = ("pip install --no-deps sae-bench==0.6.0 pydantic pandas tabulate (in an environment of its own: its "
                    "normal install replaces the CPU torch; .ci/saebench builds one)")


def _import_saebench() -> Any:
    try:
        from sae_bench.evals.core import main as core  # type: ignore
    except ImportError as exc:
        raise ImportError(f"SAEBench is not importable ({exc}); {SAEBENCH_INSTALL}") from None
    return core


def caption_texts(n: int, split: str = "validation", seed: int = 0) -> Any:
    """A local text dataset for SAEBench / SAELens: ``datasets.Dataset`` with one ``text`` column of ``n`` world
    captions (made here, no hub)."""
    from datasets import Dataset

    from jsae.world.data import iter_world

    return Dataset.from_dict({"text": [rec["caption"] for _, rec in iter_world(split, n, seed)]})


def saebench_sae(sae: Any, *, model_name: str | None = None) -> Any:
    """An SAE as SAEBench takes it, hooked at TransformerBridge's ``blocks.L.hook_out``: a :class:`JointSAE` as its
    text branch (:class:`JSAEBranchSAE`), a :class:`JSAEBranchSAE` as it is (its hook renamed), a SAELens SAE with
    ``metadata.hook_name`` set to the bridge's name (the module path kept in ``hf_hook_name``) and its decoder rows
    folded to unit norm where SAELens allows it (``fold_W_dec_norm``, as SAEBench does for the SAELens SAEs it loads
    by name)."""
    from jsae.adapters import bridge_hook_name, sae_layer

    if isinstance(sae, JointSAE):
        layer = sae_layer(sae)
        return JSAEBranchSAE(sae, "text", model_name=model_name, hook_layer=layer, hook_name=bridge_hook_name(layer))
    if isinstance(sae, JSAEBranchSAE):
        sae.cfg.hook_name = bridge_hook_name(int(sae.cfg.hook_layer))
        return sae
    from sae_lens import SAE

    if not isinstance(sae, SAE):
        raise TypeError(f"expected a JointSAE, a JSAEBranchSAE or a SAELens SAE, got {type(sae).__name__}")
    from jsae.saes.joint_sae import normalise_hook_metadata

    normalise_hook_metadata(sae.cfg.metadata)
    if sae.cfg.metadata.get("hook_name") is None:
        raise ValueError("the SAELens SAE's metadata names no hook_name or layer; set sae.cfg.metadata.hook_name")
    if model_name:
        sae.cfg.metadata.model_name = model_name
    try:
        sae.fold_W_dec_norm()
    except NotImplementedError:  # e.g. TopK without rescale_acts_by_decoder_norm: SAEBench then only warns, as here
        pass
    return sae


def saebench_core(saes: dict[str, Any], model: Any = "llava", *, n_texts: int = 512, context_size: int = 32,
                  batch_size_prompts: int = 8, n_batches: int = 8, featurewise: bool = True,
                  out_dir: str | Path | None = None, seed: int = 0) -> dict[str, dict[str, Any]]:
    """SAEBench's core evaluation (``sae_bench.evals.core.main.run_evals``) of each SAE in ``saes`` (name -> a
    :class:`JointSAE` (text branch), a :class:`JSAEBranchSAE` or a SAELens SAE) on ``model``'s language model
    through TransformerLens's bridge, with ``n_texts`` locally generated captions packed into ``context_size``-token
    rows by SAELens's ``ActivationsStore``; ``n_batches`` batches of ``batch_size_prompts`` rows for both the
    reconstruction (KL / CE) and the sparsity / variance metrics.  Returns ``{name: {"metrics": {group: {metric:
    value}}, "path": SAEBench's result JSON or None}}``; with ``out_dir`` each result is written there by SAEBench's
    ``save_single_eval_result`` (checked by its pydantic ``CoreEvalOutput``).  No network: nothing is loaded by name."""
    from sae_lens.training.activations_store import ActivationsStore

    from jsae.bridge import load_bridge

    for name, value in (("n_texts", n_texts), ("context_size", context_size), ("batch_size_prompts", batch_size_prompts),
                        ("n_batches", n_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    if not saes:
        raise ValueError("saes is empty; pass {name: sae}")
    core = _import_saebench()
    from sae_bench.evals.core.eval_config import CoreEvalConfig  # type: ignore
    from sae_bench.sae_bench_utils import general_utils  # type: ignore

    bridge = model if hasattr(model, "run_with_cache") else load_bridge(model)
    model_name = model if isinstance(model, str) else None
    if context_size > bridge.cfg.n_ctx:
        raise ValueError(f"context_size {context_size} is longer than the model's context ({bridge.cfg.n_ctx})")
    texts = caption_texts(n_texts, seed=seed)
    tok = bridge.tokenizer
    ignore = {tok.pad_token_id, tok.eos_token_id, tok.bos_token_id}
    results: dict[str, dict[str, Any]] = {}
    for name, raw in saes.items():
        _, sae, _ = general_utils.load_and_format_sae(name, saebench_sae(raw, model_name=model_name), "cpu")
        if int(sae.cfg.d_in) != int(bridge.cfg.d_model):
            raise ValueError(f"SAE {name!r} reads d_in={sae.cfg.d_in}, the model's residual stream is {bridge.cfg.d_model}")
        store = ActivationsStore.from_config_multi_hook(
            bridge, dataset=texts, hook_names=[sae.cfg.hook_name], hook_d_ins={sae.cfg.hook_name: int(sae.cfg.d_in)},
            streaming=False, context_size=context_size, store_batch_size_prompts=batch_size_prompts, prepend_bos=True,
            dataset_trust_remote_code=False, total_training_tokens=n_texts * context_size)
        store.shuffle_input_dataset(seed=seed)
        config = CoreEvalConfig(
            model_name=str(sae.cfg.model_name), batch_size_prompts=batch_size_prompts,
            n_eval_reconstruction_batches=n_batches, n_eval_sparsity_variance_batches=n_batches,
            dataset="jsae.world captions (validation, generated locally)", context_size=context_size,
            compute_kl=True, compute_ce_loss=True, compute_l2_norms=True, compute_sparsity_metrics=True,
            compute_variance_metrics=True, compute_featurewise_density_statistics=featurewise,
            compute_featurewise_weight_based_metrics=featurewise, llm_dtype="float32")
        metrics, feature_metrics = core.run_evals(sae=sae, activation_store=store, model=bridge, eval_config=config,
                                                  ignore_tokens=ignore)
        if featurewise:
            metrics["misc_metrics"] = core.calculate_misc_metrics(feature_metrics)
        path = None
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            result = core.replace_nans_with_negative_one({
                "unique_id": f"{name}_custom_sae", "sae_set": name, "sae_id": "custom_sae", "eval_cfg": config,
                "metrics": metrics, "feature_metrics": feature_metrics})
            final = Path(general_utils.get_results_filepath(str(out_dir), name, "custom_sae"))
            tmp = final.with_name(f".{final.name}.tmp")
            core.save_single_eval_result(result, core.get_eval_uuid(), core.get_sae_lens_version(), "jsae", str(tmp), sae)
            tmp.replace(final)
            path = str(final)
        results[name] = {"metrics": metrics, "path": path, "hook_name": sae.cfg.hook_name, "d_sae": int(sae.cfg.d_sae)}
    return results


__all__ = ["CustomSAEConfig", "JSAEBranchSAE", "SAEBENCH_INSTALL", "caption_texts", "core_metrics", "kl_divergence",
           "saebench_core", "saebench_sae"]
