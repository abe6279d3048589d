"""In-place apply / restore of sparse deltas into weights.

`apply_delta_` writes `w[i, idx[i, j]] = round(float32(w) + float32(v))` and saves the old
weights; `restore_` copies them back. Restore is a copy, never a subtraction, so it is exact in
every dtype (bf16 `w + d - d != w`).

Each operation has a flat form over a 1-D buffer and precomputed int64 offsets. The flat form
lets a whole model whose target weights live in one buffer be switched with one launch (CUDA) or
one C++ loop (CPU; the torch twin where the C++ kernels are not built), rather than one per layer.
The flat forms check that offsets lie in the buffer unless told not to (check_ranges=False, for
offsets derived once from validated indices, as `PackedWeights` does).
"""

from __future__ import annotations

from typing import Literal

import torch

from neuroada_kernels._triton import tl, triton, use_triton
from neuroada_kernels.cpu import cpu_kernels
from neuroada_kernels.reference import BITS_DTYPE, apply_delta_flat_ref_, reapply_delta_flat_ref_, restore_flat_ref_

Backend = Literal["auto", "torch", "triton", "cpu"]

WEIGHT_DTYPES = tuple(BITS_DTYPE)
INDEX_DTYPES = (torch.int16, torch.int32, torch.int64)
_BLOCK = 1024


