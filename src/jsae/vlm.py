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


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_DEVICE_MAP_HELP = ("use auto, balanced, balanced_low_0 or sequential, one device (cpu, cuda:1), or a map of module names "
                    "to devices as JSON ('{\"model.visual\": 0, \"model.language_model\": 1, \"lm_head\": \"cpu\"}') or a .json "
                    "file holding one")


def _placement(value: Any, where: str) -> Any:
    """One entry of a device map: a GPU index, ``"cpu"``, ``"disk"``, ``"cuda:N"``, ``"mps"`` or a torch device."""
    from jsae.guards import check_device

    if isinstance(value, bool) or not isinstance(value, (int, str, torch.device)) or (isinstance(value, int) and value < 0):
        raise ValueError(f"{where} is {value!r}, not a device; give a GPU index (0, 1, ...), 'cuda:N', 'cpu' or 'disk'")
    if value == "disk":
        return value
    try:
        if isinstance(value, str):
            torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{where} is {value!r}, not a device; give a GPU index (0, 1, ...), 'cuda:N', 'cpu' or 'disk'") from None
    if str(value).startswith("meta"):
        raise ValueError(f"{where} is {value!r}, which holds no weights; give a GPU index (0, 1, ...), 'cuda:N', 'cpu' or "
                         "'disk' (load_vlm(..., remote=True) builds a model on the meta device for NDIF)")
    try:
        check_device(f"cuda:{value}" if isinstance(value, int) else value, where)
    except ValueError as exc:
        why = str(exc).split(";")[0].split(" but ")[-1]
        raise ValueError(f"{where} is {value!r} but {why}; give a GPU index of this machine (0, 1, ...), 'cpu' or 'disk'") from None
    return value


def resolve_device_map(device_map: Any, flag: str = "device_map") -> Any:
    """``device_map`` as ``from_pretrained`` takes it, checked: None, a strategy (:data:`DEVICE_MAP_STRATEGIES`), one
    device, or ``{module name: device}`` (a dict, its JSON text or a ``.json`` file holding it); each device a GPU
    index, ``"cuda:N"``, ``"cpu"`` or ``"disk"`` (offloaded, read back layer by layer).  A value that is none of these,
    or names a GPU this machine lacks, is refused with one line naming the fix."""
    import json
    from collections.abc import Mapping

    if device_map is None:
        return None
    if isinstance(device_map, (torch.device, int)) and not isinstance(device_map, bool):
        return _placement(device_map, flag)
    if isinstance(device_map, os.PathLike) or (isinstance(device_map, str) and device_map.strip().endswith(".json")):
        path = os.fspath(device_map).strip()
        try:
            with open(path) as fh:
                device_map = json.load(fh)
        except OSError as exc:
            raise ValueError(f"{flag} {path!r} cannot be read ({exc.strerror or exc}); {_DEVICE_MAP_HELP}") from None
        except ValueError as exc:
            raise ValueError(f"{flag} {path!r} is not JSON ({str(exc).splitlines()[0]}); {_DEVICE_MAP_HELP}") from None
    elif isinstance(device_map, str):
        text = device_map.strip()
        if text in DEVICE_MAP_STRATEGIES:
            return text
        if text.startswith("{"):
            try:
                device_map = json.loads(text)
            except ValueError as exc:
                raise ValueError(f"{flag} is not valid JSON ({str(exc).splitlines()[0]}); {_DEVICE_MAP_HELP}") from None
        else:
            try:
                torch.device(text)
            except (RuntimeError, TypeError):
                raise ValueError(f"{flag} {device_map!r} is not a strategy, a device or a map; {_DEVICE_MAP_HELP}") from None
            return _placement(text, flag)
    if not isinstance(device_map, Mapping) or not device_map:
        raise ValueError(f"{flag} {device_map!r} is not a strategy, a device or a map; {_DEVICE_MAP_HELP}")
    out = {}
    for name, value in device_map.items():
        if not isinstance(name, str):
            raise ValueError(f"{flag} has the key {name!r}; keys are module names such as 'model.visual' ('' for the whole model)")
        out[name] = _placement(value, f"{flag}[{name!r}]")
    return out


def check_device_map_modules(device_map: Any, model: Any, flag: str = "device_map") -> None:
    """A ``{module name: device}`` map names only modules of ``model`` (built on the meta device is enough) and
    places every parameter (a module or one of its parents is listed); one-line ``ValueError`` otherwise (transformers
    itself accepts a misspelt name and loads the model on one device)."""
    if not isinstance(device_map, dict):
        return
    modules = dict(model.named_modules())
    cls = type(model).__name__
    for name in device_map:
        if name not in modules:
            top = [n for n, _ in model.named_children()]
            raise ValueError(f"{flag} names {name!r}, which is not a module of {cls}; name modules such as {top} or "
                             "their children (e.g. 'model.language_model.layers.0')")

    def placed(pname: str) -> bool:
        parts = pname.split(".")
        return "" in device_map or any(".".join(parts[:i]) in device_map for i in range(1, len(parts)))

    missing = [n for n, _ in model.named_parameters() if not placed(n)]
    if missing:
        raise ValueError(f"{flag} places no device for {len(missing)} parameter(s) of {cls}, e.g. {missing[0]!r}; add "
                         "its module (or '' for everything not listed)")


def _meta_model(config: Any) -> Any:
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    with torch.device("meta"), no_init_weights():
        return AutoModelForImageTextToText.from_config(config)


