"""The sparse gather product on the CPU through torch's sparse CSR kernels.

The k selected positions of a layer are a fixed sparsity pattern S [d_out, d_in] with k entries
per row, so delta(x) = x S^T is a sparse-dense product, grad_x = grad_y S, and grad_values is a
sampled dense-dense product (SDDMM) on S's pattern. These kernels vectorise along the tokens
and run several times faster than per-j gathers for k > 1 (benchmarks/train_cost.py).
The pattern is laid out once (`CsrLayout`); each call only brings the current values.
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import torch


@dataclass(frozen=True)
class CsrLayout:
    """One layer's fixed pattern as CSR for S and for S^T, and where each entry's value comes from."""

    shape: tuple[int, int]  # (d_out, d_in)
    crow: torch.Tensor  # [d_out + 1] int64
    col: torch.Tensor  # [nnz] int64, sorted within each row
    perm: torch.Tensor  # [nnz]: S's values are values.flatten()[perm]
    crow_t: torch.Tensor  # [d_in + 1] int64
    col_t: torch.Tensor  # [nnz] int64, rows of S sorted by column
    perm_t: torch.Tensor  # [nnz]: S^T's values are values.flatten()[perm_t]


def csr_layout(indices: torch.Tensor, d_in: int) -> CsrLayout:  # indices [d_out, k]
    d_out, k = indices.shape
    indices = indices.to(torch.int64)
    order = indices.argsort(dim=1)
    rows = torch.arange(d_out, device=indices.device).repeat_interleave(k)
    perm = (order + torch.arange(d_out, device=indices.device)[:, None] * k).reshape(-1)
    col = indices.reshape(-1)[perm]
    flat_cols = indices.reshape(-1)
    perm_t = torch.argsort(flat_cols * d_out + rows)
    counts_t = torch.bincount(flat_cols, minlength=d_in)
    crow_t = torch.cat([counts_t.new_zeros(1), counts_t.cumsum(0)])
    crow = torch.arange(0, d_out * k + 1, k, device=indices.device)
    return CsrLayout((d_out, d_in), crow, col, perm, crow_t, rows[perm_t], perm_t)


def _csr(layout: CsrLayout, values_flat: torch.Tensor) -> torch.Tensor:
    return _csr_tensor(layout.crow, layout.col, values_flat[layout.perm], layout.shape)


def _csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # torch flags sparse CSR as beta on every construction
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape)


def sparse_delta_fwd_csr(
    x: torch.Tensor,  # [T, d_in] float32
    layout: CsrLayout,
    values: torch.Tensor,  # [d_out, k] float32
) -> torch.Tensor:  # [T, d_out] float32
    return torch.sparse.mm(_csr(layout, values.reshape(-1)), x.t()).t()


def sparse_delta_bwd_csr(
    grad_out: torch.Tensor,  # [T, d_out] float32
    x: torch.Tensor,  # [T, d_in] float32
    layout: CsrLayout,
    values: torch.Tensor,  # [d_out, k] float32
    need_grad_x: bool = True,
    need_grad_values: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    d_out, d_in = layout.shape
    grad_x = grad_values = None
    flat = values.reshape(-1)
    if need_grad_x:
        s_t = _csr_tensor(layout.crow_t, layout.col_t, flat[layout.perm_t], (d_in, d_out))
        grad_x = torch.sparse.mm(s_t, grad_out.t()).t()
    if need_grad_values:
        sampled = torch.sparse.sampled_addmm(_csr(layout, flat), grad_out.t(), x, beta=0.0)
        grad_values = torch.empty_like(flat)
        grad_values[layout.perm] = sampled.values()
        grad_values = grad_values.view_as(values)
    return grad_x, grad_values
