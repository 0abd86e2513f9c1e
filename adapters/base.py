"""The adapter protocol: everything jsae needs to know about one VLM family, and the registry.

An adapter wraps one model (an nnsight envoy such as ``nnsight.NNsight(hf_model)`` /
``nnsight.TransformersModel``, or a bare ``transformers`` model) and answers, from the model's config
and a batch of inputs only:

* structure: :attr:`~VLMAdapter.layers` (decoder-layer envoys), :attr:`~VLMAdapter.n_layers`,
  :attr:`~VLMAdapter.d_in` (hidden size), :attr:`~VLMAdapter.vision_tower`, :attr:`~VLMAdapter.projector`;
* vision features: :meth:`~VLMAdapter.patch_features` (the vision tower's output, one vector per image
  token of each image, ``[n_images, n_patches, d_vision]``) and :attr:`~VLMAdapter.d_vision`;
* positions: :meth:`~VLMAdapter.image_token_mask`, :meth:`~VLMAdapter.caption_token_mask` and
  :meth:`~VLMAdapter.patch_grid` (``[B, S, 4]``: image index, region, row, column of every image token);
* inputs: :meth:`~VLMAdapter.build_inputs` turns (images, captions) into model inputs through the
  model's processor and chat template, :meth:`~VLMAdapter.check_inputs` rejects inconsistent ones with a
  one-line error, :meth:`~VLMAdapter.model_kwargs` gives the tensors the forward takes.

Layer ``L`` always means the output of decoder layer ``L`` of the language model (the residual stream
after the block, SAELens's ``blocks.L.hook_resid_post``); in transformers 5 that output is a bare
``[B, S, d_in]`` tensor.  Note that ``output_hidden_states[L + 1]`` equals it for every layer but the
last, where transformers reports the final-norm output instead.

Registering a new family: subclass :class:`VLMAdapter`, set ``model_classes`` to the class names it
handles, and either call :func:`register_adapter` or expose the class in your package's
``pyproject.toml`` (:func:`adapter_class` finds the class for a model class without a model instance)::

    [project.entry-points."jsae.adapters"]
    my_vlm = "my_package.adapters:MyVLMAdapter"
"""

from __future__ import annotations

import abc
import functools
import re
import weakref
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Mapping, Sequence

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from jsae.guards import typechecked
from jsae.hf import padding_side, tokenizer_of, unwrap  # noqa: F401  (re-exported: jsae.adapters.padding_side, unwrap)

ENTRY_POINT_GROUP = "jsae.adapters"

# Keys jsae adds to an encoding that the model's forward does not take.
EXTRA_KEYS: tuple[str, ...] = ("caption_mask",)

# patch_grid columns
GRID_IMAGE, GRID_REGION, GRID_ROW, GRID_COL = range(4)


# The output of decoder layer L under the names the ecosystem uses for it: TransformerLens's
# HookedTransformer / SAELens (``blocks.L.hook_resid_post``), TransformerLens's TransformerBridge
# (``blocks.L.hook_out``), a bare language model (``model.layers.L``), a VLM (``model.language_model.layers.L``),
# GPT-2 style (``h.L``).  The first two are TransformerLens names, the others module paths.
TL_HOOK_PATTERN = r"^blocks\.(\d+)\.hook_(?:resid_post|out)$"
HOOK_PATTERNS: tuple[str, ...] = (TL_HOOK_PATTERN, r"(?:^|\.)layers\.(\d+)$", r"(?:^|\.)h\.(\d+)$")


def layer_of_hook(hook_name: str | None) -> int | None:
    """The decoder-layer index a residual-stream hook name refers to, or None (see :data:`HOOK_PATTERNS`)."""
    if not hook_name:
        return None
    for pat in HOOK_PATTERNS:
        m = re.search(pat, hook_name)
        if m:
            return int(m.group(1))
    return None


def sae_layer(sae: Any) -> int:
    """The decoder layer an SAE reads: ``cfg.metadata.layer``, else parsed from ``cfg.metadata.hook_name``."""
    meta = sae.cfg.metadata
    layer = meta.get("layer") if hasattr(meta, "get") else getattr(meta, "layer", None)
    if layer is None:
        layer = layer_of_hook(meta.get("hook_name") if hasattr(meta, "get") else getattr(meta, "hook_name", None))
    if layer is None:
        raise ValueError("the SAE's cfg.json names no layer (metadata.layer / hook_name); re-save it with its metadata")
    return int(layer)


