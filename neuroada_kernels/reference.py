"""Pure-torch twins of every kernel in this package.

They are both the CPU path (what a CPU server and CPU training really run) and the oracle the
Triton kernels are tested against. Shapes use: N = flat weight elements, n = selected entries,
T = tokens, d_in / d_out = the linear layer's sizes, k = entries per output row.
"""

from __future__ import annotations

import torch

# Same-width integer dtype per float dtype: save/restore are pure bit copies, and integer
# take/put_ avoid the slow bf16 paths of CPU scatter kernels.
BITS_DTYPE = {
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def apply_delta_flat_ref_(
    buffer: torch.Tensor,  # [N] weights, float32 / bfloat16 / float16
    offsets: torch.Tensor,  # [n] int64, unique positions into buffer
    values: torch.Tensor,  # [n] deltas, any float dtype
    saved: torch.Tensor,  # [n] buffer.dtype, receives the original weights
) -> None:
    bits_dtype = BITS_DTYPE[buffer.dtype]
    bits = buffer.view(bits_dtype)
    saved.view(bits_dtype).copy_(torch.take(bits, offsets))
    reapply_delta_flat_ref_(buffer, offsets, values, saved)


def reapply_delta_flat_ref_(
    buffer: torch.Tensor,  # [N]
    offsets: torch.Tensor,  # [n] int64, unique
    values: torch.Tensor,  # [n] deltas
    saved: torch.Tensor,  # [n] buffer.dtype, the original weights at offsets (read only)
) -> None:
    """buffer[offsets] = round(saved + values): apply over the originals in `saved`, whatever is there now."""
    bits_dtype = BITS_DTYPE[buffer.dtype]
    # The sum is formed in float32 and rounded once to the weight dtype (round to nearest even).
    merged = (saved.float() + values.float()).to(buffer.dtype)
    buffer.view(bits_dtype).put_(offsets, merged.view(bits_dtype))


def restore_flat_ref_(
    buffer: torch.Tensor,  # [N]
    offsets: torch.Tensor,  # [n] int64
    saved: torch.Tensor,  # [n] buffer.dtype, from apply_delta_flat_ref_
) -> None:
    bits_dtype = BITS_DTYPE[buffer.dtype]
    buffer.view(bits_dtype).put_(offsets, saved.view(bits_dtype))


def sparse_delta_fwd_ref(
    x: torch.Tensor,  # [T, d_in]
    indices: torch.Tensor,  # [d_out, k] int64
    values: torch.Tensor,  # [d_out, k]
) -> torch.Tensor:  # [T, d_out] float32
    """delta[t, i] = sum_j values[i, j] * x[t, indices[i, j]], accumulated in float32.

    One [T, d_out] gather per j keeps the transient at the output's size whatever k is.
    """
    x = x.float()
    values = values.float()
    out = torch.zeros(x.shape[0], indices.shape[0], dtype=torch.float32, device=x.device)
    for j in range(indices.shape[1]):
        out.addcmul_(x.index_select(1, indices[:, j]), values[:, j])
    return out


def sparse_delta_bwd_ref(
    grad_out: torch.Tensor,  # [T, d_out]
    x: torch.Tensor,  # [T, d_in]
    indices: torch.Tensor,  # [d_out, k] int64
    values: torch.Tensor,  # [d_out, k]
    need_grad_x: bool = True,
    need_grad_values: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # [T, d_in] f32, [d_out, k] f32
    grad_out = grad_out.float()
    x = x.float()
    values = values.float()
    d_out, k = indices.shape
    grad_x = torch.zeros_like(x) if need_grad_x else None
    grad_values = torch.empty(d_out, k, dtype=torch.float32, device=x.device) if need_grad_values else None
    for j in range(k):
        col = indices[:, j]
        if grad_values is not None:
            grad_values[:, j] = (grad_out * x.index_select(1, col)).sum(0)
        if grad_x is not None:
            grad_x.index_add_(1, col, grad_out * values[:, j])
    return grad_x, grad_values


def mixed_delta_ref(
    x: torch.Tensor,  # [B, ..., d_in]
    indices: torch.Tensor,  # [k, d_out] int64 (j-major), shared by every slot
    values: torch.Tensor,  # [S, k, d_out]; slot 0 = zeros
    slots: torch.Tensor,  # [B] int64
) -> torch.Tensor:  # [B, ..., d_out] float32
    """delta[b, ..., i] = sum_j values[slots[b], j, i] * x[b, ..., indices[j, i]], in float32.

    x is gathered as a 2-D [tokens, d_in] tensor (CPU index_select along the last dim of a 2-D
    tensor is several times faster than on the same data viewed in 3-D), and the k products of
    an output sum over a middle dim, which vectorises along d_out (a size-k innermost sum does not).
    """
    k, d_out = indices.shape
    T = x.numel() // x.shape[-1]
    product = x.reshape(T, x.shape[-1]).float().index_select(1, indices.reshape(-1))  # [T, k * d_out]
    token_slots = slots.repeat_interleave(T // x.shape[0]) if T != x.shape[0] else slots
    product.mul_(values.reshape(values.shape[0], -1).index_select(0, token_slots))
    delta = product if k == 1 else product.view(T, k, d_out).sum(1)
    return delta.view(*x.shape[:-1], d_out)
