"""Our decoder for Llama-shaped models (llama, mistral, qwen2, qwen3), over their own modules.

The decode step of a small batch is a pass over the weights; what Hugging Face's forward adds
around it (mask building, cache objects, attention dispatch, several small ops per norm) costs
as much again on a CPU. This forward keeps only the model's arithmetic:

- a slot KV cache (`SlotCache`): row b of a batch lives in slot `first + b`, keys and values
  written at its own position, so rows join (their prefill writes fresh slots, and zeroes what
  a previous occupant left past the prompt) and leave (the rows after them move down) without
  rebuilding the cache, and no row is padded;
- a prefill per joining group, right-padded (causal attention keeps padding out of real tokens);
- a decode step whose attention reads each row's keys up to the longest row, masked per row.

It calls the model's own embedding, linear, MLP and rotary modules (and RMSNorm's weights), so
switched weights and the mixed path's per-row deltas apply here as in the HF forward. A failed
call changes no row: keys written past a row's length are never read, and are overwritten.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels import rms_norm

LLAMA_SHAPED = ("llama", "mistral", "qwen2", "qwen3")
CAPACITY_STEP = 64  # cache positions are reserved in multiples of this


def llama_unsupported(model: nn.Module) -> str | None:
    """Why this model cannot run on `LlamaForward` (None: it can)."""
    config = getattr(model, "config", None)
    if config is None:
        return f"{type(model).__name__} is not a Hugging Face causal LM"
    if config.model_type not in LLAMA_SHAPED:
        return f"model type {config.model_type!r} is not one of {', '.join(LLAMA_SHAPED)}"
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True):
        if window < getattr(config, "max_position_embeddings", 0):
            return f"sliding-window attention ({window} of {config.max_position_embeddings} positions)"
    inner = getattr(model, "model", None)
    if not all(hasattr(inner, name) for name in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model does not have a Llama-shaped module tree"
    return None


class SlotCache:
    """Keys and values per layer, [slots, kv_heads, capacity, head_dim], grown as rows need."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.keys = [torch.empty(0, kv_heads, 0, head_dim, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.empty_like(k) for k in self.keys]

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, slots: int, length: int) -> None:
        """Room for `slots` slots of `length` positions; grows geometrically, keeping the contents.
        Every new buffer is allocated before any is swapped in."""
        if slots <= self.slots and length <= self.capacity:
            return
        new_slots = max(slots, 2 * self.slots) if slots > self.slots else self.slots
        new_capacity = max(length, 2 * self.capacity) if length > self.capacity else self.capacity
        new_capacity = -(-new_capacity // CAPACITY_STEP) * CAPACITY_STEP
        kv_heads, head_dim = self.shape

        def grown(old: torch.Tensor) -> torch.Tensor:
            new = torch.zeros(new_slots, kv_heads, new_capacity, head_dim, dtype=self.dtype, device=self.device)
            new[: old.shape[0], :, : old.shape[2]] = old
            return new

        keys, values = [grown(k) for k in self.keys], [grown(v) for v in self.values]
        self.keys, self.values = keys, values

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src` into slot `dst`, whole: its tail too (see `clear_tails`)."""
        for buffers in (self.keys, self.values):
            for b in buffers:
                b[dst] = b[src]

    def clear_tails(self, first: int, lengths: list[int]) -> None:
        """Zero slots [first, first + len(lengths)) from each one's length on.

        Attention reads a row's slot up to the longest row of the batch and masks the positions past
        the row's own length; a masked position still multiplies its value by a probability of
        zero, and a value left there by the slot's previous occupant may be NaN (a request that
        failed for it). So a slot gets a new occupant with a clean tail: nothing of one request
        reaches another."""
        past = torch.arange(self.capacity, device=self.device) >= torch.tensor(lengths, device=self.device)[:, None]
        past = past[:, None, :, None]  # [n, 1, capacity, 1]
        for buffers in (self.keys, self.values):
            for b in buffers:
                b[first : first + len(lengths)].masked_fill_(past, 0)


@dataclass(frozen=True)
class _Layer:
    """One decoder layer's modules, looked up once (nn.Module attribute lookups cost per call)."""

    input_norm: nn.Module
    q: nn.Module
    k: nn.Module
    v: nn.Module
    o: nn.Module
    q_norm: nn.Module | None  # qwen3: RMSNorm per head before rotary
    k_norm: nn.Module | None
    scale: float
    post_norm: nn.Module
    mlp: nn.Module

    @classmethod
    def of(cls, layer: nn.Module) -> _Layer:
        attn = layer.self_attn
        return cls(
            layer.input_layernorm,
            attn.q_proj,
            attn.k_proj,
            attn.v_proj,
            attn.o_proj,
            getattr(attn, "q_norm", None),
            getattr(attn, "k_norm", None),
            attn.scaling,
            layer.post_attention_layernorm,
            layer.mlp,
        )


@dataclass
class _Newcomers:
    lengths: list[int]  # prompt lengths, their slots following the batch's rows


class LlamaForward:
    def __init__(self, model: nn.Module, cache: SlotCache | None = None, first: int = 0):
        self.model = model
        config = model.config
        self.embed, self.layers = model.model.embed_tokens, [_Layer.of(layer) for layer in model.model.layers]
        self.norm, self.rotary, self.lm_head = model.model.norm, model.model.rotary_emb, model.lm_head
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        weight = self.embed.weight
        self.device = weight.device
        self.cache = cache or SlotCache(len(self.layers), self.kv_heads, self.head_dim, weight.dtype, weight.device)
        self.first = first  # our rows are slots [first, first + len(lengths))
        self.lengths: list[int] = []  # tokens in each row's cache

    # --- BatchForward -------------------------------------------------------------------------

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, _Newcomers]:
        n, T = len(prompts), max(len(p) for p in prompts)
        start = self.first + len(self.lengths)
        self.cache.reserve(start + n, T)
        ids = torch.zeros(n, T, dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)] = torch.tensor(prompt)
        positions = torch.arange(T, device=self.device).expand(n, T)  # [n, T]
        hidden = self._layers(ids.to(self.device), positions, slots=slice(start, start + n), length=None)
        self.cache.clear_tails(start, [len(p) for p in prompts])
        last = torch.tensor([len(p) - 1 for p in prompts], device=self.device)
        hidden = hidden[torch.arange(n, device=self.device), last]  # [n, hidden]
        return self._logits(hidden), _Newcomers([len(p) for p in prompts])

    def join(self, newcomers: _Newcomers) -> None:
        self.lengths += newcomers.lengths

    def decode(self, tokens: list[int]) -> torch.Tensor:
        B = len(tokens)
        length = max(self.lengths) + 1
        self.cache.reserve(self.first + B, length)
        positions = torch.tensor(self.lengths, device=self.device)[:, None]  # [B, 1]
        ids = torch.tensor(tokens, device=self.device)[:, None]  # [B, 1]
        hidden = self._layers(ids, positions, slots=slice(self.first, self.first + B), length=length)
        self.lengths = [n + 1 for n in self.lengths]
        return self._logits(hidden[:, -1])

    def keep(self, rows: list[int]) -> None:
        for new, old in enumerate(rows):
            if new != old:
                self.cache.move(self.first + old, self.first + new)
        self.lengths = [self.lengths[i] for i in rows]

    def split(self, half: int) -> LlamaForward:
        other = LlamaForward(self.model, self.cache, self.first + half)
        other.lengths, self.lengths = self.lengths[half:], self.lengths[:half]
        return other

    def merge(self, other: LlamaForward) -> None:
        if not other.lengths:
            return
        if not self.lengths:  # ours may have been released (`clear`): the rows are in other's
            self.cache = other.cache
        start = self.first + len(self.lengths)
        for i in range(len(other.lengths)):
            if other.first + i != start + i:
                self.cache.move(other.first + i, start + i)
        self.lengths += other.lengths
        other.lengths = []

    def clear(self) -> None:
        self.lengths = []
        if self.first == 0:  # the whole batch is empty (a split-off half keeps the old cache): free it
            self.cache = SlotCache(len(self.layers), self.kv_heads, self.head_dim, self.cache.dtype, self.device)

    # --- the model ----------------------------------------------------------------------------

    def _layers(self, ids: torch.Tensor, positions: torch.Tensor, slots: slice, length: int | None) -> torch.Tensor:
        """Hidden states [B, T, hidden] after the last layer. A prefill (`length` None) attends
        causally within its own tokens; a decode step (T = 1) attends to each row's cache."""
        B, T = ids.shape
        x = self.embed(ids)  # [B, T, hidden]
        cos, sin = self.rotary(x, positions)  # [B, T, head_dim] each
        cos, sin = cos[:, :, None], sin[:, :, None]  # broadcast over heads
        if length is not None:
            visible = torch.arange(length, device=self.device) <= positions  # [B, length]
            bias = torch.zeros(B, 1, 1, length, dtype=x.dtype, device=self.device)
            bias.masked_fill_(~visible[:, None, None, :], float("-inf"))  # [B, 1, 1, length]
        rows = torch.arange(slots.start, slots.stop, device=self.device)[:, None]  # [B, 1]
        for i, layer in enumerate(self.layers):
            h = _rms_norm(x, layer.input_norm)
            q = layer.q(h).view(B, T, self.heads, self.head_dim)
            k = layer.k(h).view(B, T, self.kv_heads, self.head_dim)
            v = layer.v(h).view(B, T, self.kv_heads, self.head_dim)
            if layer.q_norm is not None:
                q, k = _rms_norm(q, layer.q_norm), _rms_norm(k, layer.k_norm)
            q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
            keys, values = self.cache.keys[i], self.cache.values[i]
            keys[rows, :, positions] = k  # [B, T, kv_heads, head_dim] into each row's positions
            values[rows, :, positions] = v
            if length is None:
                o = F.scaled_dot_product_attention(
                    q.transpose(1, 2),
                    k.transpose(1, 2),
                    v.transpose(1, 2),
                    is_causal=True,
                    enable_gqa=True,
                    scale=layer.scale,
                ).transpose(1, 2)  # [B, T, heads, head_dim]
            else:
                o = self._attend(q, keys[slots, :, :length], values[slots, :, :length], bias, layer.scale)
            x = x + layer.o(o.reshape(B, T, -1))
            x = x + layer.mlp(_rms_norm(x, layer.post_norm))
        return x

    def _attend(self, q, keys, values, bias, scale) -> torch.Tensor:
        """One new token per row against its cache: q [B, 1, heads, d], keys/values [B, kv, L, d]."""
        B = q.shape[0]
        q = q.view(B, self.kv_heads, self.heads // self.kv_heads, self.head_dim)  # head h reads kv head h // G
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scale + bias  # [B, kv, G, L]
        return torch.matmul(scores.softmax(-1), values).view(B, 1, self.heads, self.head_dim)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [B, hidden] -> [B, V] float32
        return self.lm_head(_rms_norm(hidden, self.norm)).float()


def _rms_norm(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    return rms_norm(x, norm.weight, norm.variance_epsilon)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