def saelens_hook_name(layer: int) -> str:
    """HookedTransformer's name of decoder layer ``layer``'s output (what SAEBench and Gemma Scope use)."""
    return f"blocks.{int(layer)}.hook_resid_post"


def bridge_hook_name(layer: int) -> str:
    """TransformerBridge's (canonical) name of decoder layer ``layer``'s output; ``blocks.L.hook_resid_post`` is
    only an alias there, which ``SAETransformerBridge.add_sae`` resolves but the bridge's ``run_with_hooks`` (and
    so SAELens's evals) does not."""
    return f"blocks.{int(layer)}.hook_out"


def is_tl_hook_name(hook_name: Any) -> bool:
    """Whether ``hook_name`` is a TransformerLens name of a decoder layer's output (``blocks.L.hook_out`` /
    ``blocks.L.hook_resid_post``) rather than a module path."""
    return isinstance(hook_name, str) and re.search(TL_HOOK_PATTERN, hook_name) is not None


def hook_names(layer: int, hf_hook_name: str | None = None) -> dict[str, str | None]:
    """Decoder layer ``layer``'s output under every naming: ``"hf"`` (the module path nnsight and forward hooks
    use, when known), ``"bridge"`` (``blocks.L.hook_out``) and ``"hooked_transformer"`` (``blocks.L.hook_resid_post``)."""
    return {"hf": hf_hook_name, "bridge": bridge_hook_name(layer), "hooked_transformer": saelens_hook_name(layer)}


@dataclass(frozen=True)
class ImageTokens:
    """Where the tokens of one image sit: ``grid`` is ``[n_tokens, 3]`` (region, row, col), row/col -1 for
    tokens that are not a patch (a CLS token, a LLaVA-NeXT row-newline)."""

    grid: Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.grid.shape[0])



