"""jsae on TransformerLens's ``TransformerBridge``, through SAELens's ``SAETransformerBridge``.

``jsae.load_bridge(name_or_path)`` (or a loaded :class:`~jsae.vlm.VLM`) returns a :class:`JSAEBridge`, an
``SAETransformerBridge`` booted on the VLM's weights, with its processor and jsae adapter::

    bridge = jsae.load_bridge("llava")
    sae = SAE.from_pretrained("jsae-shapes-llava-l4")          # metadata.hook_name: blocks.4.hook_out
    inputs = bridge.build_inputs([image], ["a red cat"])
    tokens, kwargs = bridge.split_inputs(inputs)               # input_ids; pixel_values, attention_mask, ...
    with sae.routing(bridge.image_token_mask(inputs)):         # image tokens: vision branch; the rest: text
        logits, cache = bridge.run_with_cache_with_saes(tokens, saes=[sae], use_error_term=True, **kwargs)
    codes = cache[bridge.get_sae_hook_name(sae)]               # [B, S, d_sae]

What booting does, and what jsae does about it:

* TransformerLens replaces the model's modules with its own components and switches attention to eager, in
  place.  The bridge is booted on a *structural copy* of the model (modules and configs copied, every
  parameter and buffer shared), so the model jsae reads through nnsight is left as it was and no weight is
  duplicated.
* For a multimodal model TransformerLens loads a processor by the model's name, and when that fails (a toy
  model's processor, a Qwen3-VL processor without torchvision) it runs ``pip install torchvision`` into the
  running environment; its Qwen3-VL adapters also refuse to start without torchvision.  jsae hands the bridge
  the VLM's own processor instead: during the boot it registers (through TransformerLens's public
  ``ArchitectureAdapterFactory.register_adapter``) a subclass of the architecture's adapter that asks for no
  optional library and loads no processor, and puts the previous adapter back afterwards.
* ``SAETransformerBridge.add_sae`` logs "No hook found ... Skipping." and returns for a hook the bridge does
  not have; :meth:`JSAEBridge.add_sae` raises a one-line error instead (and names a module-path hook for the
  bridge first, see :func:`~jsae.saes.joint_sae.normalise_hook_metadata`).
* TransformerLens 3.9's bridged LLaVA computes wrong tokens with the KV cache (``bridge.generate``, and
  transformers' ``generate`` on the bridged model, caption a toy image as "a small at the food ..."; without the
  cache they match the model).  :meth:`JSAEBridge.generate_from_inputs` runs transformers' ``generate`` on the
  bridged model without the cache (the prompt is recomputed each step, so prompt-position hook edits act as
  prefill edits and the hooks and SAEs on the bridge apply to every step).
* After an SAE is removed (``reset_saes``, the end of ``run_with_cache_with_saes``), SAELens puts a fresh
  ``HookPoint`` at the hook; TransformerLens renames it to its bare local name (``hook_out``), and the
  bridge's ``run_with_hooks`` then silently skips hooks added under the full name.  :class:`JSAEBridge` gives
  such hook points their full names back after every removal.

Layer ``L``'s ``blocks.L.hook_out`` is the output of decoder layer ``L`` (jsae's layer ``L``); on Qwen3-VL it is,
like jsae's read, the state before DeepStack adds visual features after the first decoder layers.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator, Mapping, Sequence

import torch
from sae_lens import SAE, SAETransformerBridge
from torch import Tensor, nn
from transformer_lens.hook_points import HookPoint

from jsae.adapters import VLMAdapter, adapter_class, layer_of_hook
from jsae.saes.joint_sae import normalise_hook_metadata
from jsae.vlm import VLM, load_vlm


def weight_sharing_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree and configs that shares every parameter and buffer with ``model``
    (changing the copy's modules or config leaves ``model`` as it was; changing a weight in place changes both)."""
    shared = {id(t): t for _, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]}
    return copy.deepcopy(model, memo=shared)


def _architecture(hf_model: nn.Module) -> str:
    from transformer_lens.model_bridge.sources.transformers import determine_architecture_from_hf_config

    try:
        return determine_architecture_from_hf_config(hf_model.config)
    except ValueError:
        raise ValueError(f"TransformerLens's bridge does not support {type(hf_model).__name__}; "
                         "use jsae's nnsight path (jsae.load_vlm) for this model") from None


