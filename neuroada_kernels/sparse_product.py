"""The sparse gather product `delta(x)[t, i] = sum_j values[i, j] * x[t, indices[i, j]]`.

This is NeuroAda's bypass: `y = W x + delta(x)`. It never forms a dense [d_out, d_in] delta,
mask or weight gradient, and autograd saves only (x, indices, values), so activation memory does
not grow with k. Backward:
    grad_x[t, indices[i, j]] += values[i, j] * grad_y[t, i]
    grad_values[i, j]         = sum_t grad_y[t, i] * x[t, indices[i, j]]
"""

from __future__ import annotations

import torch

from neuroada_kernels._triton import tl, triton, use_triton
from neuroada_kernels.cpu import cpu_kernels, use_cpu_kernels
from neuroada_kernels.reference import sparse_delta_bwd_ref, sparse_delta_fwd_ref
from neuroada_kernels.sparse_csr import CSR_MIN_K, CsrLayout, csr_layout, sparse_delta_bwd_csr, sparse_delta_fwd_csr

_BLOCK_T = 32
_BLOCK_O = 64


if triton is not None:

    @triton.jit
    def _fwd_kernel(
        x_ptr, idx_ptr, val_ptr, out_ptr, T, d_out, k, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, D_IN: tl.constexpr
    ):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        mt = t < T
        mo = o < d_out
        rows = t.to(tl.int64)[:, None] * D_IN
        acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
        for j in range(k):
            col = tl.load(idx_ptr + o * k + j, mask=mo, other=0).to(tl.int64)
            v = tl.load(val_ptr + o * k + j, mask=mo, other=0.0).to(tl.float32)
            xv = tl.load(x_ptr + rows + col[None, :], mask=mt[:, None] & mo[None, :], other=0.0)
            acc += xv.to(tl.float32) * v[None, :]
        tl.store(out_ptr + t.to(tl.int64)[:, None] * d_out + o[None, :], acc, mask=mt[:, None] & mo[None, :])

    @triton.jit
    def _grad_x_kernel(
        gy_ptr, idx_ptr, val_ptr, gx_ptr, T, d_out, k, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, D_IN: tl.constexpr
    ):
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        mask = (t < T)[:, None] & (o < d_out)[None, :]
        gy = tl.load(gy_ptr + t.to(tl.int64)[:, None] * d_out + o[None, :], mask=mask, other=0.0).to(tl.float32)
        rows = t.to(tl.int64)[:, None] * D_IN
        for j in range(k):
            col = tl.load(idx_ptr + o * k + j, mask=o < d_out, other=0).to(tl.int64)
            v = tl.load(val_ptr + o * k + j, mask=o < d_out, other=0.0).to(tl.float32)
            tl.atomic_add(gx_ptr + rows + col[None, :], gy * v[None, :], mask=mask)

    @triton.jit
    def _grad_values_kernel(
        gy_ptr, x_ptr, idx_ptr, gv_ptr, T, d_out, k, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, D_IN: tl.constexpr
    ):
        o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
        j = tl.program_id(1)
        mo = o < d_out
        col = tl.load(idx_ptr + o * k + j, mask=mo, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t < T)[:, None] & mo[None, :]
            gy = tl.load(gy_ptr + t.to(tl.int64)[:, None] * d_out + o[None, :], mask=mask, other=0.0)
            xv = tl.load(x_ptr + t.to(tl.int64)[:, None] * D_IN + col[None, :], mask=mask, other=0.0)
            acc += tl.sum(gy.to(tl.float32) * xv.to(tl.float32), axis=0)
        tl.store(gv_ptr + o * k + j, acc, mask=mo)


def sparse_delta_fwd_triton(
    x: torch.Tensor,  # [T, d_in] contiguous
    indices: torch.Tensor,  # [d_out, k] contiguous int
    values: torch.Tensor,  # [d_out, k] contiguous
) -> torch.Tensor:  # [T, d_out] float32
    T, d_in = x.shape
    d_out, k = indices.shape
    out = torch.empty(T, d_out, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(T, _BLOCK_T), triton.cdiv(d_out, _BLOCK_O))
    _fwd_kernel[grid](x, indices, values, out, T, d_out, k, BLOCK_T=_BLOCK_T, BLOCK_O=_BLOCK_O, D_IN=d_in)
    return out


