"""The sparse gather product on the CPU through torch's sparse CSR kernels, for k >= CSR_MIN_K.

The k selected positions of a layer are a fixed sparsity pattern S [d_out, d_in] with k entries
per row, so delta(x) = x S^T and grad_x = grad_y S are sparse-dense products, which torch's CSR
kernels vectorise along the tokens: at large k several times faster than per-j gathers
(benchmarks/train_cost.py, RESULTS.md). At small k their fixed cost loses to the gathers.
grad_values stays on the per-j gathers: the alternatives measured (torch's sampled_addmm, which
forms a dense [d_out, d_in] product on the CPU; token-major row gathers with bmm) were slower or
dense. The pattern is laid out once (`CsrLayout`); each call only brings the current values.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from neuroada_kernels.reference import sparse_delta_bwd_ref

CSR_MIN_K = 4  # below this, per-j gathers are faster on the CPU


@dataclass(frozen=True)
class CsrLayout:
    """One layer's fixed pattern as CSR for S and for S^T, and where each entry's value comes from."""

    shape: tuple[int, int]  # (d_out, d_in)
    indices: torch.Tensor  # [d_out, k] int64, as given
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
    return CsrLayout((d_out, d_in), indices, crow, col, perm, crow_t, rows[perm_t], perm_t)


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
        _, grad_values = sparse_delta_bwd_ref(grad_out, x, layout.indices, values, need_grad_x=False)
    return grad_x, grad_values
