"""The mixed-adapter product: every row of a batch gets the sparse delta of its own adapter.

    delta[b, l, i] = sum_j values[slots[b], j, i] * x[b, l, indices[j, i]]

The adapters in one call share an index set (`indices`), so `x` is gathered once for all of
them and only their values differ: `values` is a stack of slots, one adapter each, and slot 0
holds zeros for rows without an adapter. Adapters with other index sets are further calls, one
per index set (the segments of Punica's SGMV, cut by index set rather than by adapter).
Indices and values are j-major ([k, d_out], the transpose of the adapter file's [d_out, k]):
loads along the output dim are contiguous, and the k terms of an output sum over a leading dim.
The delta is float32; `add_delta_` adds it to a layer's output with one rounding to its dtype,
so a bf16 base keeps deltas that merging into bf16 weights would round away. `add_mixed_delta_`
is the serving entry point: on the CPU its C++ kernel adds into the layer's output in place.

Both are registered operators (`torch.ops.neuroada.mixed_delta`, `.add_mixed_delta_`, with their
shapes declared for tracing), so a `torch.compile`d forward, and a CUDA graph captured from it,
keep the product as one node instead of breaking the graph at the kernel call. Eager calls go
straight to the kernel: the dispatcher's few microseconds a call would add up on a decode step.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from neuroada_kernels._triton import tl, triton, use_triton
from neuroada_kernels.cpu import cpu_kernels, use_cpu_kernels
from neuroada_kernels.reference import mixed_delta_ref


class TritonLaunch(NamedTuple):
    """How the Triton kernel tiles the product: tokens x outputs per program, and whether its loop
    over the k terms is unrolled (the loads of every term issued at once rather than one term's
    gather waiting on the last). `benchmarks/gpu_suite.py` times the candidates on a GPU."""

    block_t: int = 16
    block_o: int = 64
    unroll: bool = False


LAUNCH = TritonLaunch()  # the launch every call uses
UNROLL_MAX_K = 32  # an unrolled loop is that many copies of its body: past it, the loop stays a loop
_CPU_VALUE_DTYPES = (torch.float32, torch.bfloat16)  # the C++ kernel widens bf16 values exactly


if triton is not None:

    @triton.jit
    def _term(x_ptr, idx_ptr, val_ptr, x_rows, v_rows, o, mo, mask, j, d_out):
        """Term j of every (token, output) of the tile: x at the output's j-th index times its value."""
        col = tl.load(idx_ptr + j * d_out + o, mask=mo, other=0).to(tl.int64)
        xv = tl.load(x_ptr + x_rows + col[None, :], mask=mask, other=0.0).to(tl.float32)
        v = tl.load(val_ptr + v_rows + j * d_out, mask=mask, other=0.0).to(tl.float32)
        return xv * v

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
        UNROLL: tl.constexpr,
        ADD_INTO: tl.constexpr,
    ):
        """out [T, d_out] = the delta (float32), or with ADD_INTO, out (a layer's output, any float
        dtype) += the delta, summed in float32 and rounded once."""
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
        mt = t < T
        mo = o < d_out
        mask = mt[:, None] & mo[None, :]
        slot = tl.load(slot_ptr + t // L, mask=mt, other=0).to(tl.int64)
        x_rows = t.to(tl.int64)[:, None] * d_in
        v_rows = slot[:, None] * d_out * K + o[None, :]
        acc = tl.zeros([BLOCK_T, BLOCK_O], dtype=tl.float32)
        if UNROLL:
            for j in tl.static_range(K):
                acc += _term(x_ptr, idx_ptr, val_ptr, x_rows, v_rows, o, mo, mask, j, d_out)
        else:
            for j in range(K):
                acc += _term(x_ptr, idx_ptr, val_ptr, x_rows, v_rows, o, mo, mask, j, d_out)
        at = out_ptr + t.to(tl.int64)[:, None] * d_out + o[None, :]
        if ADD_INTO:
            acc += tl.load(at, mask=mask, other=0.0).to(tl.float32)
        tl.store(at, acc.to(out_ptr.dtype.element_ty), mask=mask)


def mixed_delta(
    x: torch.Tensor,  # [B, L, d_in] (or [B, d_in]) a layer's input
    indices: torch.Tensor,  # [k, d_out] int32 or int64 (j-major), shared by every slot
    values: torch.Tensor,  # [S, k, d_out] one slot per adapter; slot 0 = zeros
    slots: torch.Tensor,  # [B] int64, the slot of each batch row
    backend: str = "auto",
    check_ranges: bool = True,
) -> torch.Tensor:  # [B, L, d_out] (or [B, d_out]) float32
    """Each row's own sparse delta: Triton on CUDA; on the CPU the C++ kernel of `neuroada_kernels.cpu`
    for float32 inputs where it is built, else the torch twin. `backend` forces one: "triton",
    "cpu" or "torch". check_ranges=False skips the C++ kernel's bounds checks of indices and
    slots, for a caller that validated them once (the serving hot path)."""
    if torch.compiler.is_compiling():
        return torch.ops.neuroada.mixed_delta(x, indices, values, slots, backend, check_ranges)
    return _mixed_delta(x, indices, values, slots, backend, check_ranges)


def _mixed_delta(
    x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, backend: str, check_ranges: bool
) -> torch.Tensor:
    if indices.dim() != 2 or values.shape[1:] != indices.shape or slots.shape != x.shape[:1]:
        _explain(x, indices, values, slots)
    if backend not in ("auto", "triton", "cpu", "torch"):
        raise ValueError(f"unknown backend {backend!r}")
    if backend == "auto":
        backend = "triton" if use_triton(x) else ("cpu" if _cpu_kernel_fits(x, values) else "torch")
    if backend == "torch":
        return mixed_delta_ref(x, indices, values, slots)
    if backend == "cpu":
        if not _cpu_kernel_fits(x, values):
            raise RuntimeError(
                "backend='cpu' needs float32 CPU inputs, float32 or bf16 values and the C++ kernels built"
            )
        delta = torch.zeros(*x.shape[:-1], indices.shape[1], dtype=torch.float32)
        cpu_kernels().mixed_delta_add_(delta, x.contiguous(), indices, values, slots, check_ranges)
        return delta
    if triton is None:
        raise RuntimeError("backend='triton' asked for, but triton is not installed")
    out = torch.empty(*x.shape[:-1], indices.shape[1], dtype=torch.float32, device=x.device)
    _launch(out, x, indices, values, slots, add_into=False)
    return out


def _launch(
    out: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, add_into: bool
) -> None:
    """The Triton kernel over contiguous out [B, L, d_out] (or [B, d_out]): the delta into it, or added to it."""
    k, d_out = indices.shape
    T = x.numel() // x.shape[-1]
    launch = LAUNCH
    grid = (triton.cdiv(T, launch.block_t), triton.cdiv(d_out, launch.block_o))
    _mixed_delta_kernel[grid](
        out,
        x.contiguous(),
        indices.contiguous(),
        values.contiguous(),
        slots.contiguous(),
        T,
        T // x.shape[0],
        x.shape[-1],
        d_out,
        K=k,
        BLOCK_T=launch.block_t,
        BLOCK_O=launch.block_o,
        UNROLL=launch.unroll and k <= UNROLL_MAX_K,
        ADD_INTO=add_into,
    )


def _mixed_delta_shape(x, indices, values, slots, backend, check_ranges):
    return x.new_empty(*x.shape[:-1], indices.shape[1], dtype=torch.float32)


def add_mixed_delta_(
    out: torch.Tensor,  # [B, L, d_out] (or [B, d_out]) a layer's output
    x: torch.Tensor,  # [B, L, d_in] (or [B, d_in]) its input
    indices: torch.Tensor,  # [k, d_out] (j-major)
    values: torch.Tensor,  # [S, k, d_out]; slot 0 = zeros
    slots: torch.Tensor,  # [B] int64
    check_ranges: bool = True,
    backend: str = "auto",
) -> None:
    """out += each row's own delta, rounded once to out's dtype. On the CPU with float32 tensors
    the C++ kernel adds in place: no delta tensor, and rows of slot 0 are not touched; on CUDA the
    Triton kernel adds in place, one launch (an eager GPU step is bound by its launches). This is
    the serving hot path (a call per target layer per decode step), so it checks little in Python.
    `backend` forces "triton" (out contiguous) or the delta's own choice ("cpu", "torch")."""
    if torch.compiler.is_compiling():
        torch.ops.neuroada.add_mixed_delta_(out, x, indices, values, slots, check_ranges, backend)
    else:
        _add_mixed_delta(out, x, indices, values, slots, check_ranges, backend)


def _add_mixed_delta(
    out: torch.Tensor,
    x: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    slots: torch.Tensor,
    check_ranges: bool,
    backend: str,
) -> None:
    in_place = out.dtype == torch.float32 and out.is_contiguous()
    if backend in ("auto", "cpu") and in_place and _cpu_kernel_fits(x, values):
        cpu_kernels().mixed_delta_add_(out, x.contiguous(), indices, values, slots, check_ranges)
    elif backend == "triton" or (backend == "auto" and use_triton(x) and out.is_contiguous()):
        if triton is None or not out.is_contiguous():
            raise RuntimeError("backend='triton' needs triton installed and a contiguous output")
        _launch(out, x, indices, values, slots, add_into=True)
    else:
        add_delta_(out, _mixed_delta(x, indices, values, slots, backend, check_ranges))


# The registered operators run the same functions; eager callers above call those directly.
torch.library.custom_op("neuroada::mixed_delta", _mixed_delta, mutates_args=()).register_fake(_mixed_delta_shape)
torch.library.custom_op("neuroada::add_mixed_delta_", _add_mixed_delta, mutates_args=("out",)).register_fake(
    lambda out, x, indices, values, slots, check_ranges, backend: None
)


def _cpu_kernel_fits(x: torch.Tensor, values: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and values.dtype in _CPU_VALUE_DTYPES and use_cpu_kernels(x)


def add_delta_(out: torch.Tensor, delta: torch.Tensor) -> None:
    """out += delta, formed in float32 and rounded once to out's dtype."""
    if out.dtype == torch.float32:
        out.add_(delta)
    else:
        out.copy_(out.float() + delta)


def _explain(x: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, slots: torch.Tensor) -> None:
    if indices.dim() != 2:
        raise ValueError(f"indices must be [k, d_out], got shape {tuple(indices.shape)}")
    if values.dim() != 3 or values.shape[1:] != indices.shape:
        raise ValueError(f"values must be [slots, {indices.shape[0]}, {indices.shape[1]}], got {tuple(values.shape)}")
    raise ValueError(f"slots must be [{x.shape[0]}] (one per batch row), got {tuple(slots.shape)}")
