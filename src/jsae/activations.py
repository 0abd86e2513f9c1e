"""The one reader of hidden states.

Every part of jsae that needs a VLM's residual stream reads it here: the pooled capture
(:mod:`jsae.capture`), the per-token states of the feature browser and the Neuronpedia export, VISTA's
projector losses (with gradients) and its text-only states, and SAEBench's metrics.  One nnsight trace per
batch reads ``adapter.layers[L].output`` for every requested layer; without ``logits`` the forward stops
after the last requested layer (``tracer.stop()``).

``reduce(hidden, layer)`` runs *inside* the trace on each layer's ``[B, S, d]`` states (e.g. pooling over
the image tokens), so only what it returns is kept; on a remote (NDIF) model, where jsae's code does not
run, the states are saved whole and ``reduce`` runs here after the trace.

Layer ``L`` is the output of decoder layer ``L`` (SAELens's ``blocks.L.hook_resid_post``); in
transformers 5 it is a bare tensor, :func:`layer_output` also accepts the ``(hidden, ...)`` tuple of older
versions.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import Tensor

from jsae.adapters import VLMAdapter, last_position_mask, last_positions, unwrap  # re-exported: the one home is the adapters'

Reduce = Callable[[Tensor, int], Any]


def layer_output(output: Any) -> Tensor:
    """The hidden states in a decoder layer's output: the tensor itself, or the first element of a tuple."""
    return output[0] if isinstance(output, tuple) else output


def with_layer_output(output: Any, hidden: Tensor) -> Any:
    """``output`` with its hidden states replaced by ``hidden`` (same container as the layer returned)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def model_device(model: Any) -> torch.device:
    """Where the model's inputs go: the device of its first parameter (``meta`` for an undispatched remote model);
    for a model spread over devices (loaded with a ``device_map``) the first device of its map that holds weights
    (``"disk"``: offloaded weights run on the CPU), as accelerate's own main device."""
    hf = unwrap(model)
    placed = getattr(hf, "hf_device_map", None)
    if isinstance(placed, dict) and placed:
        first = next((d for d in placed.values() if d not in ("cpu", "disk")), "cpu")
        return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
    return next(hf.parameters()).device


def to_model_kwargs(adapter: VLMAdapter, inputs: Mapping[str, Any], device: torch.device | None = None) -> dict[str, Any]:
    """The tensors the forward takes (``adapter.model_kwargs``), moved to the model's device."""
    kwargs = adapter.model_kwargs(inputs)
    device = device or model_device(adapter.model)
    if device.type == "meta":
        return kwargs
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in kwargs.items()}


def _save(value: Any) -> Any:
    import nnsight

    if isinstance(value, dict):
        return {k: nnsight.save(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(nnsight.save(v) for v in value)
    return nnsight.save(value)


def read_layers(model: Any, adapter: VLMAdapter, inputs: Mapping[str, Any], layers: Iterable[int], *,
                reduce: Reduce | None = None, logits: bool = False, grad: bool = False) -> dict[Any, Any]:
    """Hidden states of ``layers`` for one batch, through one nnsight trace.

    ``model`` is the nnsight envoy (``jsae.load_vlm(...).model``); ``inputs`` come from
    ``adapter.build_inputs`` or a processor.  Returns ``{layer: states}`` (``states`` is ``[B, S, d]`` or
    what ``reduce(states, layer)`` returned) and, with ``logits``, ``"logits"`` (then the forward runs to
    the end).  With ``grad`` the graph is kept (VISTA trains through it); otherwise nothing is tracked."""
    if not hasattr(model, "trace"):
        raise TypeError(f"read_layers needs an nnsight-wrapped model (jsae.load_vlm or nnsight.NNsight), got {type(model).__name__}")
    wanted = sorted({adapter.check_layer(L) for L in layers})
    if not wanted and not logits:
        raise ValueError("nothing to read: pass at least one layer or logits=True")
    kwargs = to_model_kwargs(adapter, inputs)
    remote = adapter.remote
    saved: dict[Any, Any] = {}
    with torch.set_grad_enabled(grad), model.trace(**kwargs, **({"remote": True} if remote else {})) as tracer:
        for L in wanted:
            hidden = layer_output(adapter.layers[L].output)
            saved[L] = _save(hidden if reduce is None or remote else reduce(hidden, L))
        if logits:
            saved["logits"] = _save(model.output.logits)
        else:
            tracer.stop()
    if remote and reduce is not None:
        for L in wanted:
            saved[L] = reduce(saved[L], L)
    return saved


def states_at(model: Any, adapter: VLMAdapter, inputs: Mapping[str, Any], layers: Iterable[int],
              mask: Tensor) -> dict[int, Tensor]:
    """Per-token states: ``{layer: [n, d_in]}`` (float32, on the states' device) at the True positions of
    ``mask [B, S]`` in row-major order, from one :func:`read_layers` pass over ``inputs``."""
    states = read_layers(model, adapter, inputs, layers)
    return {layer: h[mask.to(h.device)].float() for layer, h in states.items()}


__all__ = ["last_position_mask", "last_positions", "layer_output", "model_device", "read_layers", "states_at",
           "to_model_kwargs", "with_layer_output"]