def _offload_kwargs(device_map: Any, kwargs: dict[str, Any], owner_name: str) -> dict[str, Any]:
    """``max_memory`` parsed (``{0: "70GiB", "cpu": "8GiB"}`` or ``"0=70GiB,cpu=8GiB"``) and, with a device map
    and no ``offload_folder``, a temporary one (weights that fit on no device are written there, and it is removed
    with the model)."""
    out = dict(kwargs)
    if out.get("max_memory") is not None:
        out["max_memory"] = resolve_max_memory(out["max_memory"])
    if device_map is not None and out.get("offload_folder") is None:
        import tempfile

        out["offload_folder"] = tempfile.mkdtemp(prefix=f"jsae-offload-{owner_name.replace(os.sep, '_')[-40:]}-")
    return out


def resolve_max_memory(max_memory: Any, flag: str = "max_memory") -> dict[Any, int]:
    """``{device: bytes}`` from ``{0: "70GiB", "cpu": "8GiB", "disk": ...}`` or its text form ``"0=70GiB,cpu=8GiB"``
    (sizes with their unit, or ints of bytes); one-line ``ValueError`` otherwise."""
    from jsae.guards import parse_bytes

    if isinstance(max_memory, str):
        items = []
        for part in (p for p in max_memory.split(",") if p.strip()):
            key, sep, size = part.partition("=")
            if not sep:
                raise ValueError(f"{flag} {max_memory!r}: write DEVICE=SIZE pairs separated by commas, e.g. 0=70GiB,cpu=100GiB")
            key = key.strip()
            items.append((int(key) if key.isdigit() else key, size.strip()))
    elif isinstance(max_memory, dict):
        items = list(max_memory.items())
    else:
        raise ValueError(f"{flag} {max_memory!r}: give a dict of device to size or text such as 0=70GiB,cpu=100GiB")
    if not items:
        raise ValueError(f"{flag} is empty; give at least one DEVICE=SIZE, e.g. cpu=8GiB")
    out: dict[Any, int] = {}
    for key, size in items:
        if not (key in ("cpu", "disk", "mps") or (isinstance(key, int) and not isinstance(key, bool) and key >= 0)):
            raise ValueError(f"{flag}: {key!r} is not a device; use GPU indexes (0, 1, ...), cpu or disk")
        out[key] = parse_bytes(size, f"{flag}[{key!r}]")
    return out


def _remove_offload_folder(hf: Any, folder: str) -> None:
    import shutil
    import weakref

    if os.path.basename(folder).startswith("jsae-offload-"):
        weakref.finalize(hf, shutil.rmtree, folder, True)


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
    GPUs; any model, toy ones included): a strategy, one device, or ``{module: device}`` (a dict, JSON text or a
    ``.json`` file; :func:`resolve_device_map`), with ``max_memory`` (``{0: "70GiB", "cpu": "8GiB"}`` or
    ``"0=70GiB,cpu=8GiB"``) and ``offload_folder`` (default: a temporary folder removed with the model, for the
    weights that fit on no device: ``"disk"``); ``device`` moves the loaded model to one device (``"cuda"``, ``"cuda:1"``); ``remote=True`` builds the model on the meta
    device through ``nnsight.TransformersModel`` for NDIF (pass ``remote=True`` to your traces).
    Raises a one-line ``OSError`` when the model is neither local nor reachable (offline, not cached) and
    a ``ValueError`` when its architecture has no jsae adapter.
    """
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    from jsae.guards import check_device

    check_device(device, "device")
    dtype = _resolve_dtype(dtype)
    device_map = resolve_device_map(device_map)
    if device is not None and device_map is not None:
        raise ValueError(f"pass device={device!r} (the whole model on one device) or device_map={device_map!r} (spread "
                         "over devices), not both")
    if device_map is None and (kwargs.get("max_memory") is not None or kwargs.get("offload_folder") is not None):
        raise ValueError("max_memory and offload_folder place a model spread over devices; pass device_map='auto' "
                         "(or a map) with them")
    from jsae.world.models import MODEL_NAMES, load_toy_hf

    toy = name_or_path if name_or_path in MODEL_NAMES and not os.path.isdir(name_or_path) else _toy_directory(name_or_path)
    if toy is not None:  # a shipped toy model, or a toy model's directory (an older world, a retrained one)
        directory = None if toy == name_or_path else name_or_path
        placement: dict[str, Any] = {}
        if device_map is not None:
            from jsae.world.models import check_weights

            from transformers import AutoConfig

            check_device_map_modules(device_map, _meta_model(AutoConfig.from_pretrained(
                str(check_weights(toy, directory)), local_files_only=True)))
            placement = {"device_map": device_map, **_offload_kwargs(device_map, kwargs, toy)}
        hf, processor = load_toy_hf(toy, dtype=torch.float32 if dtype in (None, "auto") else dtype,
                                    device=device or "cpu", directory=directory, **placement)
        if placement:
            _remove_offload_folder(hf, placement["offload_folder"])
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
        if device_map is not None:
            check_device_map_modules(device_map, _meta_model(config))
            kwargs = _offload_kwargs(device_map, kwargs, str(name_or_path))
        try:
            hf = AutoModelForImageTextToText.from_pretrained(name_or_path, config=config, dtype=dtype, device_map=device_map,
                                                             use_safetensors=True, **common, **kwargs)
        except OSError as err:
            raise _not_found(name_or_path, err) from None
        if device_map is not None:
            _remove_offload_folder(hf, kwargs["offload_folder"])
        if device is not None and device_map is None:
            hf = hf.to(device)
        model = _envoy(hf.eval(), processor)
    if remote:
        mark_remote(model)
    adapter = for_model(model)
    return VLM(model, processor, adapter)
