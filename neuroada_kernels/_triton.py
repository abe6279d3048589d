"""Optional Triton import: Triton is a Linux-only dependency, and CPU-only installs still work."""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None


def triton_available() -> bool:
    return triton is not None


def use_triton(t: torch.Tensor) -> bool:
    """Triton serves CUDA tensors; CPU tensors go to the torch twins."""
    return triton is not None and t.is_cuda


def interpreter_on() -> bool:
    """True when TRITON_INTERPRET=1, where Triton kernels can run on CPU tensors (tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"
