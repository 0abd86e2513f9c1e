"""A lean greedy decode step for Llama-style language models (LLaVA's ``LlamaModel`` / ``MistralModel``).

At the toy models' sizes (hidden size 128, batch of a few hundred captions) a decode step through transformers'
modules is mostly Python: each of the ~20 modules of a layer, the rotary embedding and the attention mask are built
anew for one new position.  :class:`LlamaDecoder` runs the same weights with fewer tensor operations:

* one matmul for queries, keys and values, whose weight also holds the rows of ``rotate_half(q)`` and
  ``rotate_half(k)`` (the rotation is a signed permutation of the rows, so those rows are exact), so RoPE is two
  multiplications by a precomputed cos / sin table (``cos(position · inv_freq)`` as transformers computes it);
* one matmul for the MLP's gate and up projections;
* a key / value cache preallocated to the prompt plus the new tokens, written in place at each step; attention of the
  one new query is two batched matmuls on the cache's prefix (views, no copy), the padding an additive ``-inf`` bias.

The results are transformers' up to float summation order (the attention is not SDPA's kernel); greedy captions are
checked against ``generate`` in ``tests/test_fast_generate.py``.  Only the decode steps run here: the prefill stays
transformers' forward (with the interventions' hooks), and :meth:`LlamaDecoder.step` calls the hooks of the edited
layers on each layer's output, as the layer's forward hook would be called.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

#: the language-model classes whose layers :class:`LlamaDecoder` reproduces (pre-norm RMSNorm, RoPE, SwiGLU MLP)
LLAMA_MODELS = ("LlamaModel", "MistralModel")

Hook = Callable[[Any, tuple[Tensor, ...], Tensor], Any]


def _rotated_rows(w: Tensor, n_heads: int, head_dim: int) -> Tensor:
    """The rows of ``w`` (``[n_heads · head_dim, ...]``, or a bias) that give ``rotate_half`` of its output per head:
    ``[-second half, first half]``."""
    h = w.reshape(n_heads, head_dim, *w.shape[1:])
    half = head_dim // 2
    return torch.cat([-h[:, half:], h[:, :half]], dim=1).reshape(w.shape)


class LlamaDecoder:
    """Greedy decode steps of a Llama-style language model from a prefill's cache (see the module's docstring)."""

    def __init__(self, lm: Any, lm_head: Any, cache: Any, attention_mask: Tensor | None, max_new_tokens: int) -> None:
        cfg = lm.config
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(cfg.num_key_value_heads or self.n_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads)
        self.rep = self.n_heads // self.n_kv
        self.scale = self.head_dim ** -0.5
        self.layers = list(lm.layers)
        H, K, D = self.n_heads, self.n_kv, self.head_dim
        self.weights = []
        with torch.no_grad():
            for layer in self.layers:
                at, mlp = layer.self_attn, layer.mlp
                wq, wk, wv = at.q_proj.weight, at.k_proj.weight, at.v_proj.weight
                qkv = torch.cat([wq, wk, _rotated_rows(wq, H, D), _rotated_rows(wk, K, D), wv])
                bias = None
                if at.q_proj.bias is not None:
                    bq, bk, bv = at.q_proj.bias, at.k_proj.bias, at.v_proj.bias
                    bias = torch.cat([bq, bk, _rotated_rows(bq, H, D), _rotated_rows(bk, K, D), bv])
                self.weights.append((
                    layer.input_layernorm.weight, float(layer.input_layernorm.variance_epsilon), qkv, bias,
                    at.o_proj.weight, at.o_proj.bias, layer.post_attention_layernorm.weight,
                    float(layer.post_attention_layernorm.variance_epsilon),
                    torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), mlp.down_proj.weight))
            self.embed = lm.embed_tokens.weight
            self.norm = (lm.norm.weight, float(lm.norm.variance_epsilon))
            self.head = (lm_head.weight, lm_head.bias)
            rope = lm.rotary_emb
            keys = [_cache_tensor(cache, i, "keys") for i in range(len(self.layers))]
            values = [_cache_tensor(cache, i, "values") for i in range(len(self.layers))]
            B, _, S, _ = keys[0].shape
            self.length = S
            cap = S + max_new_tokens
            positions = torch.arange(cap, device=keys[0].device)  # a position is at most the prompt's length + steps
            freqs = positions[:, None].float() * rope.inv_freq.to(device=positions.device, dtype=torch.float)
            emb = torch.cat((freqs, freqs), dim=-1)
            dtype = keys[0].dtype
            self.cos = (emb.cos() * rope.attention_scaling).to(dtype)
            self.sin = (emb.sin() * rope.attention_scaling).to(dtype)
            # positions past the current length are never read (each step writes its position before attending)
            self.k = keys[0].new_empty(len(self.layers), B, K, cap, D)
            self.v = keys[0].new_empty(len(self.layers), B, K, cap, D)
            for i in range(len(self.layers)):
                self.k[i, :, :, :S] = keys[i]
                self.v[i, :, :, :S] = values[i]
            # additive attention bias, one row per (prompt, key head): -inf at the prompt's padding
            bias = keys[0].new_zeros(B, cap)
            if attention_mask is not None:
                bias[:, :attention_mask.shape[-1]].masked_fill_(attention_mask.to(bias.device) == 0, -math.inf)
            self.bias = bias

    def keep(self, rows: Tensor) -> None:
        """Keep only the batch rows ``rows`` (captions still being written), in that order."""
        rows = rows.to(self.k.device)
        self.k = self.k.index_select(1, rows)
        self.v = self.v.index_select(1, rows)
        self.bias = self.bias.index_select(0, rows)

    def step(self, token: Tensor, position: Tensor, hooks: Mapping[int, Hook], modules: Mapping[int, Any]) -> Tensor:
        """Logits ``[B, vocab]`` after the new tokens ``token`` ``[B]`` at positions ``position`` ``[B]``, their keys
        and values appended to the cache; ``hooks[L]`` (a forward hook's signature) edits layer ``L``'s output."""
        B = token.shape[0]
        H, K, D, t = self.n_heads, self.n_kv, self.head_dim, self.length
        L = t + 1
        cos = self.cos[position][:, None]  # [B, 1, D]
        sin = self.sin[position][:, None]
        bias = self.bias[:, None, :L]
        if K > 1:
            bias = bias.repeat_interleave(K, 0)
        n_qk = (H + K) * D
        x = F.embedding(token, self.embed)
        for i, (w_in, eps_in, qkv, b_qkv, w_o, b_o, w_post, eps_post, gate_up, w_down) in enumerate(self.weights):
            y = F.linear(_rms(x, w_in, eps_in), qkv, b_qkv)
            qk = torch.addcmul(y[:, :n_qk].view(B, H + K, D) * cos, y[:, n_qk:2 * n_qk].view(B, H + K, D), sin)
            self.k[i, :, :, t] = qk[:, H:]
            self.v[i, :, :, t] = y[:, 2 * n_qk:].view(B, K, D)
            q = qk[:, :H].reshape(B * K, self.rep, D)
            keys = self.k[i, :, :, :L].reshape(B * K, L, D)
            scores = torch.baddbmm(bias, q, keys.transpose(1, 2), alpha=self.scale)
            att = torch.bmm(scores.softmax(-1), self.v[i, :, :, :L].reshape(B * K, L, D))
            x = x + F.linear(att.reshape(B, H * D), w_o, b_o)
            g, u = F.linear(_rms(x, w_post, eps_post), gate_up).chunk(2, dim=-1)
            x = x + F.linear(F.silu(g) * u, w_down)
            hook = hooks.get(i)
            if hook is not None:
                h = x[:, None]
                out = hook(modules[i], (h,), h)
                x = (h if out is None else (out[0] if isinstance(out, tuple) else out))[:, 0]
        self.length = L
        return F.linear(_rms(x, *self.norm), *self.head)


def _rms(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``LlamaRMSNorm`` (float32 statistics, as transformers computes them)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _cache_tensor(cache: Any, layer: int, kind: str) -> Tensor:
    """Layer ``layer``'s ``keys`` / ``values`` ``[B, kv_heads, S, head_dim]`` of a transformers cache."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return getattr(layers[layer], kind)
    return getattr(cache, "key_cache" if kind == "keys" else "value_cache")[layer]


def supports(lm: Any, lm_head: Any) -> bool:
    """Whether :class:`LlamaDecoder` computes what ``lm``'s forward computes: a Llama / Mistral decoder stack with the
    default RoPE, SiLU MLP without biases, no sliding window, full attention, ``lm_head`` a plain linear layer."""
    cfg = getattr(lm, "config", None)
    if type(lm).__name__ not in LLAMA_MODELS or cfg is None or not isinstance(lm_head, torch.nn.Linear):
        return False
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else None
    mlp = lm.layers[0].mlp
    return (rope_type == "default" and getattr(cfg, "hidden_act", None) == "silu"
            and getattr(cfg, "sliding_window", None) is None and not getattr(cfg, "mlp_bias", False)
            and mlp.gate_proj.bias is None and all(type(layer).__name__ in ("LlamaDecoderLayer", "MistralDecoderLayer") for layer in lm.layers))