@contextlib.contextmanager
def _no_processor_boot(architecture: str) -> Iterator[None]:
    """While booting, the architecture's bridge adapter asks for no optional library and loads no processor
    (``cfg.is_multimodal`` is False during the boot; :func:`load_bridge` sets it back)."""
    from transformer_lens.factories.architecture_adapter_factory import ArchitectureAdapterFactory

    # the adapter registered now (TransformerLens has no public getter for it; SUPPORTED_ARCHITECTURES would miss a
    # user's own registration, which must come back after the boot)
    previous = ArchitectureAdapterFactory._adapters[architecture]

    class NoProcessorBoot(previous):  # type: ignore[misc, valid-type]
        required_libraries: list[str] = []

        def __init__(self, cfg: Any) -> None:
            super().__init__(cfg)
            self.jsae_is_multimodal = bool(getattr(self.cfg, "is_multimodal", False))
            self.cfg.is_multimodal = False

    NoProcessorBoot.__name__ = NoProcessorBoot.__qualname__ = previous.__name__
    ArchitectureAdapterFactory.register_adapter(architecture, NoProcessorBoot)
    try:
        yield
    finally:
        ArchitectureAdapterFactory.register_adapter(architecture, previous)


class JSAEBridge(SAETransformerBridge):
    """SAELens's ``SAETransformerBridge`` on a VLM, with the VLM's ``processor`` and jsae adapter
    (:attr:`vlm_adapter`), input helpers, an :meth:`add_sae` that fails loudly, and hook names kept whole after
    SAEs are removed.  Built by :func:`load_bridge`."""

    vlm_adapter: VLMAdapter

    # ---- inputs ---------------------------------------------------------------------------------
    def build_inputs(self, images: Sequence[Any], texts: Sequence[str], **kwargs: Any) -> Any:
        """``vlm_adapter.build_inputs(processor, images, texts, **kwargs)``: the model inputs of (image, text)
        pairs through the model's processor and chat template (with jsae's ``caption_mask``)."""
        return self.vlm_adapter.build_inputs(self.processor, images, texts, **kwargs)

    def split_inputs(self, inputs: Mapping[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        """``(input_ids, kwargs)`` for the bridge's ``forward`` / ``run_with_cache`` / ``generate``: the token ids
        and the other tensors the model takes (``pixel_values``, ``attention_mask``, ...), on the bridge's device."""
        self.vlm_adapter.check_inputs(inputs)
        kwargs = self.vlm_adapter.model_kwargs(inputs)
        device = next(self.original_model.parameters()).device
        kwargs = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}
        return kwargs.pop("input_ids"), kwargs

    def image_token_mask(self, inputs: Mapping[str, Any]) -> Tensor:
        """``[B, S]`` bool, True at the image tokens (what ``JointSAE.routing`` takes)."""
        return self.vlm_adapter.image_token_mask(inputs)

    @torch.no_grad()
    def generate_from_inputs(self, inputs: Mapping[str, Any], max_new_tokens: int = 20, *, use_cache: bool = False,
                             return_ids: bool = False, **generate_kwargs: Any) -> Any:
        """Greedy generation from ``inputs`` (``build_inputs(..., add_generation_prompt=True)``) through the bridged
        model, with the hooks (``with bridge.hooks(fwd_hooks=...)``) and SAEs (``bridge.saes([...])``) active on
        every step: transformers' ``generate`` on ``bridge.original_model``, without the KV cache by default (see the
        module docstring).  Returns the decoded new text of each prompt, or the new ids ``[B, n]``."""
        if max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        ids, kwargs = self.split_inputs(inputs)
        tok = getattr(self.processor, "tokenizer", self.processor)
        generate_kwargs.setdefault("do_sample", False)
        if getattr(tok, "pad_token_id", None) is not None:
            generate_kwargs.setdefault("pad_token_id", tok.pad_token_id)
        out = self.original_model.generate(input_ids=ids, **kwargs, max_new_tokens=max_new_tokens, use_cache=use_cache,
                                           **generate_kwargs)
        new = out[:, ids.shape[1]:]
        return new if return_ids else tok.batch_decode(new, skip_special_tokens=True)

    # ---- SAEs -----------------------------------------------------------------------------------
    def add_sae(self, sae: Any, use_error_term: bool | None = None) -> None:
        """``SAETransformerBridge.add_sae``, raising a one-line ``ValueError`` (not a skipped log line) when the
        bridge has no hook of that name.  An SAE whose ``metadata.hook_name`` is a module path or HookedTransformer
        name of a decoder layer's output is first given its bridge name (``blocks.L.hook_out``)."""
        meta = sae.cfg.metadata
        normalise_hook_metadata(meta)
        for key in ("hook_name", "hook_name_out"):
            name = meta.get(key)
            # resolved as SAETransformerBridge.add_sae resolves it (aliases such as blocks.L.hook_resid_post)
            if name is not None and self._resolve_hook_name(name) not in self.hook_dict and name not in self.acts_to_saes:
                layer = layer_of_hook(name)
                where = (f"this bridge has blocks 0..{self.cfg.n_layers - 1}" if layer is not None
                         else f"decoder layer outputs are blocks.L.hook_out, L in 0..{self.cfg.n_layers - 1}")
                raise ValueError(f"the SAE's {key} {name!r} is not a hook of this bridge ({where}); attach an SAE "
                                 "trained on this model, or set sae.cfg.metadata.hook_name to one of bridge.hook_dict")
        super().add_sae(sae, use_error_term=use_error_term)

    def reset_saes(self, act_names: str | list[str] | None = None) -> None:
        """``SAETransformerBridge.reset_saes``, then :meth:`restore_hook_names`."""
        super().reset_saes(act_names)
        self.restore_hook_names()

    @contextlib.contextmanager
    def saes(self, saes: Any = (), reset_saes_end: bool = True, use_error_term: bool | None = None) -> Iterator[Any]:
        """``SAETransformerBridge.saes`` (what ``run_with_saes``, ``run_with_cache_with_saes`` and
        ``run_with_hooks_with_saes`` use), then :meth:`restore_hook_names` once the SAEs are removed."""
        try:
            with super().saes(saes=list(saes) if not isinstance(saes, SAE) else saes, reset_saes_end=reset_saes_end,
                              use_error_term=use_error_term) as bridge:
                yield bridge
        finally:
            self.restore_hook_names()

    def restore_hook_names(self) -> None:
        """Give every hook point that lost its full name (renamed to its bare local name when SAELens put it back)
        its full name again, so ``run_with_hooks`` finds it by that name."""
        for name, hook in self.hook_dict.items():
            if isinstance(hook, HookPoint) and hook.name and "." not in hook.name and name.endswith("." + hook.name):
                hook.name = name


def load_bridge(source: str | VLM, *, dtype: Any = "auto", device: Any = None, **load_kwargs: Any) -> JSAEBridge:
    """An ``SAETransformerBridge`` (:class:`JSAEBridge`) on a VLM: ``source`` is what :func:`jsae.load_vlm`
    takes (a toy model's name, a hub id, a directory) or a loaded :class:`~jsae.vlm.VLM`.

    The bridge runs on a structural copy of the model that shares its weights (:func:`weight_sharing_copy`), so
    the VLM it was booted from is not changed (TransformerLens swaps in its own modules and eager attention);
    it carries the VLM's processor (``bridge.processor``) and adapter (``bridge.vlm_adapter``).  ``dtype``,
    ``device`` and ``load_kwargs`` go to :func:`jsae.load_vlm` when ``source`` is a name.  Raises a one-line
    ``ValueError`` for a model TransformerLens's bridge does not support."""
    if isinstance(source, VLM):
        vlm = source
    elif isinstance(source, tuple) and len(source) == 3:
        vlm = VLM(*source)
    else:
        vlm = load_vlm(source, dtype=dtype, device=device, **load_kwargs)
    if vlm.adapter.remote:
        raise ValueError("a remote (NDIF) model has no local weights to bridge; load it with remote=False")
    hf = vlm.hf_model
    architecture = _architecture(hf)
    clone = weight_sharing_copy(hf)
    tokenizer = getattr(vlm.processor, "tokenizer", vlm.processor)
    first = next(hf.parameters())
    with _no_processor_boot(architecture), warnings.catch_warnings():
        # TransformerLens warns for each vision-tower layer whose text-model hook aliases do not apply to it
        warnings.filterwarnings("ignore", message=r"Hook alias .* did not resolve")
        bridge = JSAEBridge.boot_transformers(str(getattr(hf, "name_or_path", "") or architecture), hf_model=clone,
                                              tokenizer=tokenizer, device=first.device, dtype=first.dtype)
    bridge.cfg.is_multimodal = bool(getattr(bridge.adapter, "jsae_is_multimodal", True))
    bridge.processor = vlm.processor
    bridge.vlm_adapter = adapter_class(type(hf))(clone)
    return bridge  # type: ignore[return-value]


__all__ = ["JSAEBridge", "load_bridge", "weight_sharing_copy"]
