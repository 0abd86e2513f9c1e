"""What a capture costs before it runs: ``jsae run capture --dry-run`` and :func:`estimate_capture`.

For a model (a hub id or local directory, a ``config.json``, a *spec* JSON holding ``config`` and the
published ``processor`` settings, a transformers config, or a loaded model) and a dataset (pairs, images, or
image sizes), :func:`estimate_capture` gives, without running the model:

* image tokens per image over the data (through the family's adapter and the processor's settings: LLaVA's
  fixed grid, LLaVA-NeXT's any-resolution tiles, Qwen3-VL's dynamic resolution) and text tokens per pair;
* bytes per pair per layer, shard count, disk, host memory (capture and read-back);
* the model's weights and the activation memory of one forward at the chosen batch size (formula below);
* the compute of one pair's forward up to the last captured layer, in FLOPs.

Formulas (``s`` = bytes per element of the model's dtype, ``B`` batch, ``S`` the padded sequence length of a
batch = max image tokens + max text tokens, ``d`` hidden size, ``q = heads·head_dim``, ``kv = kv_heads·
head_dim``, ``f`` the MLP width (MoE: ``k·moe_intermediate`` routed), ``L = max(layers) + 1`` decoder layers
run, the forward stops after the last captured layer)::

    stored bytes / pair / layer = 2 · d · itemsize(storage dtype)             (vision + text pooled vectors)
    disk                        = pairs · layers · that                       (+ a few KB of manifest)
    host memory, capture        = 2 · shard_size · layers · 2 · d · itemsize  (a shard pending + its concatenation)
    host memory, read-back      = pairs · 2 · d · 4 per layer                 (load_pairs reads float32)
    activations (peak)          = s·B·S·(3d + 2q + 2kv + 3f)                  (one layer's working set)
                                + s·B·S·2·kv·L                                (the KV cache the forward builds)
                                + 8·B·S·d                                     (float32 pooling of one layer)
                                + vision tower: s·tiles·T·(d_v·(n_v + 5) + 2·f_v)  (LLaVA keeps all hidden states)
    FLOPs / pair                = 2·P_layer·S·L + 4·S²·q·L + vision           (P_layer: active weights of a layer)

GPUs (``gpu_memory=`` / ``--gpu-memory 80GiB``): every GPU keeps ``activations + GPU_RESERVE`` (1 GiB: the CUDA
context and allocator slack) free, and accelerate's own placement (``infer_auto_device_map``, what
``--device-map auto`` runs; decoder layers and vision blocks are never split) packs the weights (in the model's dtype)
into the rest; the answer is the fewest GPUs whose map holds every weight (:func:`plan_gpus`).  Every weight counts,
also of the layers after the last captured one (the whole model is loaded).

The activation formula is an estimate; ``benchmarks/real_width.py`` compares it with measured peaks.
Also here: :func:`load_spec`, :func:`build_image_processor` / :func:`build_processor` (the real image
processors from the published settings, PIL backends, no torchvision) and :func:`instantiate` (a random
model at real width with fewer layers, for tests and measurements).
"""

from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from jsae.adapters import VLMAdapter, adapter_class, unwrap

SPEC_KEYS = ("config", "processor")
MEASURE_SAMPLE = 256  # images whose sizes are read to get the token distribution


# ================================================================================================
# Model specs: config + processor settings
# ================================================================================================


@dataclass
class ModelSpec:
    """A model's ``config`` (a transformers config) and its published processor settings (``processor``:
    ``processor_class``, ``image_processor`` = preprocessor_config.json, ``patch_size``, ``chat_template``...;
    None when unknown: the family's defaults are used), and what else the spec file holds (``raw``)."""

    name: str
    config: Any
    processor: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        archs = list(getattr(self.config, "architectures", None) or [])
        if archs:
            return str(archs[0])
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(self.config.model_type)
        if name is None:
            raise ValueError(f"{self.name}: config of model_type {self.config.model_type!r} names no architecture; "
                             "add 'architectures' to its config")
        return str(name)

    @property
    def adapter_class(self) -> type[VLMAdapter]:
        return adapter_class(self.architecture)

    @property
    def image_processor_settings(self) -> dict[str, Any]:
        return dict((self.processor or {}).get("image_processor") or {})


