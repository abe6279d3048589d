"""A decode step's attention, one call per layer: rotary, the cache write and attention per row.

Each row of the batch brings one new token (its query, key and value after the projections) and
owns one slot of a KV cache laid out `[slots, kv_heads, capacity, head_dim]`. The call rotates the
new query and key (Hugging Face's rotate-half convention), writes the key and value at the row's
position, and attends each query head to its row's keys 0..position (grouped-query: head h reads
kv head h // (heads / kv_heads)). On the CPU in float32 it is one C++ pass
(`neuroada_kernels/csrc/decode_attention.cpp`); elsewhere the torch twin below, which reads every row up to
the longest and masks: positions past a row's own must hold finite values (zeros), or a masked
NaN would still poison the row (`neuroada_server.forward.llama.SlotCache.clear_tails` keeps them clean).
"""

from __future__ import annotations

import torch

from neuroada_kernels.cpu import cpu_kernels


def decode_attention(
    q: torch.Tensor,  # [B, heads, head_dim]
    k: torch.Tensor,  # [B, kv_heads, head_dim]
    v: torch.Tensor,  # [B, kv_heads, head_dim]
    cos: torch.Tensor,  # [B, head_dim]
    sin: torch.Tensor,  # [B, head_dim]
    keys: torch.Tensor,  # [slots, kv_heads, capacity, head_dim], written at (first + b, :, positions[b])
    values: torch.Tensor,  # like keys
    first: int,  # row b is slot first + b
    positions: torch.Tensor,  # [B] int64: each row's new position (its length so far)
    scale: float,
    length: int | None = None,  # max(positions) + 1 where the caller knows it on the host
) -> torch.Tensor:  # [B, heads, head_dim]
    """The twin reads every row's keys up to `length`; given, it spares a device-to-host read of
    `positions.max()` per layer (a sync on a GPU, which would also break a captured graph)."""
    tensors = (q, k, v, cos, sin, keys, values)
    if all(t.is_cpu and t.dtype == torch.float32 for t in tensors) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    ):
        kernels = cpu_kernels()
        if kernels is not None and keys.is_contiguous() and values.is_contiguous():
            q, k, v, cos, sin = (t.contiguous() for t in (q, k, v, cos, sin))
            return kernels.decode_attention(q, k, v, cos, sin, keys, values, first, positions.cpu(), scale)
    return decode_attention_ref(q, k, v, cos, sin, keys, values, first, positions, scale, length)


def decode_attention_ref(q, k, v, cos, sin, keys, values, first, positions, scale, length=None) -> torch.Tensor:
    """The torch twin (same arguments as `decode_attention`)."""
    B, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    rows = torch.arange(first, first + B, device=q.device)
    keys[rows, :, positions] = k.to(keys.dtype)  # [B, kv_heads, head_dim] into each row's position
    values[rows, :, positions] = v.to(values.dtype)
    if length is None:
        length = int(positions.max()) + 1
    visible = torch.arange(length, device=q.device) <= positions[:, None]  # [B, length]
    bias = torch.zeros(B, 1, 1, length, dtype=q.dtype, device=q.device)
    bias.masked_fill_(~visible[:, None, None, :], float("-inf"))  # [B, 1, 1, length]
    q = q.view(B, kv_heads, heads // kv_heads, head_dim)  # head h reads kv head h // G
    scores = torch.matmul(q, keys[first : first + B, :, :length].transpose(-1, -2)) * scale + bias  # [B, kv, G, L]
    return torch.matmul(scores.softmax(-1), values[first : first + B, :, :length]).view(B, heads, head_dim)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
