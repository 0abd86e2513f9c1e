"""The one loader: ``jsae.load_vlm(name)`` gives the nnsight-wrapped model, its processor and its adapter
for a shipped toy model (``"llava"``, ``"qwen3-vl-moe"``), a local directory or a hub id, and everything
else in jsae takes that :class:`VLM`.

>>> model, processor, adapter = jsae.load_vlm("llava-hf/llava-v1.6-mistral-7b-hf", dtype="bfloat16")
>>> with model.trace(**adapter.model_kwargs(inputs)):
...     h = adapter.layers[16].output.save()

``model`` is an ``nnsight.TransformersModel`` (task ``image-text-to-text``, with the processor) over the
transformers model, so nnsight's own contexts work on it: ``with model.trace(**inputs):`` for one forward and
``with model.generate(**inputs, max_new_tokens=20) as tracer:`` for generation (``tracer.iter[...]`` steps,
``tracer.result`` the ids); with ``remote=True`` it is undispatched (weights stay on NDIF; the tree is
built on the meta device) to trace with ``model.trace(..., remote=True)``.  Loading never runs remote
code (``trust_remote_code=False``) and reads weights from safetensors through transformers.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import torch

from jsae.adapters import VLMAdapter, for_model, supported_models
from jsae.adapters.base import mark_remote


class VLM(NamedTuple):
    """An nnsight-wrapped VLM (``model``), its ``processor`` and its ``adapter`` (unpacks as a triple)."""

    model: Any
    processor: Any
    adapter: VLMAdapter

    @property
    def hf_model(self) -> Any:
        """The transformers model behind the envoy."""
        return self.adapter.hf_model


def as_vlm(model: Any, processor: Any = None, adapter: VLMAdapter | None = None) -> VLM:
    """A :class:`VLM` from what a caller has: an nnsight envoy or a bare transformers model (wrapped in
    ``nnsight.NNsight``), its processor (default ``model.processor``) and adapter (default: by class)."""
    if isinstance(model, VLM):
        return model
    if not hasattr(model, "trace"):
        from nnsight import NNsight

        model, adapter = NNsight(model), None
    if adapter is None or adapter.model is not model:
        adapter = for_model(model)
    processor = processor if processor is not None else getattr(model, "processor", None)
    if processor is None:
        raise ValueError("this call needs the model's processor: pass processor= (jsae.load_vlm returns it)")
    return VLM(model, processor, adapter)


def _offline() -> bool:
    import huggingface_hub.constants

    if getattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False):
        return True
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _not_found(name: str, err: Exception) -> OSError:
    if "/" not in str(name) and not os.path.exists(str(name)):  # not a hub id (ORG/NAME) nor a path: a typo
        from jsae.world.models import MODEL_NAMES

        return OSError(f"unknown model {name!r}: not a shipped toy model ({', '.join(MODEL_NAMES)}), not a local folder "
                       "and not a hub id (ORG/NAME); check the name")
    where = "not a local directory and not in the Hugging Face cache"
    why = "the hub is offline (HF_HUB_OFFLINE)" if _offline() else f"the hub could not provide it ({type(err).__name__})"
    return OSError(
        f"cannot load {name!r}: it is {where}, and {why}; download it first "
        f"(`hf download {name}`) or pass the path of a saved model"
    )


def _envoy(hf: Any, processor: Any) -> Any:
    """nnsight's ``TransformersModel`` over a loaded model, with its processor (``trace`` and ``generate`` work)."""
    from nnsight import TransformersModel

    return TransformersModel(hf, task="image-text-to-text", processor=processor,
                             tokenizer=getattr(processor, "tokenizer", processor))


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"unknown dtype {dtype!r}; use 'auto', 'float32', 'bfloat16', 'float16' or a torch.dtype")


def _toy_directory(path: Any) -> str | None:
    """The toy model's name when ``path`` is a directory that ``jsae world train-models`` wrote (its
    ``training.json`` names the model and its processor is the world's), else None."""
    import json

    from jsae.world.models import MODEL_NAMES

    from jsae.world.models import TOY_MODELS

    def read(fname: str) -> dict:
        try:
            with open(os.path.join(str(path), fname)) as fh:
                out = json.load(fh)
            return out if isinstance(out, dict) else {}
        except (OSError, ValueError):
            return {}

    name = read("training.json").get("name")
    if name in MODEL_NAMES:
        return name
    # a processor only the world defines (transformers' AutoProcessor cannot load it)
    cls = read("processor_config.json").get("processor_class")
    return next((k for k, spec in TOY_MODELS.items() if spec.processor_class.__module__.startswith("jsae.")
                 and spec.processor_class.__name__ == cls), None)


