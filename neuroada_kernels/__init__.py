"""Kernels for sparse NeuroAda deltas: in-place apply/restore, the sparse gather
product, and the mixed-adapter product; and a decode step's dense linear, RMSNorm and attention,
and all its layers in one call.

Depends on torch (and triton where installed) only. Every kernel has a pure-torch twin in
`neuroada_kernels.reference`, which is the test oracle and the CPU path where the C++ CPU kernels
(`neuroada_kernels.cpu`, built on first use) are not available; the decode step's linear and RMSNorm
have torch's own `F.linear` and `F.rms_norm` for that, its attention a twin beside it.
"""

from neuroada_kernels._triton import triton_available
from neuroada_kernels.cpu import cpu_kernels
from neuroada_kernels.decode_attention import decode_attention
from neuroada_kernels.decode_layers import decode_layers
from neuroada_kernels.decode_linear import DecodeLinear, gated_silu, linear, use_decode_linears
from neuroada_kernels.mixed_delta import add_delta_, add_mixed_delta_, mixed_delta
from neuroada_kernels.rms_norm import rms_norm
from neuroada_kernels.scatter import (
    apply_delta_,
    apply_delta_flat_,
    flat_offsets,
    reapply_delta_flat_,
    restore_,
    restore_flat_,
)
from neuroada_kernels.sparse_csr import CsrLayout, csr_layout
from neuroada_kernels.sparse_linear import sparse_linear
from neuroada_kernels.sparse_product import sparse_delta

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
