"""A decode step's attention, one call per layer: rotary, the cache write and attention per row.

Each row of the batch brings one new token (its query, key and value after the projections) and
owns one slot of a KV cache laid out `[slots, kv_heads, capacity, head_dim]`. The call rotates the
new query and key (Hugging Face's rotate-half convention), writes the key and value at the row's
position, and attends each query head to its row's keys 0..position (grouped-query: head h reads
kv head h // (heads / kv_heads)). On the CPU in float32 it is one C++ pass
(`neuroada_kernels/csrc/decode_attention.cpp`); on CUDA one Triton launch that reads each row's
own positions only: eager (a step that runs eager there is bound by its launches: the twin makes
50 ATen calls a layer, views included), and inside a compiled graph as a registered operator
(`torch.ops.neuroada.decode_attention`, one node that a CUDA graph replays; a graph runs at one
length, the cache's whole capacity, which the twin would read for every row at every step);
elsewhere the torch twin below, which reads every row up to the longest and masks: positions past
a row's own must hold finite values (zeros), or a masked NaN would still poison the row
(`neuroada_server.forward.llama.SlotCache.clear_tails` keeps them clean).
"""

from __future__ import annotations

import torch

from neuroada_kernels._triton import tl, triton, use_triton
from neuroada_kernels.cpu import cpu_kernels

_BLOCK_L = 16  # cache positions a program reads at once


