"""A frozen linear layer and its sparse bypass as one op: `y = x W^T + b + delta(x)`.

On the CPU (float32, C++ kernels built) the frozen GEMM itself carries the bypass: the deltas are
scattered into W in place (`merge_rows_`, O(d_out * k)), the forward `x (W + delta)^T` and in
backward `grad_x = grad_y (W + delta)` run as one GEMM each, and the old weights are written back
bit for bit at once (`unmerge_rows_`, also on an exception). No dense delta, mask or weight copy
exists at any point, and the bypass adds no pass over the activations except grad_values, the
gather product `sum_t grad_y[t, i] x[t, idx[i, j]]`. It is the NeuroAda authors' own formulation,
`F.linear(x, W.scatter_add(...))`, without the merged copy. Rounding differs from
`W x + delta x` only in the last float32 bits. Everywhere else (CUDA, other dtypes) this is
`F.linear(x, W, b) + sparse_delta(x)`. The base weight and bias are frozen: they get no gradient,
and asking for one is an error. While a GEMM runs the weight holds the merged values, so a model
must not run this op in two threads at once (PyTorch training loops do not).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from neuroada_kernels.cpu import cpu_kernels, use_cpu_kernels
from neuroada_kernels.sparse_csr import CsrLayout
from neuroada_kernels.sparse_product import sparse_delta


@contextmanager
def _merged(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> Iterator[None]:
    """W[i, indices[i, j]] += values[i, j] for the duration of the block; W's bits afterwards.

    Not `neuroada_kernels.scatter.apply_delta_` / `restore_`: those take flat offsets (a tensor built per
    call) and need unique positions; merge_rows_ walks the [d_out, k] indices row by row and
    restores each row backwards, so even a column listed twice comes back exact.
    """
    saved = torch.empty_like(values)
    kernels = cpu_kernels()
    kernels.merge_rows_(weight, indices, values, saved)
    try:
        yield
    finally:
        kernels.unmerge_rows_(weight, indices, saved)


def _saved_input(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as [T, d_in] in `dtype`, to keep for grad_values.

    A narrower copy is made once per input tensor and remembered on it, so layers fed the same x
    (q/k/v, gate/up) keep one copy between them, as they share x itself in float32.
    """
    x2d = x.reshape(-1, x.shape[-1])
    if dtype == x.dtype:
        return x2d.contiguous()
    memo = getattr(x, "_neuroada_saved_input", None)
    if memo is not None and memo[0] == (x._version, dtype):
        return memo[1]
    narrow = x2d.to(dtype)
    x._neuroada_saved_input = ((x._version, dtype), narrow)
    return narrow


class _SparseLinearCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, indices, values, saved_dtype):
        x2d = x.reshape(-1, x.shape[-1])
        with _merged(weight, indices, values):
            y = F.linear(x2d, weight, bias)
        # grad_values needs x; grad_x needs only the weight. The weight is kept on ctx, not in
        # saved_tensors: every merge bumps its version, which saved_tensors would call a conflict.
        ctx.save_for_backward(_saved_input(x, saved_dtype) if ctx.needs_input_grad[4] else None, indices, values)
        ctx.weight = weight
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x2d, indices, values = ctx.saved_tensors
        weight = ctx.weight
        grad_y = grad_y.reshape(-1, weight.shape[0]).contiguous()
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            with _merged(weight, indices, values):
                grad_x = (grad_y @ weight).view(ctx.x_shape)
        if ctx.needs_input_grad[4]:
            grad_values = cpu_kernels().sparse_bwd_add_(grad_y, x2d, indices, values, None, True)
        return grad_x, None, None, None, grad_values, None


def sparse_linear(
    x: torch.Tensor,  # [..., d_in]
    weight: torch.Tensor,  # [d_out, d_in], frozen
    bias: torch.Tensor | None,  # [d_out], frozen
    indices: torch.Tensor,  # [d_out, k] int64
    values: torch.Tensor,  # [d_out, k], trainable
    layout: CsrLayout | None = None,  # for the CSR fallback, see `sparse_delta`
    saved_input_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:  # [..., d_out]
    """`saved_input_dtype`: the dtype the CPU path keeps x in for grad_values. bfloat16 halves that
    memory (the bypass's only activation cost) and rounds x to 8 significant bits in grad_values
    alone; the output and grad_x stay exact. Other paths keep x as it comes (on CUDA, bf16
    autocast already makes it bfloat16)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("sparse_linear trains only the bypass values: freeze the base weight and bias")
    fused = (
        x.dtype == weight.dtype == values.dtype == torch.float32
        and weight.is_contiguous()
        and indices.dim() == 2
        and values.shape == indices.shape == (weight.shape[0], indices.shape[1])
        and use_cpu_kernels(x)
    )
    if fused:
        return _SparseLinearCpu.apply(x, weight, bias, indices.contiguous(), values.contiguous(), saved_input_dtype)
    y = F.linear(x, weight, bias)
    return y + sparse_delta(x, indices, values, layout=layout).to(y.dtype)
