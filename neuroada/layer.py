"""The bypass layer: a frozen nn.Linear plus a trainable sparse delta at k positions per row.

    y = base(x) + delta(x),   delta(x)[..., i] = sum_j values[i, j] * x[..., indices[i, j]]

The delta is the gather product in `neuroada_kernels` (`sparse_linear` fuses it with the frozen linear
on the CPU), which never forms a dense [d_out, d_in] tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from neuroada_kernels import CsrLayout, cpu_kernels, csr_layout, sparse_linear
from neuroada_kernels.sparse_csr import CSR_MIN_K


class NeuroAdaLinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, indices: torch.Tensor, saved_input_dtype: torch.dtype = torch.float32):
        super().__init__()
        d_out, d_in = base_layer.weight.shape
        if indices.shape[0] != d_out or indices.dim() != 2:
            raise ValueError(f"indices must be [d_out={d_out}, k], got {tuple(indices.shape)}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        device = base_layer.weight.device
        self.register_buffer("indices", indices.to(device=device, dtype=torch.int64).contiguous())  # [d_out, k]
        # Trainable deltas stay float32 while training whatever the base dtype; exported as bf16.
        self.values = nn.Parameter(torch.zeros(indices.shape, dtype=torch.float32, device=device))  # [d_out, k]
        self.saved_input_dtype = saved_input_dtype  # see neuroada_kernels.sparse_linear
        self._layout: CsrLayout | None = None  # the CSR fallback's pattern, derived once from indices

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = None
        if not x.is_cuda and self.k >= CSR_MIN_K and cpu_kernels() is None:
            if self._layout is None or self._layout.crow.device != x.device:
                self._layout = csr_layout(self.indices, x.shape[-1])
            layout = self._layout
        base = self.base_layer
        return sparse_linear(
            x,
            base.weight,
            base.bias,
            self.indices,
            self.values,
            layout=layout,
            saved_input_dtype=self.saved_input_dtype,
        )

    def extra_repr(self) -> str:
        d_out, d_in = self.base_layer.weight.shape
        return f"d_in={d_in}, d_out={d_out}, k={self.k}"