if triton is not None:

    @triton.jit
    def _rotated(x_ptr, row, cos_ptr, sin_ptr, b, mask, HALF: tl.constexpr):
        """Rows [R, D] of x at offsets row [R], rotated (rotate-half), as two halves [R, HALF] in float32."""
        d = tl.arange(0, HALF)
        x1 = tl.load(x_ptr + row[:, None] + d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + row[:, None] + HALF + d[None, :], mask=mask[:, None], other=0.0).to(tl.float32)
        c1 = tl.load(cos_ptr + b * 2 * HALF + d).to(tl.float32)[None, :]
        c2 = tl.load(cos_ptr + b * 2 * HALF + HALF + d).to(tl.float32)[None, :]
        s1 = tl.load(sin_ptr + b * 2 * HALF + d).to(tl.float32)[None, :]
        s2 = tl.load(sin_ptr + b * 2 * HALF + HALF + d).to(tl.float32)[None, :]
        return x1 * c1 - x2 * s1, x2 * c2 + x1 * s2

    @triton.jit
    def _decode_attention_kernel(
        out_ptr,  # [B, heads, D]
        q_ptr,  # [B, heads, D]
        k_ptr,  # [B, KV, D]
        v_ptr,  # [B, KV, D]
        cos_ptr,  # [B, D]
        sin_ptr,  # [B, D]
        keys_ptr,  # [slots, KV, capacity, D]
        values_ptr,  # like keys
        pos_ptr,  # [B] int64
        first,
        scale,
        slot_stride,
        head_stride,
        KV: tl.constexpr,
        G: tl.constexpr,
        G_BLOCK: tl.constexpr,
        HALF: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        """One program per (row b, kv head h): its G query heads attend to the row's positions
        0..pos, the new key and value (rotated, rounded to the cache's dtype) written at pos and
        used from registers, the older ones read from the cache; an online softmax over blocks."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        D: tl.constexpr = 2 * HALF
        g = tl.arange(0, G_BLOCK)
        mg = g < G
        d = tl.arange(0, HALF)
        pos = tl.load(pos_ptr + b)
        q1, q2 = _rotated(q_ptr, (b * KV * G + h * G + g) * D, cos_ptr, sin_ptr, b, mg, HALF)  # [G_BLOCK, HALF]
        one = tl.arange(0, 1)
        k1, k2 = _rotated(k_ptr, (b * KV + h) * D + one * 0, cos_ptr, sin_ptr, b, one == 0, HALF)  # [1, HALF]
        v1 = tl.load(v_ptr + (b * KV + h) * D + d)[None, :]
        v2 = tl.load(v_ptr + (b * KV + h) * D + HALF + d)[None, :]
        cache = (first + b).to(tl.int64) * slot_stride + h * head_stride
        at = cache + pos * D + d[None, :]
        kind = keys_ptr.dtype.element_ty
        tl.store(keys_ptr + at, k1.to(kind))
        tl.store(keys_ptr + at + HALF, k2.to(kind))
        tl.store(values_ptr + at, v1.to(values_ptr.dtype.element_ty))
        tl.store(values_ptr + at + HALF, v2.to(values_ptr.dtype.element_ty))

        top = tl.full([G_BLOCK], float("-inf"), tl.float32)  # running max of the scores
        total = tl.zeros([G_BLOCK], tl.float32)  # running sum of exp(score - top)
        acc1 = tl.zeros([G_BLOCK, HALF], tl.float32)
        acc2 = tl.zeros([G_BLOCK, HALF], tl.float32)
        for start in range(0, pos, BLOCK_L):
            p = start + tl.arange(0, BLOCK_L)
            mp = p < pos
            rows = cache + p[:, None] * D + d[None, :]  # [BLOCK_L, HALF]
            key1 = tl.load(keys_ptr + rows, mask=mp[:, None], other=0.0).to(tl.float32)
            key2 = tl.load(keys_ptr + rows + HALF, mask=mp[:, None], other=0.0).to(tl.float32)
            scores = tl.sum(q1[:, None, :] * key1[None, :, :], 2) + tl.sum(q2[:, None, :] * key2[None, :, :], 2)
            scores = tl.where(mp[None, :], scores * scale, float("-inf"))  # [G_BLOCK, BLOCK_L]
            new_top = tl.maximum(top, tl.max(scores, 1))
            kept = tl.exp(top - new_top)
            weights = tl.exp(scores - new_top[:, None])
            total = total * kept + tl.sum(weights, 1)
            val1 = tl.load(values_ptr + rows, mask=mp[:, None], other=0.0).to(tl.float32)
            val2 = tl.load(values_ptr + rows + HALF, mask=mp[:, None], other=0.0).to(tl.float32)
            acc1 = acc1 * kept[:, None] + tl.sum(weights[:, :, None] * val1[None, :, :], 1)
            acc2 = acc2 * kept[:, None] + tl.sum(weights[:, :, None] * val2[None, :, :], 1)
            top = new_top
        # The new position, as the cache holds it.
        k1, k2 = k1.to(kind).to(tl.float32), k2.to(kind).to(tl.float32)
        v1 = v1.to(values_ptr.dtype.element_ty).to(tl.float32)
        v2 = v2.to(values_ptr.dtype.element_ty).to(tl.float32)
        score = (tl.sum(q1 * k1, 1) + tl.sum(q2 * k2, 1)) * scale  # [G_BLOCK]
        new_top = tl.maximum(top, score)
        kept = tl.exp(top - new_top)
        weight = tl.exp(score - new_top)
        total = total * kept + weight
        acc1 = (acc1 * kept[:, None] + weight[:, None] * v1) / total[:, None]
        acc2 = (acc2 * kept[:, None] + weight[:, None] * v2) / total[:, None]
        out = out_ptr + ((b * KV * G + h * G + g) * D)[:, None] + d[None, :]
        tl.store(out, acc1.to(out_ptr.dtype.element_ty), mask=mg[:, None])
        tl.store(out + HALF, acc2.to(out_ptr.dtype.element_ty), mask=mg[:, None])


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
    if use_triton(q) and triton_fits(q, k, keys, values):
        if torch.compiler.is_compiling():
            return torch.ops.neuroada.decode_attention(q, k, v, cos, sin, keys, values, first, positions, scale)
        return decode_attention_triton(q, k, v, cos, sin, keys, values, first, positions, scale)
    if all(t.is_cpu and t.dtype == torch.float32 for t in tensors) and not (
        torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    ):
        kernels = cpu_kernels()
        if kernels is not None and keys.is_contiguous() and values.is_contiguous():
            q, k, v, cos, sin = (t.contiguous() for t in (q, k, v, cos, sin))
            return kernels.decode_attention(q, k, v, cos, sin, keys, values, first, positions.cpu(), scale)
    return decode_attention_ref(q, k, v, cos, sin, keys, values, first, positions, scale, length)


def triton_fits(q: torch.Tensor, k: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> bool:
    """The Triton kernel's layout: a head_dim of twice a power of two, whole query-head groups, a
    contiguous cache; no gradients (it has none)."""
    head_dim = q.shape[-1]
    half = head_dim // 2
    return (
        head_dim % 2 == 0
        and half & (half - 1) == 0
        and q.shape[1] % k.shape[1] == 0
        and keys.is_contiguous()
        and values.is_contiguous()
        and not (torch.is_grad_enabled() and q.requires_grad)
    )


def decode_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    first: int,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The Triton kernel (same arguments as `decode_attention`; `triton_fits` must hold)."""
    B, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    out = q.new_empty(q.shape)
    q, k, v, cos, sin = (t.contiguous() for t in (q, k, v, cos, sin))
    _decode_attention_kernel[(B, kv_heads)](
        out,
        q,
        k,
        v,
        cos,
        sin,
        keys,
        values,
        positions.to(device=q.device, dtype=torch.int64),
        first,
        scale,
        keys.stride(0),
        keys.stride(1),
        KV=kv_heads,
        G=group,
        G_BLOCK=triton.next_power_of_2(group),
        HALF=head_dim // 2,
        BLOCK_L=_BLOCK_L,
    )
    return out


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


if triton is not None:  # the kernel as one node of a compiled graph; it writes the cache in place
    torch.library.custom_op("neuroada::decode_attention", decode_attention_triton, mutates_args=("keys", "values"))
    torch.library.register_fake("neuroada::decode_attention", lambda q, *rest: q.new_empty(q.shape))