def _config_from_dict(d: Mapping[str, Any]) -> Any:
    from transformers import AutoConfig

    d = {k: v for k, v in d.items() if not k.startswith("_")}
    if "model_type" not in d:
        raise ValueError("the config has no 'model_type'; pass the model's config.json")
    return AutoConfig.for_model(**d)


def load_spec(source: Any) -> ModelSpec:
    """A :class:`ModelSpec` from ``source``: a spec JSON file (keys ``config`` and ``processor``, as in
    ``tests/data/real_configs``), a ``config.json`` file, a local model directory (``config.json`` and, when
    present, ``preprocessor_config.json`` / ``processor_config.json``), a hub id (config and processor
    settings through transformers; needs the hub or its cache), a dict, a transformers config, a model or a
    ``jsae.load_vlm`` result."""
    if isinstance(source, ModelSpec):
        return source
    if hasattr(source, "adapter") and hasattr(source, "processor") and not isinstance(source, (str, os.PathLike)):
        source = source.adapter.hf_model  # a VLM triple
    if hasattr(source, "to_dict") and hasattr(source, "model_type"):
        return ModelSpec(str(getattr(source, "name_or_path", "") or source.model_type), source)
    if not isinstance(source, (str, os.PathLike, Mapping)):
        try:
            module = unwrap(source)
        except TypeError:
            raise TypeError(f"cannot read a model config from {type(source).__name__}; pass a hub id, a path, a config "
                            "or a model") from None
        cfg = module.config
        return ModelSpec(str(getattr(cfg, "name_or_path", "") or type(module).__name__), cfg)
    if isinstance(source, Mapping):
        raw = dict(source)
        if "config" in raw:
            return ModelSpec(str(raw.get("model_id", raw["config"].get("model_type"))), _config_from_dict(raw["config"]),
                             raw.get("processor"), raw)
        return ModelSpec(str(raw.get("_name_or_path", raw.get("model_type"))), _config_from_dict(raw))
    path = Path(source)
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a JSON config ({err.__class__.__name__}); pass a config.json or a spec JSON") from None
        spec = load_spec(raw)
        spec.name = str(raw.get("model_id") or path.stem) if "config" in raw else path.parent.name or path.stem
        return spec
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; pass a model directory, a config.json or a hub id")
        cfg = json.loads((path / "config.json").read_text())
        processor: dict[str, Any] = {}
        if (path / "processor_config.json").is_file():
            processor.update(json.loads((path / "processor_config.json").read_text()))
        if (path / "preprocessor_config.json").is_file():
            processor["image_processor"] = json.loads((path / "preprocessor_config.json").read_text())
        return ModelSpec(path.name, _config_from_dict(cfg), processor or None)
    return _hub_spec(str(source))


def _hub_spec(name: str) -> ModelSpec:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise OSError(f"cannot read the config of {name!r}: not a file, not a directory, and the hub or its cache could "
                      f"not provide it ({type(err).__name__}); pass a config.json or a spec JSON instead") from None
    processor: dict[str, Any] | None = None
    try:
        from transformers.image_processing_base import ImageProcessingMixin

        settings, _ = ImageProcessingMixin.get_image_processor_dict(name)
        processor = {"image_processor": settings}
    except (OSError, ValueError):
        processor = None
    return ModelSpec(name, config, processor)


# ================================================================================================
# Processors from the published settings (PIL backends: no torchvision)
# ================================================================================================

_DROP = ("image_processor_type", "processor_class", "aspect_ratio_setting", "_processor_class")


def build_image_processor(spec: Any) -> Any:
    """The family's image processor with the spec's published settings, on the PIL backend
    (``CLIPImageProcessorPil``, ``LlavaNextImageProcessorPil``, ``Qwen2VLImageProcessorPil``): the adapter's
    :meth:`~jsae.adapters.VLMAdapter.build_image_processor`."""
    spec = load_spec(spec)
    settings = {k: v for k, v in spec.image_processor_settings.items() if k not in _DROP}
    return spec.adapter_class.build_image_processor(spec.config, settings)


