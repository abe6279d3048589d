"""The sparse gather product on the CPU through torch's sparse CSR kernels.

The k selected positions of a layer are a fixed sparsity pattern S [d_out, d_in] with k entries
per row, so delta(x) = x S^T and grad_x = grad_y S are sparse-dense products, which torch's CSR
kernels vectorise along the tokens. grad_values[i, j] = grad_y[:, i] . x[:, indices[i, j]] is
computed from token-major rows gathered in chunks of j, never through a dense [d_out, d_in]
product (torch's sampled_addmm forms one on the CPU). The pattern is laid out once
(`CsrLayout`); each call only brings the current values.
"""

from __future__ import annotations

from dataclasses import dataclass

import warnings

import torch


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
        grad_values = _grad_values(grad_out, x, layout.indices)
    return grad_x, grad_values


_CHUNK_ELEMENTS = 1 << 22  # 16 MB of float32 gathered rows per chunk


def _grad_values(
    grad_out: torch.Tensor,  # [T, d_out]
    x: torch.Tensor,  # [T, d_in]
    indices: torch.Tensor,  # [d_out, k] int64
) -> torch.Tensor:  # [d_out, k]
    d_out, k = indices.shape
    T = x.shape[0]
    x_rows = x.t().contiguous()  # [d_in, T]: gathering whole rows is a memcpy per index
    gy_rows = grad_out.t().contiguous().unsqueeze(-1)  # [d_out, T, 1]
    grad_values = torch.empty(d_out, k, dtype=torch.float32, device=x.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, d_out * T))
    for j0 in range(0, k, step):
        j1 = min(k, j0 + step)
        gathered = x_rows.index_select(0, indices[:, j0:j1].reshape(-1)).view(d_out, j1 - j0, T)
        grad_values[:, j0:j1] = torch.bmm(gathered, gy_rows).squeeze(-1)
    return grad_values
