"""A frozen linear layer and its sparse bypass as one op: `y = x W^T + b + delta(x)`.

On the CPU (float32, C++ kernels built) the delta is added straight into the linear's output,
and in backward the delta's grad_x straight into the linear's grad_x: no delta tensor, and no
second grad_x for autograd to sum. Everywhere else this is `F.linear(x, W, b) + sparse_delta(x)`.
The base weight and bias are frozen: they get no gradient, and asking for one is an error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.cpu import cpu_kernels, use_cpu_kernels
from kernels.sparse_csr import CsrLayout
from kernels.sparse_product import sparse_delta


class _SparseLinearCpu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, indices, values):
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        y = F.linear(x2d, weight, bias)
        cpu_kernels().sparse_fwd_add_(y, x2d, indices, values)
        ctx.save_for_backward(x2d, weight, indices, values)
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x2d, weight, indices, values = ctx.saved_tensors
        grad_y = grad_y.reshape(-1, weight.shape[0]).contiguous()
        grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
        grad_values = cpu_kernels().sparse_bwd_add_(grad_y, x2d, indices, values, grad_x, ctx.needs_input_grad[4])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        return grad_x, None, None, None, grad_values


def sparse_linear(
    x: torch.Tensor,  # [..., d_in]
    weight: torch.Tensor,  # [d_out, d_in], frozen
    bias: torch.Tensor | None,  # [d_out], frozen
    indices: torch.Tensor,  # [d_out, k] int64
    values: torch.Tensor,  # [d_out, k], trainable
    layout: CsrLayout | None = None,  # for the CSR fallback, see `sparse_delta`
) -> torch.Tensor:  # [..., d_out]
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("sparse_linear trains only the bypass values: freeze the base weight and bias")
    fused = (
        x.dtype == weight.dtype == values.dtype == torch.float32
        and indices.dim() == 2
        and values.shape == indices.shape == (weight.shape[0], indices.shape[1])
        and use_cpu_kernels(x)
    )
    if fused:
        return _SparseLinearCpu.apply(x, weight, bias, indices.contiguous(), values.contiguous())
    y = F.linear(x, weight, bias)
    return y + sparse_delta(x, indices, values, layout=layout).to(y.dtype)