def build_processor(spec: Any, tokenizer: Any, image_processor: Any = None, chat_template: str | None = "spec") -> Any:
    """The family's processor over ``tokenizer`` with the spec's image processor (or ``image_processor``) and
    chat template (``chat_template="spec"``; None for the plain layout): the adapter's
    :meth:`~jsae.adapters.VLMAdapter.build_processor` (Qwen3-VL gets ``Qwen3VLProcessor`` without its video
    processor, which needs torchvision)."""
    spec = load_spec(spec)
    p = spec.processor or {}
    ip = image_processor if image_processor is not None else build_image_processor(spec)
    template = p.get("chat_template") if chat_template == "spec" else chat_template
    return spec.adapter_class.build_processor(spec.config, tokenizer, ip, p, template)


# ================================================================================================
# Models: on the meta device, or random at real width with fewer layers
# ================================================================================================


def _model_class(spec: ModelSpec) -> Any:
    import transformers as T

    cls = getattr(T, spec.architecture, None)
    if cls is None:
        raise ValueError(f"transformers has no class {spec.architecture}")
    return cls


def meta_model(spec: Any) -> Any:
    """The spec's model built on the meta device (no memory, no weights): for structure and counting."""
    from transformers.initialization import no_init_weights

    spec = load_spec(spec)
    with torch.device("meta"), no_init_weights():
        model = _model_class(spec)(spec.config)
    model.tie_weights()  # tied embeddings count once
    return model


def truncated_config(spec: Any, n_layers: int = 2, vision_layers: int | None = None) -> Any:
    """A copy of the spec's config with ``n_layers`` decoder layers (and ``vision_layers`` vision layers when
    given; Qwen's DeepStack indexes and LLaVA's ``vision_feature_layer`` are kept valid)."""
    import copy

    spec = load_spec(spec)
    cfg = copy.deepcopy(spec.config)
    if n_layers < 1:
        raise ValueError(f"n_layers must be at least 1, got {n_layers}")
    cfg.text_config.num_hidden_layers = n_layers
    if getattr(cfg.text_config, "layer_types", None):
        cfg.text_config.layer_types = cfg.text_config.layer_types[:n_layers]
    if vision_layers is not None:
        spec.adapter_class.truncate_vision(cfg, vision_layers)
    return cfg


def instantiate(spec: Any, n_layers: int = 2, *, vision_layers: int | None = None, dtype: torch.dtype = torch.bfloat16,
                seed: int = 0, std: float = 0.02) -> Any:
    """A random-weight model of the spec at its real widths, heads, experts and vocabulary with ``n_layers``
    decoder layers (and ``vision_layers`` vision layers when given), in ``dtype`` on the CPU, eval mode.

    Built without transformers' initialisation, which at this size takes longer than the tests: norm weights
    are 1, biases 0, and every other weight is a window of one seeded N(0, std²) sequence of prime length
    (:data:`RANDOM_PERIOD`), each tensor from its own random offset: rows differ from each other (the period is
    prime, so no row repeats another), though they are not independent draws.  A 2-layer bf16 build of a
    7B-width model then takes about a second, with no float32 copy of any weight."""
    from transformers.initialization import no_init_weights

    spec = load_spec(spec)
    cfg = truncated_config(spec, n_layers, vision_layers)
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = _model_class(spec)(cfg)
    finally:
        torch.set_default_dtype(before)
    model.tie_weights()  # tied embeddings (Qwen3-VL-4B) share one tensor, as in the checkpoint
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(RANDOM_PERIOD, generator=g) * std).to(dtype)
    with torch.no_grad():
        for mname, module in model.named_modules():
            for pname, p in module.named_parameters(recurse=False):
                norm = "norm" in mname.split(".")[-1].lower() or "norm" in pname or type(module).__name__.endswith("Norm")
                if norm or "layernorm" in mname.lower():
                    p.fill_(1.0 if pname == "weight" else 0.0)
                elif pname == "bias":
                    p.zero_()
                else:
                    _fill_(p, base, int(torch.randint(RANDOM_PERIOD, (), generator=g)))
    return model.eval()


RANDOM_PERIOD = 8_388_593  # a prime (2**23 - 15): the length of the random sequence weights are windows of


def _fill_(p: torch.Tensor, base: torch.Tensor, start: int) -> None:
    """``p`` <- ``base`` read cyclically from ``start``."""
    flat, n, pos = p.view(-1), p.numel(), 0
    while pos < n:
        k = min(n - pos, base.numel() - start)
        flat[pos:pos + k] = base[start:start + k].to(p.dtype)
        pos, start = pos + k, 0