if triton is not None:

    @triton.jit
    def _apply_delta_kernel(buf_ptr, off_ptr, val_ptr, saved_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        off = tl.load(off_ptr + i, mask=mask, other=0)
        w = tl.load(buf_ptr + off, mask=mask)
        tl.store(saved_ptr + i, w, mask=mask)
        v = tl.load(val_ptr + i, mask=mask, other=0.0).to(tl.float32)
        merged = (w.to(tl.float32) + v).to(buf_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(buf_ptr + off, merged, mask=mask)

    @triton.jit
    def _reapply_delta_kernel(buf_ptr, off_ptr, val_ptr, saved_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        off = tl.load(off_ptr + i, mask=mask, other=0)
        w = tl.load(saved_ptr + i, mask=mask)
        v = tl.load(val_ptr + i, mask=mask, other=0.0).to(tl.float32)
        merged = (w.to(tl.float32) + v).to(buf_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(buf_ptr + off, merged, mask=mask)

    @triton.jit
    def _restore_kernel(buf_ptr, off_ptr, saved_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = i < n
        off = tl.load(off_ptr + i, mask=mask, other=0)
        tl.store(buf_ptr + off, tl.load(saved_ptr + i, mask=mask), mask=mask)


def flat_offsets(indices: torch.Tensor, d_in: int, start: int = 0) -> torch.Tensor:
    """Flat int64 positions `start + i * d_in + indices[i, j]`, row-major over [d_out, k]."""
    _check(indices.dim() == 2, f"indices must be 2-D [d_out, k], got shape {tuple(indices.shape)}")
    _check(indices.dtype in INDEX_DTYPES, f"indices dtype must be int16/int32/int64, got {indices.dtype}")
    rows = torch.arange(indices.shape[0], device=indices.device, dtype=torch.int64)
    return (indices.to(torch.int64) + (rows * d_in + start)[:, None]).reshape(-1)


def apply_delta_flat_(
    buffer: torch.Tensor,  # [N]
    offsets: torch.Tensor,  # [n] int64, unique
    values: torch.Tensor,  # [n]
    saved: torch.Tensor,  # [n] buffer.dtype
    backend: Backend = "auto",
    check_ranges: bool = True,
) -> None:
    _check_flat(buffer, offsets, saved, values)
    cpu = lambda k: k.switch_weights_(buffer, offsets, values, saved, True, check_ranges)  # noqa: E731
    _dispatch("_apply_delta_kernel", apply_delta_flat_ref_, cpu, backend, buffer, offsets, values, saved)


def reapply_delta_flat_(
    buffer: torch.Tensor,  # [N]
    offsets: torch.Tensor,  # [n] int64, unique
    values: torch.Tensor,  # [n]
    saved: torch.Tensor,  # [n] buffer.dtype, the original weights at offsets
    backend: Backend = "auto",
    check_ranges: bool = True,
) -> None:
    """`buffer[offsets] = round(saved + values)`, reading no weight.

    Switching between two adapters with the same offsets (same index set, as magnitude selection
    gives every adapter of a base) is then one scatter instead of restore + gather + scatter; the
    originals stay in `saved`, so a later restore_flat_ is still exact.
    """
    _check_flat(buffer, offsets, saved, values)
    cpu = lambda k: k.switch_weights_(buffer, offsets, values, saved, False, check_ranges)  # noqa: E731
    _dispatch("_reapply_delta_kernel", reapply_delta_flat_ref_, cpu, backend, buffer, offsets, values, saved)


def restore_flat_(
    buffer: torch.Tensor,  # [N]
    offsets: torch.Tensor,  # [n] int64
    saved: torch.Tensor,  # [n] buffer.dtype
    backend: Backend = "auto",
    check_ranges: bool = True,
) -> None:
    _check_flat(buffer, offsets, saved)
    cpu = lambda k: k.restore_weights_(buffer, offsets, saved, check_ranges)  # noqa: E731
    _dispatch("_restore_kernel", restore_flat_ref_, cpu, backend, buffer, offsets, saved)


def apply_delta_(
    weight: torch.Tensor,  # [d_out, d_in]
    indices: torch.Tensor,  # [d_out, k], unique within each row
    values: torch.Tensor,  # [d_out, k]
    saved: torch.Tensor,  # [d_out, k] weight.dtype, receives the original weights
    backend: Backend = "auto",
) -> None:
    """Add `values` into `weight` at `indices` in place, saving the old weights into `saved`."""
    _check_layer(weight, indices, saved, values)
    offsets = flat_offsets(indices, weight.shape[1])
    apply_delta_flat_(weight.view(-1), offsets, values.reshape(-1), saved.view(-1), backend)


def restore_(
    weight: torch.Tensor,  # [d_out, d_in]
    indices: torch.Tensor,  # [d_out, k]
    saved: torch.Tensor,  # [d_out, k] from apply_delta_
    backend: Backend = "auto",
) -> None:
    """Put the weights saved by `apply_delta_` back, bit for bit."""
    _check_layer(weight, indices, saved)
    offsets = flat_offsets(indices, weight.shape[1])
    restore_flat_(weight.view(-1), offsets, saved.view(-1), backend)


def _dispatch(
    kernel_name: str, reference, cpu_call, backend: Backend, buffer: torch.Tensor, offsets: torch.Tensor, *rest
) -> None:
    """Run the Triton kernel (one launch over all n entries), the C++ CPU kernel (`cpu_call`,
    given the compiled module) or the torch twin (`reference`, same arguments)."""
    if backend == "cpu" or (backend == "auto" and buffer.device.type == "cpu"):
        kernels = cpu_kernels() if buffer.device.type == "cpu" else None
        if kernels is not None:
            cpu_call(kernels)
            return
        if backend == "cpu":
            raise RuntimeError("backend='cpu' needs CPU tensors and the C++ kernels built")
    if not _pick_triton(buffer, backend):
        reference(buffer, offsets, *rest)
        return
    n = offsets.numel()
    if n:  # kernels are looked up by name: they exist only where triton is installed
        globals()[kernel_name][(triton.cdiv(n, _BLOCK),)](buffer, offsets, *rest, n, BLOCK=_BLOCK)


def _pick_triton(buffer: torch.Tensor, backend: Backend) -> bool:
    if backend == "torch":
        return False
    if backend == "triton":
        if triton is None:
            raise RuntimeError("backend='triton' asked for, but triton is not installed")
        return True
    return use_triton(buffer)


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


def _check_flat(
    buffer: torch.Tensor, offsets: torch.Tensor, saved: torch.Tensor, values: torch.Tensor | None = None
) -> None:
    _check(buffer.dtype in WEIGHT_DTYPES, f"weight dtype must be float32/bfloat16/float16, got {buffer.dtype}")
    _check(buffer.dim() == 1 and buffer.is_contiguous(), "buffer must be a contiguous 1-D tensor")
    _check(offsets.dtype == torch.int64, f"offsets must be int64, got {offsets.dtype}")
    _check(offsets.dim() == 1, "offsets must be 1-D")
    _check(saved.dtype == buffer.dtype, f"saved dtype {saved.dtype} must equal weight dtype {buffer.dtype}")
    _check(saved.shape == offsets.shape and saved.is_contiguous(), "saved must be contiguous, shaped like offsets")
    tensors = [buffer, offsets, saved]
    if values is not None:
        _check(values.is_floating_point(), f"values must be floating point, got {values.dtype}")
        _check(
            values.shape == offsets.shape and values.is_contiguous(), "values must be contiguous, shaped like offsets"
        )
        tensors.append(values)
    devices = {t.device for t in tensors}
    _check(len(devices) == 1, f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_layer(
    weight: torch.Tensor, indices: torch.Tensor, saved: torch.Tensor, values: torch.Tensor | None = None
) -> None:
    _check(weight.dim() == 2 and weight.is_contiguous(), "weight must be a contiguous 2-D [d_out, d_in] tensor")
    _check(indices.dim() == 2, f"indices must be 2-D [d_out, k], got shape {tuple(indices.shape)}")
    _check(
        indices.shape[0] == weight.shape[0],
        f"indices has {indices.shape[0]} rows, weight has d_out={weight.shape[0]}",
    )
    _check(saved.shape == indices.shape, f"saved shape {tuple(saved.shape)} != indices shape {tuple(indices.shape)}")
    if values is not None:
        _check(
            values.shape == indices.shape,
            f"values shape {tuple(values.shape)} != indices shape {tuple(indices.shape)}",
        )