def last_positions(mask: Tensor) -> Tensor:
    """``[B]``: the index of the last True position of each row of ``mask [B, S]`` (-1 for a row with none)."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask, idx, -1).amax(1)


def last_position_mask(mask: Tensor) -> Tensor:
    """``[B, S]`` bool: True at the last True position of each row of ``mask`` (a row with none: all False)."""
    idx = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return idx == last_positions(mask).unsqueeze(1)


class VLMAdapter(abc.ABC):
    """Base class of the model-family adapters (see the module docstring for the protocol)."""

    #: transformers class names this adapter handles
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: what the plain (no chat template) prompt layout looks like, for the docs and error messages
    plain_layout: ClassVar[str] = ""
    #: the placeholder string of one image token in a prompt
    image_token: ClassVar[str] = "<image>"
    #: what one image is in the plain prompt when that is not just the processor's image token (e.g. with
    #: vision start/end markers); None: ``processor.image_token``, else :attr:`image_token`
    plain_image: ClassVar[str | None] = None

    def __init__(self, model: Any):
        self.model = model
        self.hf_model = unwrap(model)
        self.config = self.hf_model.config
        if not any(k.__name__ in self.model_classes for k in type(self.hf_model).__mro__):
            raise TypeError(
                f"{type(self).__name__} handles {list(self.model_classes)}, not {type(self.hf_model).__name__}; "
                "use jsae.adapters.for_model(model) to pick the right adapter"
            )

    @property
    def remote(self) -> bool:
        """True for models loaded with ``jsae.load_vlm(..., remote=True)``: traces go to NDIF
        (``model.trace(..., remote=True)``) and jsae's local hooks cannot run."""
        return self.hf_model in _REMOTE

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.hf_model).__name__}, n_layers={self.n_layers}, d_in={self.d_in})"

    # ---- structure ----------------------------------------------------------------------------
    @property
    def text_config(self) -> Any:
        return self.config.text_config

    @property
    def d_in(self) -> int:
        """Hidden size of the language model (the ``d_in`` of an SAE on its residual stream)."""
        return int(self.text_config.hidden_size)

    @property
    def n_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def language_model(self) -> Any:
        """The decoder stack (envoy when the model is nnsight-wrapped)."""
        return self.model.model.language_model

    @property
    def layers(self) -> Any:
        """Decoder layers, as envoys when the model is wrapped in nnsight (``layers[L].output``)."""
        return self.language_model.layers

    def layer_module(self, layer: int) -> nn.Module:
        """The ``torch.nn.Module`` of decoder layer ``layer`` (for plain forward hooks)."""
        self.check_layer(layer)
        return self.hf_model.model.language_model.layers[layer]

    def hook_name(self, layer: int) -> str:
        """Module path of decoder layer ``layer`` (the ``hf_hook_name`` of SAEs trained on it; their ``hook_name``
        is the TransformerBridge name :func:`bridge_hook_name`)."""
        return f"model.language_model.layers.{layer}"

    def sae_metadata(self, layer: int, processor: Any = None) -> dict[str, Any]:
        """What an SAE trained at decoder layer ``layer`` of this model records about its site (SAELens
        ``cfg.metadata``): ``hook_name`` (TransformerBridge's ``blocks.L.hook_out``, which SAELens's
        ``SAETransformerBridge`` and evals use), ``hf_hook_name`` (the module path), ``layer``, ``model_class``
        and, given the processor, ``prepend_bos`` (whether its tokenizer starts a text with BOS)."""
        self.check_layer(layer)
        out: dict[str, Any] = {"hook_name": bridge_hook_name(layer), "hf_hook_name": self.hook_name(layer), "layer": int(layer),
                               "model_class": type(self.hf_model).__name__}
        if processor is not None:
            out["prepend_bos"] = prepends_bos(processor)
        return out

    @property
    @abc.abstractmethod
    def vision_tower(self) -> Any:
        """The vision encoder (envoy when wrapped)."""

    @property
    @abc.abstractmethod
    def projector(self) -> Any:
        """The module mapping vision features into the language model's embedding space (VISTA trains it)."""

    @property
    def projector_modules(self) -> list[nn.Module]:
        """Every module that maps vision features into the language model (the projector a "feature
        alignment" stage trains with the LM and the tower frozen); the family's extra mergers included."""
        return [unwrap(self.projector)]

    def unembed(self, hidden: Tensor) -> Tensor:
        """The logit lens: the language model's final norm, then ``lm_head`` (the underlying torch modules), on
        hidden states of any decoder layer ``[..., d]`` -> logits ``[..., vocab]``."""
        lm = unwrap(self.language_model)
        head = self.hf_model.lm_head
        w = head.weight
        return head(lm.norm(hidden.to(w.device, w.dtype)))

    @property
    def d_vision(self) -> int:
        """Width of :meth:`patch_features`."""
        raise NotImplementedError(f"{type(self).__name__} does not implement d_vision")

    def patch_features(self, inputs: Mapping[str, Any]) -> Float[Tensor, "n_images n_patches d_vision"]:
        """The vision tower's output for the images of ``inputs`` (``pixel_values`` and the family's
        image keys), one vector per image token in row-major patch order: ``[n_images, n_patches,
        d_vision]``.  Runs the underlying ``torch`` modules (with autograd, outside any trace), so a
        caller can train the tower on it.  Each family documents what its tokens are (LLaVA: CLIP
        patches before the projector; Qwen3-VL: the merged patches of its tower)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement patch_features")

    def check_layer(self, layer: Any) -> int:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(
                f"layer {layer!r} is out of range: {type(self.hf_model).__name__} has decoder layers 0..{self.n_layers - 1}"
            )
        return layer

    # ---- token ids ----------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        return int(self.config.image_token_id)

    def special_token_ids(self) -> set[int]:
        """Token ids that are never caption tokens (image, video, vision markers, pad/bos/eos)."""
        ids = {self.image_token_id}
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            for cfg in (self.config, self.text_config):
                v = getattr(cfg, name, None)
                if isinstance(v, int):
                    ids.add(v)
                elif isinstance(v, (list, tuple)):
                    ids.update(int(x) for x in v)
        return ids

    # ---- images -------------------------------------------------------------------------------
    @abc.abstractmethod
    def image_tokens(self, inputs: Mapping[str, Any]) -> list[ImageTokens]:
        """The tokens each image of the batch expands to, in the order the model scatters them
        (row-major over batch, then sequence), computed from the pixel inputs and the config only."""

    @abc.abstractmethod
    def num_image_tokens(self, height: int, width: int, processor: Any = None) -> int:
        """Image tokens an image of ``height × width`` pixels becomes (through ``processor``'s settings
        when given, else the family's defaults)."""

    def has_images(self, inputs: Mapping[str, Any]) -> bool:
        return inputs.get("pixel_values") is not None

    # ---- masks --------------------------------------------------------------------------------
    def input_ids(self, inputs: Mapping[str, Any]) -> Tensor:
        """``inputs['input_ids']`` (``[batch, seq]``), or a one-line error naming how to build inputs."""
        ids = inputs.get("input_ids")
        if not isinstance(ids, Tensor) or ids.dim() != 2:
            raise ValueError("inputs need 'input_ids' as a [batch, seq] tensor; build them with adapter.build_inputs(processor, images, texts)")
        return ids

    def attention_mask(self, inputs: Mapping[str, Any]) -> Tensor:
        """The attended positions of ``inputs`` ``[batch, seq]`` (bool; every position when it has no mask)."""
        am = inputs.get("attention_mask")
        ids = self.input_ids(inputs)
        return torch.ones_like(ids, dtype=torch.bool) if am is None else am.bool()

    @typechecked
    def image_token_mask(self, inputs: Mapping[str, Any]) -> Bool[Tensor, "batch seq"]:
        """True at the image-token positions (the positions the image features are written to)."""
        return self.input_ids(inputs) == self.image_token_id

    @typechecked
    def caption_token_mask(self, inputs: Mapping[str, Any]) -> Bool[Tensor, "batch seq"]:
        """True at the caption tokens only (no image, special or template tokens).

        Encodings from :meth:`build_inputs` carry an exact ``caption_mask`` (found by rendering the
        prompt with and without the caption).  For other encodings the fallback is: the non-special,
        non-padding tokens after the last image-related token of each row, which is exact for the
        plain layout (:attr:`plain_layout`) and includes template tokens after the caption otherwise.
        """
        cm = inputs.get("caption_mask")
        if cm is not None:
            return cm.bool()
        ids = self.input_ids(inputs)
        keep = self.attention_mask(inputs).clone()
        for t in self.special_token_ids():
            keep &= ids != t
        img = self._vision_marker_mask(ids)
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        return keep & (pos > last_positions(img).unsqueeze(1))

    @typechecked
    def non_image_token_mask(self, inputs: Mapping[str, Any]) -> Bool[Tensor, "batch seq"]:
        """True at every attended token that is not an image token (BOS, template words, caption: the
        JSAE reference's text view)."""
        return self.attention_mask(inputs) & ~self.image_token_mask(inputs)

    def _vision_marker_mask(self, ids: Tensor) -> Tensor:
        """Image tokens and any markers around them (overridden by families that have markers)."""
        return ids == self.image_token_id

    @typechecked
    def patch_grid(self, inputs: Mapping[str, Any]) -> Int[Tensor, "batch seq 4"]:
        """``[B, S, 4]`` long tensor: (image index within its row, region, row, col) at every image token,
        -1 everywhere else.  Region 0 is the image's base grid; LLaVA-NeXT's high-resolution tiles are
        region 1.  Row/col are -1 for image tokens that are not patches (CLS, row-newline)."""
        self.check_inputs(inputs)
        ids = self.input_ids(inputs)
        grid = torch.full((*ids.shape, 4), -1, dtype=torch.long)
        mask = self.image_token_mask(inputs).cpu()
        tokens = self.image_tokens(inputs)
        img = 0
        for b in range(ids.shape[0]):
            positions = mask[b].nonzero().flatten()
            k, within = 0, 0
            while k < len(positions):
                t = tokens[img]
                sl = positions[k:k + t.n_tokens]
                grid[b, sl, GRID_IMAGE] = within
                grid[b, sl, 1:] = t.grid
                k, img, within = k + t.n_tokens, img + 1, within + 1
        return grid.to(ids.device)

    # ---- validation ---------------------------------------------------------------------------
    def check_inputs(self, inputs: Mapping[str, Any]) -> None:
        """One-line errors for inputs the model would reject or silently misread (raised before any forward)."""
        self.input_ids(inputs)  # one-line error for missing input_ids
        if not self.has_images(inputs):
            return
        counts = [t.n_tokens for t in self.image_tokens(inputs)]
        per_row = self.image_token_mask(inputs).sum(dim=1).tolist()
        img = 0
        for b, n in enumerate(per_row):
            if n == 0:
                raise ValueError(
                    f"sample {b} has no image token ({self.image_token!r}, id {self.image_token_id}) but images were given; "
                    f"put the image token in the prompt, e.g. build inputs with adapter.build_inputs(processor, images, texts)"
                )
            used = 0
            while used < n and img < len(counts):
                used, img = used + counts[img], img + 1
            if used < n:
                raise ValueError(
                    f"sample {b} has {n} image tokens but only {used} image features are left for it "
                    f"({len(counts)} images give {sum(counts)} features); pass one image per image placeholder"
                )
            if used != n:
                raise ValueError(
                    f"sample {b} has {n} image tokens, fewer than the {used} features of its image(s); "
                    f"let the processor expand each {self.image_token!r} (an image of this size needs {counts[img - 1]} tokens)"
                )
        if img < len(counts):
            raise ValueError(
                f"{len(counts)} images were given but the prompts have only {img} image slots; "
                f"put one {self.image_token!r} per image in the prompts or pass fewer images"
            )

    def model_kwargs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The tensors the model's forward takes (jsae's own keys such as ``caption_mask`` removed)."""
        return {k: v for k, v in inputs.items() if k not in EXTRA_KEYS and v is not None}

    #: the language model runs its decoder layers one after another, each called with the hidden states and the same
    #: other arguments, and its logits are ``lm_head(norm(last layer's output))`` (:meth:`last_logits`): then
    #: :func:`jsae.interventions.generate` runs the layers below the first edited one once per distinct prompt
    #: (checked against transformers' ``generate`` in ``tests/test_fast_generate.py``)
    sequential_layers: bool = False

    def last_logits(self, hidden: Tensor) -> Tensor:
        """The logits of the last position ``[B, vocab]`` from the last decoder layer's output ``[B, S, d]``, as the
        model's forward computes them (final norm over every position, ``lm_head`` on the last)."""
        lm = unwrap(self.language_model)
        return self.hf_model.lm_head(lm.norm(hidden)[:, -1:, :])[:, -1]

    def generation_position_ids(self, attention_mask: Tensor) -> Tensor | None:
        """The ``position_ids`` of a prompt's tokens as ``generate`` gives them to the forward (each later token: the
        last one + 1), so :func:`jsae.interventions.generate` can run its own greedy loop (dropping the captions that
        have ended); ``None`` (the default): the family's positions are not plain 1-D ones (e.g. multimodal RoPE), and
        ``generate`` runs transformers' own loop."""
        return None

    # ---- building inputs ----------------------------------------------------------------------
    @classmethod
    def plain_prompt(cls, caption: str, n_images: int = 1, processor: Any = None) -> str:
        """The prompt used when the processor has no chat template: the image placeholder(s)
        (:attr:`plain_image`, else ``processor.image_token`` when it has one, else :attr:`image_token`),
        a space, then the caption.  A class method: ``plain_prompt("")`` is what one image is in a prompt."""
        image = cls.plain_image or getattr(processor, "image_token", None) or cls.image_token
        if not isinstance(image, str):
            raise TypeError(f"{cls.__name__}.image_token / plain_image must be class attributes holding strings, "
                            f"got {type(image).__name__}")
        return " ".join([image] * n_images + ([caption] if caption else []))

    def render_prompt(self, processor: Any, caption: str, n_images: int = 1, chat_template: bool | None = None,
                      add_generation_prompt: bool = False, prompt_template: str | None = None) -> str:
        """The prompt text of one sample: the processor's chat template with one user turn holding the
        image(s) then the caption, or :meth:`plain_prompt` when there is no template (or
        ``chat_template=False``).  A raw ``prompt_template`` (e.g. ``"USER: <image>\n{caption}\nASSISTANT:"``)
        replaces both: ``{caption}`` is filled in and the template's own image placeholder(s) stay; it is used
        as written, so ``add_generation_prompt`` does not apply to it."""
        if prompt_template is not None:
            return self.fill_template(processor, prompt_template, caption, n_images)
        template = getattr(processor, "chat_template", None) or getattr(tokenizer_of(processor), "chat_template", None)
        if chat_template is True and template is None:
            raise ValueError(f"{type(processor).__name__} has no chat template; pass chat_template=False for the plain layout")
        if template is None or chat_template is False:
            return self.plain_prompt(caption, n_images, processor)
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(n_images)]
        if caption:
            content.append({"type": "text", "text": caption})
        messages = [{"role": "user", "content": content}]
        fn = processor.apply_chat_template if hasattr(processor, "apply_chat_template") else tokenizer_of(processor).apply_chat_template
        return fn(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def fill_template(self, processor: Any, prompt_template: str, caption: str, n_images: int = 1) -> str:
        """``prompt_template`` with ``{caption}`` filled in; one-line errors when it lacks ``{caption}`` or does
        not hold one image placeholder per image."""
        image = getattr(processor, "image_token", None) or self.image_token
        if "{caption}" not in prompt_template:
            raise ValueError(f"prompt template {prompt_template!r} has no {{caption}}; write where the caption goes, "
                             f"e.g. 'USER: {image}\\n{{caption}}\\nASSISTANT:'")
        if prompt_template.count(image) != n_images:
            raise ValueError(f"prompt template {prompt_template!r} holds {prompt_template.count(image)} image placeholder(s) "
                             f"{image!r} for {n_images} image(s); put one per image")
        return prompt_template.replace("{caption}", caption)

    def build_inputs(self, processor: Any, images: Sequence[Any], texts: Sequence[str], *,
                     chat_template: bool | None = None, add_generation_prompt: bool = False,
                     prompt_template: str | None = None, return_tensors: str = "pt") -> Any:
        """Model inputs for ``images[i]`` (one image, or a list of images) paired with ``texts[i]``.

        Goes through ``processor(images=..., text=...)`` and its chat template (plain layout when it has
        none); the result also holds ``caption_mask`` (``[B, S]`` bool), exactly the tokens of each
        caption, found by rendering every prompt with and without its caption and counting from the end
        of the prompt (so the image-token expansion before it does not matter).  Captions are stripped of
        surrounding whitespace first.
        """
        if len(images) != len(texts):
            raise ValueError(f"got {len(images)} images for {len(texts)} texts; pass one image (or list of images) per text")
        if len(texts) == 0:
            raise ValueError("no (image, text) pairs given")
        tok = tokenizer_of(processor)
        n_imgs = [len(im) if isinstance(im, (list, tuple)) else 1 for im in images]
        prompts, spans = [], []
        for i, (text, k) in enumerate(zip(texts, n_imgs)):
            if not isinstance(text, str):
                raise TypeError(f"text {i} is {type(text).__name__}; pass strings")
            # surrounding whitespace is dropped: in a SentencePiece vocabulary a trailing space merges with the
            # template's next piece ("space  [/INST]" -> "▁▁["), which would then count as a caption token
            text = text.strip()
            full = self.render_prompt(processor, text, k, chat_template, add_generation_prompt, prompt_template)
            bare = self.render_prompt(processor, "", k, chat_template, add_generation_prompt, prompt_template)
            a, b = tok(full).input_ids, tok(bare).input_ids
            pre = 0
            while pre < min(len(a), len(b)) and a[pre] == b[pre]:
                pre += 1
            suf = 0
            while suf < min(len(a), len(b)) - pre and a[-1 - suf] == b[-1 - suf]:
                suf += 1
            n_cap = len(a) - pre - suf
            if n_cap <= 0:
                raise ValueError(f"caption {i} ({text!r}) is empty: it has no caption tokens; drop the pair or give it a caption")
            prompts.append(full)
            spans.append((n_cap, suf))
        from jsae.data.images import to_rgb  # 16-bit, float, palette, CMYK, alpha: rescaled, not clipped

        flat_images = [to_rgb(im, f"image {j}") for j, im in
                       enumerate(im for ims in images for im in (ims if isinstance(ims, (list, tuple)) else [ims]))]
        enc = processor(images=flat_images, text=prompts, return_tensors=return_tensors, padding=True)
        ids = enc["input_ids"]
        am = enc.get("attention_mask")
        am = torch.ones_like(ids, dtype=torch.bool) if am is None else am.bool()
        # an unknown word is still a caption position, so <unk> is not excluded
        special = (self.special_token_ids() | set(getattr(tok, "all_special_ids", []))) - {getattr(tok, "unk_token_id", None)}
        cap = torch.zeros_like(ids, dtype=torch.bool)
        for b, (n_cap, suf) in enumerate(spans):
            real = am[b].nonzero().flatten()
            sel = real[len(real) - suf - n_cap:len(real) - suf]
            cap[b, sel] = True
        for t in special:
            cap &= ids != t
        if not bool(cap.any(dim=1).all()):
            b = int((~cap.any(dim=1)).nonzero()[0])
            raise ValueError(f"caption {b} ({texts[b]!r}) has no caption tokens after removing special tokens; give it a caption")
        enc["caption_mask"] = cap
        enc = self.complete_inputs(enc)
        self.check_inputs(enc)
        return enc

    def complete_inputs(self, inputs: Any) -> Any:
        """Add inputs the forward needs that a processor may not give (e.g. Qwen3-VL's ``mm_token_type_ids``)."""
        return inputs

    # ---- the family without a model (jsae.cost: a capture's cost from a config and published settings) --------
    @classmethod
    def build_image_processor(cls, config: Any, settings: Mapping[str, Any]) -> Any:
        """The family's image processor (PIL backend: no torchvision) from ``config`` and the published
        ``preprocessor_config.json`` settings (``settings``, without ``image_processor_type`` and the like)."""
        raise NotImplementedError(f"{cls.__name__} cannot build an image processor from published settings; "
                                  "pass the processor itself")

    @classmethod
    def build_processor(cls, config: Any, tokenizer: Any, image_processor: Any, settings: Mapping[str, Any],
                        chat_template: str | None) -> Any:
        """The family's processor over ``tokenizer`` and ``image_processor`` with the published processor
        ``settings`` (``patch_size``...) and ``chat_template`` (None: the plain layout)."""
        raise NotImplementedError(f"{cls.__name__} cannot build a processor from published settings; pass the processor itself")

    @classmethod
    def vision_cost(cls, config: Any, sizes: Sequence[tuple[int, int]], image_processor: Any, act: int) -> tuple[int, float]:
        """``(peak activation bytes of the vision tower for the largest image, mean FLOPs per image)`` for images
        of ``sizes`` (height, width) at ``act`` bytes per element (see :mod:`jsae.cost` for the formulas)."""
        raise NotImplementedError(f"{cls.__name__} has no vision cost model; jsae.cost cannot estimate this family")

    @classmethod
    def truncate_vision(cls, config: Any, n_layers: int) -> None:
        """Cut the vision tower of ``config`` (in place) to ``n_layers`` layers, keeping the family's indexes
        into it valid."""
        raise NotImplementedError(f"{cls.__name__} cannot truncate its vision tower")


def prepends_bos(processor: Any) -> bool:
    """Whether the processor's tokenizer starts an encoded text with its BOS token (SAELens's ``prepend_bos``)."""
    tok = tokenizer_of(processor)
    bos = getattr(tok, "bos_token_id", None)
    ids = tok("a").input_ids if bos is not None else []
    return bool(ids) and ids[0] == bos


# ================================================================================================
# Registry
# ================================================================================================

_REGISTRY: dict[str, type[VLMAdapter]] = {}
_REMOTE: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def mark_remote(model: Any) -> None:
    """Record that ``model`` runs on NDIF (``jsae.load_vlm(..., remote=True)`` calls this)."""
    _REMOTE.add(unwrap(model))


def register_adapter(cls: type[VLMAdapter]) -> type[VLMAdapter]:
    """Register ``cls`` for each class name in ``cls.model_classes`` (usable as a decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, VLMAdapter)) or not cls.model_classes:
        raise TypeError(f"{cls!r} must be a VLMAdapter subclass with a non-empty model_classes")
    for name in cls.model_classes:
        _REGISTRY[name] = cls
    return cls


@functools.lru_cache(maxsize=1)
def _load_entry_points() -> tuple[str, ...]:
    loaded = []
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        register_adapter(cls)
        loaded.append(ep.name)
    return tuple(loaded)


def supported_models() -> list[str]:
    """Class names with a registered adapter (built-ins and entry points)."""
    _load_entry_points()
    return sorted(_REGISTRY)


def adapter_class(model_class: type | str) -> type[VLMAdapter]:
    """The adapter class registered for a transformers model class (a class, looked up along its MRO, or
    a class name), without a model instance."""
    _load_entry_points()
    names = [model_class] if isinstance(model_class, str) else [k.__name__ for k in model_class.__mro__]
    for name in names:
        cls = _REGISTRY.get(name)
        if cls is not None:
            return cls
    shown = model_class if isinstance(model_class, str) else model_class.__name__
    raise ValueError(
        f"no jsae adapter for {shown}; supported: {', '.join(sorted(_REGISTRY))}. "
        f"Register one with jsae.adapters.register_adapter(MyAdapter) or the entry-point group {ENTRY_POINT_GROUP!r}"
    )


def for_model(model: Any) -> VLMAdapter:
    """The adapter for ``model`` (nnsight-wrapped or bare transformers VLM), chosen by its class."""
    return adapter_class(type(unwrap(model)))(model)