def model_name(adapter: VLMAdapter) -> str:
    """The model's hub id or path (its config's ``name_or_path``), or a shipped toy model's name (not its installed
    directory), or its class name: what a capture, an SAE and a provenance check record as the model."""
    from jsae.world.models import toy_name

    path = str(getattr(adapter.config, "name_or_path", "") or "")
    return toy_name(path) or path or type(adapter.hf_model).__name__


def load_vlm(name_or_path: str, *, dtype: Any = "auto", device_map: Any = None, device: Any = None, remote: bool = False,
             revision: str | None = None, **kwargs: Any) -> VLM:
    """Load ``name_or_path`` (a shipped toy model's name, a hub id or a local directory): returns
    ``VLM(model, processor, adapter)`` with ``model`` an ``nnsight.TransformersModel`` (``model.trace`` and
    ``model.generate`` are nnsight's own contexts).  Toy models load in float32 unless
    ``dtype`` says otherwise.

    ``dtype`` and ``device_map`` go to ``from_pretrained`` (``device_map="auto"`` spreads a large model over the
    GPUs); ``device`` moves the loaded model to one device (``"cuda"``, ``"cuda:1"``); ``remote=True`` builds the model on the meta
    device through ``nnsight.TransformersModel`` for NDIF (pass ``remote=True`` to your traces).
    Raises a one-line ``OSError`` when the model is neither local nor reachable (offline, not cached) and
    a ``ValueError`` when its architecture has no jsae adapter.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from jsae.guards import check_device

    check_device(device, "device")
    dtype = _resolve_dtype(dtype)
    from jsae.world.models import MODEL_NAMES, load_toy_hf

    if name_or_path in MODEL_NAMES and not os.path.isdir(name_or_path):
        hf, processor = load_toy_hf(name_or_path, dtype=torch.float32 if dtype in (None, "auto") else dtype,
                                    device=device or (device_map if isinstance(device_map, (str, torch.device)) else "cpu"))
        model = _envoy(hf, processor)
        return VLM(model, processor, for_model(model))
    toy = _toy_directory(name_or_path)
    if toy is not None:  # a toy model's directory (an older world, a retrained one): the world's own processor
        hf, processor = load_toy_hf(toy, dtype=torch.float32 if dtype in (None, "auto") else dtype,
                                    device=device or "cpu", directory=name_or_path)
        model = _envoy(hf, processor)
        return VLM(model, processor, for_model(model))
    common = dict(revision=revision, trust_remote_code=False)
    # a bare name (no ORG/, not a folder) is a typo of a toy name or a cached id: never ask the hub for it
    local_only = {"local_files_only": True} if "/" not in str(name_or_path) and not os.path.exists(str(name_or_path)) else {}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **common, **local_only)
    except (OSError, ValueError) as err:
        if os.path.isdir(name_or_path):
            raise OSError(f"cannot load {name_or_path!r}: the directory has no usable config.json ({err})") from None
        raise _not_found(name_or_path, err) from None
    archs = list(getattr(config, "architectures", None) or [])
    supported = supported_models()
    if archs and not any(a in supported for a in archs):
        raise ValueError(
            f"{name_or_path!r} is a {archs[0]}; jsae has adapters for {', '.join(supported)} "
            "(register your own with jsae.adapters.register_adapter)"
        )
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, **common)
    except (OSError, ValueError) as err:
        raise _not_found(name_or_path, err) from None
    if remote:
        from nnsight import TransformersModel

        model = TransformersModel(name_or_path, task="image-text-to-text", processor=processor, dispatch=False,
                                  revision=revision, trust_remote_code=False, **({"dtype": dtype} if dtype else {}), **kwargs)
    else:
        try:
            hf = AutoModelForImageTextToText.from_pretrained(name_or_path, config=config, dtype=dtype, device_map=device_map,
                                                             use_safetensors=True, **common, **kwargs)
        except OSError as err:
            raise _not_found(name_or_path, err) from None
        if device is not None and device_map is None:
            hf = hf.to(device)
        model = _envoy(hf.eval(), processor)
    if remote:
        mark_remote(model)
    adapter = for_model(model)
    return VLM(model, processor, adapter)
