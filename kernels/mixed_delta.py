"""The mixed-adapter product: every row of a batch adds the sparse delta of its own adapter.

    out[b, l, i] += sum_j values[slots[b], i, j] * x[b, l, indices[i, j]]

The adapters in one call share an index set (`indices`), so `x` is gathered once for all of
them and only their values differ: `values` is a stack of slots, one adapter each, and slot 0
holds zeros for rows without an adapter. Adapters with other index sets are further calls, one
per index set (the segments of Punica's SGMV, cut by index set rather than by adapter).
The sum is formed in float32 and added to `out` with one rounding to its dtype, so a bf16 base
keeps deltas that merging into bf16 weights would round away.
"""

from __future__ import annotations

import torch

from kernels._triton import tl, triton, use_triton
from kernels.reference import mixed_delta_ref_

_BLOCK_T = 16
_BLOCK_O = 64


if triton is not None:

    @triton.jit
    def _mixed_delta_kernel(
        out_ptr,
        x_ptr,
        idx_ptr,
        val_ptr,
        slot_ptr,
        T,
        L,
        d_in,
        d_out,
        K: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_O: tl.constexpr,
    ):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        mt = t < T
        mo = o < d_out
        mask = mt[:, None] & mo[None, :]
        slot = tl.load(slot_ptr + t // L, mask=mt, other=0).to(tl.int64)
        x_rows = t.to(tl.int64)[:, None] * d_in
        v_rows = slot[:, None] * d_out * K + o[None, :] * K
        acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
        for j in range(K):
            col = tl.load(idx_ptr + o * K + j, mask=mo, other=0).to(tl.int64)
            xv = tl.load(x_ptr + x_rows + col[None, :], mask=mask, other=0.0).to(tl.float32)
            v = tl.load(val_ptr + v_rows + j, mask=mask, other=0.0).to(tl.float32)
            acc += xv * v
        out_at = out_ptr + t.to(tl.int64)[:, None] * d_out + o[None, :]
        base = tl.load(out_at, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_at, (base + acc).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


def mixed_delta_(
    out: torch.Tensor,  # [B, L, d_out] (or [B, d_out]) the layer's output, updated in place
    x: torch.Tensor,  # [B, L, d_in] (or [B, d_in]) the layer's input
    indices: torch.Tensor,  # [d_out, k] int64, shared by every slot
    values: torch.Tensor,  # [S, d_out, k] one slot per adapter; slot 0 = zeros
    slots: torch.Tensor,  # [B] int64, the slot of each batch row
    backend: str = "auto",
) -> None:
    """Add each row's own sparse delta to `out` (Triton on CUDA, the torch twin elsewhere)."""
    _check(out, x, indices, values, slots)
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"unknown backend {backend!r}")
    x, indices, values, slots = x.contiguous(), indices.contiguous(), values.contiguous(), slots.contiguous()
    if backend == "torch" or (backend == "auto" and not use_triton(x)):
        mixed_delta_ref_(out, x, indices, values, slots)
        return
    if triton is None:
        raise RuntimeError("backend='triton' asked for, but triton is not installed")
    B = x.shape[0]
    T = x.numel() // x.shape[-1]
    d_out, k = indices.shape
    grid = (triton.cdiv(T, _BLOCK_T), triton.cdiv(d_out, _BLOCK_O))
    _mixed_delta_kernel[grid](
        out,
        x,
        indices,
        values,
        slots,
        T,
        T // B,
        x.shape[-1],
        d_out,
        K=k,
        BLOCK_T=_BLOCK_T,
        BLOCK_O=_BLOCK_O,
    )


def _check(
    out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, slots: torch.Tensor
) -> None:
    d_out, k = indices.shape if indices.dim() == 2 else (-1, -1)
    problems = [
        (
            indices.dim() == 2 and indices.dtype == torch.int64,
            f"indices must be int64 [d_out, k], got {indices.dtype} {tuple(indices.shape)}",
        ),
        (
            values.dim() == 3 and values.shape[1:] == (d_out, k),
            f"values must be [slots, {d_out}, {k}], got {tuple(values.shape)}",
        ),
        (
            slots.dim() == 1 and slots.dtype == torch.int64 and slots.shape[0] == x.shape[0],
            f"slots must be int64 [{x.shape[0]}], got {slots.dtype} {tuple(slots.shape)}",
        ),
        (
            out.shape == (*x.shape[:-1], d_out),
            f"out {tuple(out.shape)} must be x's leading shape {tuple(x.shape[:-1])} + ({d_out},)",
        ),
        (out.is_contiguous(), "out must be contiguous"),
        (len({t.device for t in (out, x, indices, values, slots)}) == 1, "all tensors must be on one device"),
    ]
    for ok, message in problems:
        if not ok:
            raise ValueError(message)