# ================================================================================================
# The estimate
# ================================================================================================


def _itemsize(dtype: Any) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown floating dtype {dtype!r}; use float32, bfloat16 or float16")
    return torch.empty((), dtype=dtype).element_size()


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _flops(n: float) -> str:
    return f"{n / 1e12:.2f} TFLOP" if n >= 1e11 else f"{n / 1e9:.2f} GFLOP"


@dataclass(frozen=True)
class CaptureEstimate:
    """Figures of a capture (see the module docstring for every formula); ``str()`` prints a table."""

    model: str
    architecture: str
    n_model_layers: int
    d_in: int
    layers: tuple[int, ...]
    n_pairs: int
    batch_size: int
    shard_size: int
    storage_dtype: str
    model_dtype: str
    image_tokens: tuple[int, ...]  # per sampled image
    text_tokens: tuple[int, ...]  # per sampled pair (prompt template + caption)
    text_tokens_exact: bool
    bytes_per_pair_per_layer: int
    n_shards: int
    disk_bytes: int
    host_capture_bytes: int
    host_readback_bytes_per_layer: int
    weight_bytes: int
    activation_bytes: int
    batch_seq_len: int
    flops_per_pair: float
    gpus: "GpuPlan | None" = None  # with gpu_memory=: how many GPUs of that memory the model needs

    @property
    def tokens_summary(self) -> dict[str, float]:
        t = sorted(self.image_tokens)
        return {"min": t[0], "median": statistics.median(t), "mean": statistics.fmean(t),
                "p95": t[min(len(t) - 1, math.ceil(0.95 * len(t)) - 1)], "max": t[-1]}

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("image_tokens", "text_tokens", "gpus")}
        if self.gpus is not None:
            d["gpus"] = self.gpus.as_dict()
        d["layers"] = list(self.layers)
        d["image_tokens_per_image"] = self.tokens_summary
        d["image_tokens_sampled"] = len(self.image_tokens)
        d["text_tokens_per_pair"] = {"min": min(self.text_tokens), "max": max(self.text_tokens),
                                     "mean": statistics.fmean(self.text_tokens)}
        return d

    def __str__(self) -> str:
        s = self.tokens_summary
        rows = [
            ("model", f"{self.model} ({self.architecture}, {self.n_model_layers} layers, d_in {self.d_in}, {self.model_dtype})"),
            ("pairs × layers", f"{self.n_pairs:,} × {list(self.layers)}, batch {self.batch_size}, shard {self.shard_size}"),
            ("image tokens / image", f"min {s['min']}, median {s['median']:g}, mean {s['mean']:.0f}, p95 {s['p95']}, max {s['max']} "
                                     f"(over {len(self.image_tokens)} sampled images)"),
            ("text tokens / pair", f"{min(self.text_tokens)}..{max(self.text_tokens)}"
                                   + ("" if self.text_tokens_exact else " (estimated: 1.5 per word + 20; pass a processor for exact)")),
            ("bytes / pair / layer", f"{self.bytes_per_pair_per_layer:,} ({self.storage_dtype}, vision + text)"),
            ("shards", f"{self.n_shards:,}"),
            ("disk", _gb(self.disk_bytes)),
            ("host memory", f"capture {_gb(self.host_capture_bytes)}; reading one layer back {_gb(self.host_readback_bytes_per_layer)}"),
            ("model weights", _gb(self.weight_bytes)),
            ("forward activations", f"{_gb(self.activation_bytes)} at batch {self.batch_size} × {self.batch_seq_len} tokens "
                                    f"(estimate, forward stops after layer {max(self.layers)})"),
            ("compute / pair", f"{_flops(self.flops_per_pair)} up to layer {max(self.layers)} (vision tower included)"),
        ]
        if self.gpus is not None:
            rows.append((f"GPUs of {_gib(self.gpus.gpu_memory)}", str(self.gpus)))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _image_sizes(data: Any, sample: int) -> tuple[list[tuple[int, int]], int]:
    """(height, width) of up to ``sample`` evenly spread items of ``data`` and the data's length."""
    if hasattr(data, "pairs") and hasattr(data, "fingerprint") and not hasattr(data, "__len__"):
        raise TypeError("pass the pairs of a data source (source.pairs(part)), not the source")
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise TypeError(f"data must be a sequence of (image, caption) pairs, images or (height, width) sizes, "
                        f"got {type(data).__name__}")
    n = len(data)
    if n == 0:
        raise ValueError("data is empty; give at least one image")
    idx = sorted({int(i * n / min(n, sample)) for i in range(min(n, sample))})
    sizes = []
    for i in idx:
        item = data[i]
        sizes.append(_size_of(item[0] if isinstance(item, tuple) and len(item) == 2 and not isinstance(item[0], int) else item))
    return sizes, n