def sparse_delta_bwd_triton(
    grad_out: torch.Tensor,  # [T, d_out] contiguous
    x: torch.Tensor,  # [T, d_in] contiguous
    indices: torch.Tensor,  # [d_out, k]
    values: torch.Tensor,  # [d_out, k]
    need_grad_x: bool = True,
    need_grad_values: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    T, d_in = x.shape
    d_out, k = indices.shape
    grad_x = grad_values = None
    if need_grad_x:
        grad_x = torch.zeros(T, d_in, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(T, _BLOCK_T), triton.cdiv(d_out, _BLOCK_O))
        _grad_x_kernel[grid](
            grad_out, indices, values, grad_x, T, d_out, k, BLOCK_T=_BLOCK_T, BLOCK_O=_BLOCK_O, D_IN=d_in
        )
    if need_grad_values:
        grad_values = torch.empty(d_out, k, dtype=torch.float32, device=x.device)
        grid = (triton.cdiv(d_out, _BLOCK_O), k)
        _grad_values_kernel[grid](
            grad_out, x, indices, grad_values, T, d_out, k, BLOCK_T=_BLOCK_T, BLOCK_O=_BLOCK_O, D_IN=d_in
        )
    return grad_x, grad_values


class _SparseDelta(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, path: str, layout: CsrLayout | None
    ) -> torch.Tensor:
        d_in = x.shape[-1]
        x2d = x.reshape(-1, d_in).contiguous()
        if path == "triton":
            out = sparse_delta_fwd_triton(x2d, indices, values)
        elif path == "cpu":
            x2d = x2d.float()
            out = torch.zeros(x2d.shape[0], indices.shape[0], dtype=torch.float32)
            cpu_kernels().sparse_fwd_add_(out, x2d, indices, values.float().contiguous())
        elif path == "csr":
            x2d = x2d.float()
            out = sparse_delta_fwd_csr(x2d, layout, values.float())
        else:
            out = sparse_delta_fwd_ref(x2d, indices, values)
        ctx.save_for_backward(x2d, indices, values)
        ctx.path, ctx.layout, ctx.x_shape, ctx.x_dtype = path, layout, x.shape, x.dtype
        return out.to(x.dtype).reshape(*x.shape[:-1], indices.shape[0])

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x2d, indices, values = ctx.saved_tensors
        grad_out = grad_out.reshape(-1, indices.shape[0]).contiguous()
        need_x, need_values = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        need = dict(need_grad_x=need_x, need_grad_values=need_values)
        if ctx.path == "triton":
            grad_x, grad_values = sparse_delta_bwd_triton(grad_out, x2d, indices, values, **need)
        elif ctx.path == "cpu":
            grad_x = torch.zeros_like(x2d) if need_x else None
            grad_values = cpu_kernels().sparse_bwd_add_(
                grad_out.float(), x2d, indices, values.float().contiguous(), grad_x, need_values
            )
        elif ctx.path == "csr":
            grad_x, grad_values = sparse_delta_bwd_csr(grad_out.float(), x2d, ctx.layout, values.float(), **need)
        else:
            grad_x, grad_values = sparse_delta_bwd_ref(grad_out, x2d, indices, values, **need)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype).reshape(ctx.x_shape)
        if grad_values is not None:
            grad_values = grad_values.to(values.dtype)
        return grad_x, None, grad_values, None, None


def sparse_delta(
    x: torch.Tensor,  # [..., d_in]
    indices: torch.Tensor,  # [d_out, k] int64 (int32 also works)
    values: torch.Tensor,  # [d_out, k]
    backend: str = "auto",
    layout: CsrLayout | None = None,
) -> torch.Tensor:  # [..., d_out], x.dtype
    """Differentiable sparse bypass product, accumulated in float32.

    backend: "auto" (Triton for CUDA tensors; on the CPU the C++ kernels of `neuroada_kernels.cpu`, or where
    they cannot be built the CSR kernels for k >= CSR_MIN_K, else per-j gathers), "triton", "cpu",
    "csr", or "torch" (per-j gathers: the reference). `layout` (from `csr_layout`) saves
    re-deriving the pattern on every call of the CSR path; pass it wherever the indices are fixed.
    """
    if indices.dim() != 2 or values.shape != indices.shape:
        raise ValueError(f"indices {tuple(indices.shape)} and values {tuple(values.shape)} must both be [d_out, k]")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    if x.device != indices.device or x.device != values.device:
        raise ValueError(
            f"x, indices and values must share a device, got {x.device}, {indices.device}, {values.device}"
        )
    if backend not in ("auto", "triton", "cpu", "csr", "torch"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend == "triton" and triton is None:
        raise RuntimeError("backend='triton' asked for, but triton is not installed")
    if backend == "cpu" and not use_cpu_kernels(x):
        raise RuntimeError(
            "backend='cpu' asked for, but the tensors are not on the CPU or the C++ kernels are unavailable"
        )
    if backend == "auto":
        if use_triton(x):
            path = "triton"
        elif use_cpu_kernels(x):
            path = "cpu"
        else:
            path = "csr" if indices.shape[1] >= CSR_MIN_K else "torch"
    else:
        path = backend
    if path != "triton" and indices.dtype != torch.int64:
        indices = indices.long()
    if path == "csr" and layout is None:
        layout = csr_layout(indices, x.shape[-1])
    return _SparseDelta.apply(x, indices.contiguous(), values.contiguous(), path, layout)
