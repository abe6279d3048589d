"""The C++ CPU kernels (`kernels/csrc/sparse_cpu.cpp`), built on first use by torch's extension loader.

The build needs a C++ compiler and takes about a minute once; torch caches it (in
TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions) for every later process. Where it cannot
be built, or NEUROADA_CPU_KERNELS=0, the CPU runs the torch twins in `kernels.reference`.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "sparse_cpu.cpp"


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None where it is switched off or cannot be built (logged once)."""
    if os.environ.get("NEUROADA_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        log.info("loading the C++ CPU kernels (the first time builds them, about 30 s)")
        # -march=native: the module is built where it runs, so it may use that CPU's vector width.
        return load(
            name="neuroada_sparse_cpu",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-loop-unroll-and-jam", "-fno-loop-interchange"],
            extra_ldflags=["-fopenmp"],
        )
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch path still works
        log.warning("C++ CPU kernels unavailable, using the torch path: %s", exc)
        return None


def use_cpu_kernels(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and cpu_kernels() is not None
