"""Decode paths of the rollout: one token per row per step after a prefill of the prompts.

Two implementations of the same computation, picked per model by ``decode_path``:

- ``HFDecode``: the Hugging Face decoder's own forward with a ``DynamicCache``. Works for any causal LM
  (LoRA/peft students, remote code, sliding windows, every attention backend).
- ``FastDecode``: a decode step written out for the decoder family that Llama, Mistral, Qwen2 and Qwen3
  share (RMSNorm, rotary embeddings, grouped-query attention, gated MLP), reading the HF modules' own
  weights (no copies: an optimizer step is seen by the next rollout). Per token HF's forward spends
  most of a small model's step in Python: mask construction, cache objects, output dataclasses and
  decorators, module calls. The fast step is only the step's tensor ops: keys and values go into a
  static cache preallocated for the whole rollout, rotary tables are computed once per rollout, and the
  key mask is a slice of the rollout's own attention mask. The prompts are prefilled once through HF.

Both return the final-norm hidden state of each row's last position, which ``head_logits`` turns into
the sampler's logits. The fast step performs the ops HF's modules perform, in the same order and
dtypes (autocast included), so its hidden states equal HF's up to float rounding (the attention kernel
sees the same keys in a different memory layout); the tests hold it to HF's per-step logits, greedy and
sampled completions.

``rollout.decode``: ``"auto"`` takes the fast path wherever ``fast_decode_unsupported`` finds nothing
against it, ``"hf"`` always HF's, ``"fast"`` insists (an error names why a model cannot).

Public API: ``Decode`` (``HFDecode``, ``FastDecode``), ``start_decode``, ``decode_path``,
``fast_decode_unsupported``, ``FAST_MODEL_TYPES``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import DynamicCache

from .models import LoadedModel, decoder_of, forward_hidden

FAST_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# Attention backends whose math the fast step reproduces (scaled dot-product attention over the cache).
FAST_ATTENTION = ("sdpa", "eager")
# Rotary variants whose frequencies do not depend on the sequence length (dynamic NTK and LongRoPE do).
FAST_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# The projections of a decoder layer the step multiplies by, as plain weights (and biases).
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
               "mlp.up_proj", "mlp.down_proj")


class Decode(Protocol):
    """One rollout's decode state for one model (a batch of rows)."""

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` ``(B,)`` at ``positions`` ``(B, 1)``; ``mask`` ``(B, T)`` covers past + these tokens.
        Returns the final hidden states ``(B, H)``."""
        ...

    def select(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (indices into the current batch) for the following steps."""
        ...


def fast_decode_unsupported(lm: LoadedModel, total_length: int) -> str | None:
    """Why ``FastDecode`` cannot decode ``lm`` for sequences of ``total_length`` tokens; None when it can.

    The rule is explicit rather than a try-and-fall-back: anything that changes a module's forward
    beyond the weights the fast step reads (peft adapters, quantized or replaced projections, forward
    hooks, sharded DTensor parameters, sliding windows that bite, sequence-length-dependent rotary
    scaling) must take HF's path.
    """
    model = lm.model
    if not hasattr(DynamicCache(), "layers"):
        return "this transformers version's DynamicCache has no per-layer key/value tensors to start from"
    if hasattr(model, "peft_config"):
        return "a peft (LoRA) model, whose adapters run inside the modules' forward"
    config = model.config
    if config.model_type not in FAST_MODEL_TYPES:
        return f"model type {config.model_type!r} is not one of {FAST_MODEL_TYPES}"
    if config._attn_implementation not in FAST_ATTENTION:
        return f"attention implementation {config._attn_implementation!r} is not one of {FAST_ATTENTION}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}  # v5 / v4 name
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in FAST_ROPE_TYPES:
        return f"rotary type {rope_type!r} is not one of {FAST_ROPE_TYPES}"
    window = _attention_window(config)
    if window is not None and total_length > window:
        return f"a sliding window of {window} tokens shorter than the rollout's {total_length}"
    decoder = decoder_of(model)
    for i, layer in enumerate(decoder.layers):
        for name in PROJECTIONS:
            module = layer.get_submodule(name)
            if type(module) is not nn.Linear:
                return f"layers.{i}.{name} is a {type(module).__name__}, not a plain Linear"
    if any(isinstance(p, DTensor) for p in model.parameters()):
        return "sharded (DTensor) parameters, gathered only by the modules' forward hooks"
    for name, module in decoder.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"forward hooks on {name or 'the decoder'}, which only HF's forward would run"
    return None


def decode_path(lm: LoadedModel, mode: str, total_length: int) -> Literal["hf", "fast"]:
    """The decode path ``mode`` (``rollout.decode``) gives ``lm``; ``"fast"`` on an unsupported model raises."""
    if mode == "hf":
        return "hf"
    reason = fast_decode_unsupported(lm, total_length)
    if reason is None:
        return "fast"
    if mode == "fast":
        raise ValueError(f"rollout.decode = 'fast' cannot decode {lm.name} ({lm.path}): {reason}; "
                         "use rollout.decode = 'auto' (falls back to the Hugging Face forward) or 'hf'")
    return "hf"


def start_decode(
    lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, mode: str
) -> tuple[Decode, torch.Tensor]:
    """Prefill the left-padded prompts ``(B, P)`` through HF; return the decode state for up to
    ``max_new_tokens`` more tokens and the prompts' last hidden states ``(B, H)``."""
    total = input_ids.shape[1] + max_new_tokens
    path = decode_path(lm, mode, total)
    cache = DynamicCache()
    hidden, _ = forward_hidden(lm, input_ids, attention_mask, cache=cache)
    decode = HFDecode(lm, cache) if path == "hf" else FastDecode(lm, cache, total)
    return decode, hidden[:, -1]


class HFDecode:
    """The HF decoder's forward, one token at a time, on the prefill's ``DynamicCache``."""

    def __init__(self, lm: LoadedModel, cache: DynamicCache) -> None:
        self.lm, self.cache = lm, cache

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, _ = forward_hidden(self.lm, tokens[:, None], mask, cache=self.cache, positions=positions)
        return hidden[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        self.cache.batch_select_indices(rows)


class _Linear(NamedTuple):
    weight: torch.Tensor
    bias: torch.Tensor | None


class _Layer(NamedTuple):
    """The tensors of one decoder layer the step reads (references to the HF parameters)."""

    input_norm: torch.Tensor
    q: _Linear
    k: _Linear
    v: _Linear
    o: _Linear
    q_norm: torch.Tensor | None  # Qwen3 normalizes each head's queries and keys
    k_norm: torch.Tensor | None
    post_norm: torch.Tensor
    gate: _Linear
    up: _Linear
    down: _Linear
    act: Callable[[torch.Tensor], torch.Tensor]


def _linear(module: nn.Linear) -> _Linear:
    return _Linear(module.weight, module.bias)


def _layer(module: nn.Module) -> _Layer:
    attn, mlp = module.self_attn, module.mlp
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return _Layer(module.input_layernorm.weight, _linear(attn.q_proj), _linear(attn.k_proj), _linear(attn.v_proj),
                  _linear(attn.o_proj), None if q_norm is None else q_norm.weight,
                  None if k_norm is None else k_norm.weight, module.post_attention_layernorm.weight,
                  _linear(mlp.gate_proj), _linear(mlp.up_proj), _linear(mlp.down_proj), mlp.act_fn)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm of these families: the statistic in fp32, the weight applied in the input's dtype."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention_window(config: object) -> int | None:
    """The sliding window of the model's attention layers, if any layer has one."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return getattr(config, "sliding_window", None)


class FastDecode:
    """The decode step of the Llama/Mistral/Qwen2/Qwen3 family on a static KV cache.

    The cache holds ``(B, kv_heads, total, head_dim)`` keys and values per layer; the token fed with a
    mask of ``T`` columns is written at column ``T - 1`` (the rollout's mask grows one column per step for
    every row; finished rows feed a masked pad token), and attention reads columns ``[0, T)``.
    """

    def __init__(self, lm: LoadedModel, prefill: DynamicCache, total: int) -> None:
        decoder, config = decoder_of(lm.model), lm.model.config
        self.lm, self.eps = lm, config.rms_norm_eps
        self.embed, self.norm = decoder.embed_tokens.weight, decoder.norm.weight
        self.layers = [_layer(layer) for layer in decoder.layers[: config.num_hidden_layers]]
        attn = decoder.layers[0].self_attn
        self.head_dim, self.scaling, self.groups = attn.head_dim, attn.scaling, attn.num_key_value_groups
        positions = torch.arange(total, device=self.embed.device)[None]
        with lm.autocast():
            cos, sin = decoder.rotary_emb(self.embed, positions)
        self.cos, self.sin = cos[0], sin[0]  # (total, head_dim): a position's row is what HF computes for it
        self.keys, self.values = [], []
        for layer in prefill.layers:
            b, heads, p_len, dim = layer.keys.shape
            keys = layer.keys.new_zeros((b, heads, total, dim))
            values = layer.values.new_zeros((b, heads, total, dim))
            keys[:, :, :p_len], values[:, :, :p_len] = layer.keys, layer.values
            self.keys.append(keys)
            self.values.append(values)

    def select(self, rows: torch.Tensor) -> None:
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        with self.lm.autocast():
            return self._step(tokens, mask, positions)

    def _step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t = mask.shape
        key_mask = mask.bool()[:, None, None, :]  # (B, 1, 1, T), shared by every head
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (B, 1, 1, head_dim)
        x = F.embedding(tokens[:, None], self.embed)  # (B, 1, H)
        for layer, keys, values in zip(self.layers, self.keys, self.values, strict=True):
            h = _rms_norm(x, layer.input_norm, self.eps)
            q = F.linear(h, *layer.q).view(b, 1, -1, self.head_dim)
            k = F.linear(h, *layer.k).view(b, 1, -1, self.head_dim)
            v = F.linear(h, *layer.v).view(b, 1, -1, self.head_dim).transpose(1, 2)
            if layer.q_norm is not None:
                q, k = _rms_norm(q, layer.q_norm, self.eps), _rms_norm(k, layer.k_norm, self.eps)
            q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, heads, 1, head_dim)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            keys[:, :, t - 1:t], values[:, :, t - 1:t] = k, v
            # One query per row: the query heads of a key/value group attend as that group's rows.
            q = q.reshape(b, -1, self.groups, self.head_dim)
            a = F.scaled_dot_product_attention(q, keys[:, :, :t], values[:, :, :t], attn_mask=key_mask,
                                               scale=self.scaling)
            a = a.reshape(b, -1, 1, self.head_dim).transpose(1, 2).reshape(b, 1, -1)
            x = x + F.linear(a, *layer.o)
            h = _rms_norm(x, layer.post_norm, self.eps)
            x = x + F.linear(layer.act(F.linear(h, *layer.gate)) * F.linear(h, *layer.up), *layer.down)
        return _rms_norm(x, self.norm, self.eps)[:, -1]
