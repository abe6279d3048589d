"""Kernels for sparse NeuroAda deltas: in-place apply/restore, the sparse gather
product, and the mixed-adapter product; and a decode step's dense linear, RMSNorm and attention,
and all its layers in one call.

Depends on torch (and triton where installed) only. Every kernel has a pure-torch twin in
`kernels.reference`, which is the test oracle and the CPU path where the C++ CPU kernels
(`kernels.cpu`, built on first use) are not available; the decode step's linear and RMSNorm
have torch's own `F.linear` and `F.rms_norm` for that, its attention a twin beside it.
"""

from kernels._triton import triton_available
from kernels.cpu import cpu_kernels
from kernels.decode_attention import decode_attention
from kernels.decode_layers import decode_layers
from kernels.decode_linear import DecodeLinear, gated_silu, linear, use_decode_linears
from kernels.mixed_delta import add_delta_, add_mixed_delta_, mixed_delta
from kernels.rms_norm import rms_norm
from kernels.scatter import (
    apply_delta_,
    apply_delta_flat_,
    flat_offsets,
    reapply_delta_flat_,
    restore_,
    restore_flat_,
)
from kernels.sparse_csr import CsrLayout, csr_layout
from kernels.sparse_linear import sparse_linear
from kernels.sparse_product import sparse_delta

__all__ = [
    "add_delta_",
    "add_mixed_delta_",
    "apply_delta_",
    "apply_delta_flat_",
    "cpu_kernels",
    "csr_layout",
    "decode_attention",
    "decode_layers",
    "CsrLayout",
    "DecodeLinear",
    "flat_offsets",
    "gated_silu",
    "linear",
    "mixed_delta",
    "reapply_delta_flat_",
    "restore_",
    "restore_flat_",
    "rms_norm",
    "sparse_delta",
    "sparse_linear",
    "triton_available",
    "use_decode_linears",
]