def _size_of(image: Any) -> tuple[int, int]:
    if isinstance(image, (tuple, list)) and len(image) == 2 and all(isinstance(x, int) for x in image):
        return int(image[0]), int(image[1])
    if hasattr(image, "size") and hasattr(image, "mode"):  # PIL: (width, height)
        return int(image.size[1]), int(image.size[0])
    shape = getattr(image, "shape", None)
    if shape is not None and len(shape) >= 2:  # numpy / tensor HWC
        return int(shape[0]), int(shape[1])
    raise TypeError(f"cannot read the size of a {type(image).__name__}; give PIL images, HWC arrays or (height, width) pairs")


def _captions(data: Any, sizes_idx: list[int]) -> list[str] | None:
    out = []
    for i in sizes_idx:
        item = data[i]
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], str):
            out.append(item[1])
        else:
            return None
    return out


def estimate_capture(model: Any, data: Any, layers: int | Sequence[int], *, batch_size: int = 8,
                     n_pairs: int | None = None, shard_size: int = 1024, dtype: Any = torch.float32,
                     model_dtype: Any = torch.bfloat16, processor: Any = None, sample: int = MEASURE_SAMPLE,
                     caption: str = "A photograph of a person riding a horse on a beach.",
                     gpu_memory: int | str | None = None) -> CaptureEstimate:
    """The cost of ``capture_pairs(model, data, layers=layers, batch_size=..., shard_size=..., dtype=dtype)``
    (see the module docstring).  ``model``: anything :func:`load_spec` takes; ``data``: a sequence of (image,
    caption) pairs, images or (height, width) sizes (``sample`` of them, evenly spread, are measured);
    ``n_pairs`` scales the figures to a larger dataset of the same kind (default ``len(data)``).  With a
    ``processor`` (with tokenizer and chat template) text tokens are counted exactly, else estimated.
    ``gpu_memory`` (bytes, or a size such as ``"80GiB"``) adds how many GPUs of that memory the model needs
    (:func:`plan_gpus`, with this estimate's activations kept free on each)."""
    spec = load_spec(model)
    if gpu_memory is not None:
        from jsae.guards import parse_bytes

        gpu_memory = parse_bytes(gpu_memory, "gpu_memory")
    layer_list = [layers] if isinstance(layers, int) else list(layers)
    if not layer_list or any(isinstance(L, bool) or not isinstance(L, int) for L in layer_list):
        raise ValueError(f"layers must be decoder-layer indices, e.g. [8, 16, 24], got {layers!r}")
    if batch_size <= 0 or shard_size <= 0:
        raise ValueError(f"batch_size and shard_size must be positive, got {batch_size} and {shard_size}")
    if sample <= 0:
        raise ValueError(f"sample must be positive, got {sample}")
    store, act = _itemsize(dtype), _itemsize(model_dtype)
    meta = meta_model(spec)
    adapter = spec.adapter_class(meta)
    layer_list = sorted({adapter.check_layer(L) for L in layer_list})
    ip = getattr(processor, "image_processor", None) or (build_image_processor(spec) if spec.processor else None)
    sizes, n_data = _image_sizes(data, sample)
    n_pairs = n_data if n_pairs is None else int(n_pairs)
    if n_pairs <= 0:
        raise ValueError(f"n_pairs must be positive, got {n_pairs}")
    tokens = [adapter.num_image_tokens(h, w, ip) for h, w in sizes]
    idx = sorted({int(i * n_data / min(n_data, sample)) for i in range(min(n_data, sample))})
    caps = _captions(data, idx) or [caption]
    tok = getattr(processor, "tokenizer", None)
    if tok is not None:
        exact = True
        # the rendered prompt holds one image placeholder token; the image tokens are counted above
        text = [len(tok(adapter.render_prompt(processor, c)).input_ids) - 1 for c in caps]
    else:
        exact = False
        text = [int(1.5 * len(c.split())) + 20 for c in caps]
    d = adapter.d_in
    n_layers = len(layer_list)
    per_pair_layer = 2 * d * store
    n_shards = -(-n_pairs // (-(-shard_size // batch_size) * batch_size))
    seq = max(tokens) + max(text)
    weights = sum(p.numel() for p in meta.parameters()) * act
    activation, flops = _forward_cost(spec.config, adapter, batch_size, seq, max(layer_list) + 1, act,
                                      statistics.fmean(tokens) + statistics.fmean(text), sizes, ip)
    return CaptureEstimate(
        model=spec.name, architecture=spec.architecture, n_model_layers=adapter.n_layers, d_in=d, layers=tuple(layer_list),
        n_pairs=n_pairs, batch_size=batch_size, shard_size=shard_size, storage_dtype=str(dtype).removeprefix("torch."),
        model_dtype=str(model_dtype).removeprefix("torch."), image_tokens=tuple(tokens), text_tokens=tuple(text),
        text_tokens_exact=exact, bytes_per_pair_per_layer=per_pair_layer, n_shards=n_shards,
        disk_bytes=n_pairs * n_layers * per_pair_layer,
        host_capture_bytes=2 * min(n_pairs, shard_size) * n_layers * per_pair_layer,
        host_readback_bytes_per_layer=n_pairs * 2 * d * 4, weight_bytes=weights, activation_bytes=activation,
        batch_seq_len=seq, flops_per_pair=flops,
        gpus=None if gpu_memory is None else _plan_gpus(meta, gpu_memory, model_dtype, activation))


def _text_dims(t: Any) -> tuple[int, int, int, int, int]:
    """(d, q, kv, f_active, active weights per layer) of a text config."""
    d = int(t.hidden_size)
    heads = int(t.num_attention_heads)
    hd = int(getattr(t, "head_dim", None) or d // heads)
    kvh = int(getattr(t, "num_key_value_heads", None) or heads)
    q, kv = heads * hd, kvh * hd
    if getattr(t, "num_experts", None):
        f = int(t.num_experts_per_tok) * int(t.moe_intermediate_size)
        router = d * int(t.num_experts)
    else:
        f, router = int(t.intermediate_size), 0
    return d, q, kv, f, 2 * d * q + 2 * d * kv + 3 * d * f + router


def _forward_cost(cfg: Any, adapter: VLMAdapter, batch: int, seq: int, layers_run: int, act: int, mean_seq: float,
                  sizes: list[tuple[int, int]], ip: Any) -> tuple[int, float]:
    d, q, kv, f, p_layer = _text_dims(cfg.text_config)
    B, S = batch, seq
    layer = act * B * S * (3 * d + 2 * q + 2 * kv + 3 * f)
    cache = act * B * S * 2 * kv * layers_run
    pooling = 8 * B * S * d
    embeds = 2 * act * B * S * d
    vis_bytes, vis_flops = type(adapter).vision_cost(cfg, sizes, ip, act)
    activation = layer + cache + pooling + embeds + batch * vis_bytes
    flops = layers_run * (2 * p_layer * mean_seq + 4 * mean_seq * mean_seq * q) + vis_flops
    return int(activation), float(flops)


# ================================================================================================
# How many GPUs
# ================================================================================================

GPU_RESERVE = 2**30  # kept free on every GPU besides the activations: the CUDA context and the allocator's slack
MAX_GPUS = 64


def _gib(n: float) -> str:
    return f"{n / 2**30:.3g} GiB"


@dataclass(frozen=True)
class GpuPlan:
    """How many GPUs of ``gpu_memory`` bytes a model needs (:func:`plan_gpus`): ``n_gpus`` (None when it fits on
    none: ``reason`` says why), the weights each GPU holds, what each keeps free (``reserve_bytes``: activations +
    :data:`GPU_RESERVE`) and accelerate's ``device_map`` (module → GPU index) that fits."""

    gpu_memory: int
    n_gpus: int | None
    weight_bytes: tuple[int, ...]
    reserve_bytes: int
    device_map: dict[str, int]
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"gpu_memory": self.gpu_memory, "n_gpus": self.n_gpus, "weight_bytes": list(self.weight_bytes),
                "reserve_bytes": self.reserve_bytes, "reason": self.reason}

    def __str__(self) -> str:
        if self.n_gpus is None:
            return f"none: {self.reason}"
        keep = f"{_gib(self.reserve_bytes)} kept free on each for activations and the CUDA context"
        if self.n_gpus == 1:
            return (f"1 (weights {_gib(self.weight_bytes[0])}, {keep}); under torchrun every rank holds the whole model "
                    "on its own GPU")
        split = " + ".join(_gib(w) for w in self.weight_bytes)
        return (f"{self.n_gpus} with --device-map auto (weights {split}; {keep}); the model fits no single GPU, so run one "
                "process with --device-map auto, not torchrun")


def plan_gpus(model: Any, gpu_memory: int | str, *, model_dtype: Any = torch.bfloat16, activation_bytes: int = 0,
              reserve_bytes: int = GPU_RESERVE) -> GpuPlan:
    """The fewest GPUs of ``gpu_memory`` (bytes or a size such as ``"80GiB"``) that hold ``model`` (anything
    :func:`load_spec` takes; built on the meta device: no weights are read) in ``model_dtype``, each keeping
    ``activation_bytes`` + ``reserve_bytes`` (default :data:`GPU_RESERVE`) free, as accelerate places it (``infer_auto_device_map``: what
    ``device_map="auto"`` runs).  :func:`estimate_capture` with ``gpu_memory=`` calls it with its activation estimate."""
    from jsae.guards import parse_bytes

    _itemsize(model_dtype)
    return _plan_gpus(meta_model(load_spec(model)), parse_bytes(gpu_memory, "gpu_memory"), model_dtype, int(activation_bytes),
                      int(reserve_bytes))


def _plan_gpus(meta: Any, gpu_memory: int, model_dtype: Any, activation_bytes: int,
               reserve_bytes: int = GPU_RESERVE) -> GpuPlan:
    import logging
    import warnings

    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    if isinstance(model_dtype, str):
        model_dtype = getattr(torch, model_dtype.removeprefix("torch."))
    reserve = int(activation_bytes) + reserve_bytes
    budget = gpu_memory - reserve
    sizes = compute_module_sizes(meta, dtype=model_dtype)
    if budget <= 0:
        return GpuPlan(gpu_memory, None, (), reserve, {}, f"one forward needs about {_gib(activation_bytes)} of activations "
                       f"(estimate) + {_gib(reserve_bytes)} for the CUDA context, more than a {_gib(gpu_memory)} GPU; lower "
                       "--batch-size")
    no_split = list(getattr(meta, "_no_split_modules", None) or [])
    quiet = logging.getLogger("accelerate")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # "device 0 is not available" (planning for GPUs this machine lacks), "not tied"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for n in range(max(1, math.ceil(sizes[""] / budget)), MAX_GPUS + 1):
                dm = infer_auto_device_map(meta, max_memory={i: budget for i in range(n)}, no_split_module_classes=no_split,
                                           dtype=model_dtype)
                if all(isinstance(d, int) for d in dm.values()):
                    per = [sum(sizes[name] for name, d in dm.items() if d == i) for i in range(n)]
                    return GpuPlan(gpu_memory, len([w for w in per if w]), tuple(w for w in per if w), reserve, dict(dm))
    finally:
        quiet.setLevel(level)
    largest = max((sizes[name] for name, m in meta.named_modules() if type(m).__name__ in no_split), default=0)
    why = (f"a block that cannot be split holds {_gib(largest)}, more than the {_gib(budget)} a GPU has left after "
           f"{_gib(reserve)} for activations and the CUDA context" if largest > budget else
           f"the weights ({_gib(sizes[''])}) need more than {MAX_GPUS} such GPUs")
    return GpuPlan(gpu_memory, None, (), reserve, {}, why + "; use GPUs with more memory or lower --batch-size")


__all__ = ["CaptureEstimate", "GpuPlan", "ModelSpec", "build_image_processor", "build_processor", "estimate_capture", "instantiate",
           "load_spec", "meta_model", "plan_gpus", "truncated_config"]
