"""The C++ CPU kernels (`neuroada_kernels/csrc/`), built on first use by torch's extension loader.

The build needs a C++ compiler and takes about 30 s once; the result is cached (under
TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions, one build per python, torch and CPU
kind) for every later process. Where it cannot
be built, or NEUROADA_CPU_KERNELS=0, the CPU runs the torch twins in `neuroada_kernels.reference`.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCES = [
    Path(__file__).parent / "csrc" / name
    for name in ("sparse_cpu.cpp", "decode_linear.cpp", "rms_norm.cpp", "decode_attention.cpp", "decode_layers.cpp")
]
_NAME = "neuroada_sparse_cpu"


@functools.cache
def cpu_kernels() -> ModuleType | None:
    """The compiled module, or None where it is switched off or cannot be built (logged once)."""
    if os.environ.get("NEUROADA_CPU_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        build_dir = build_directory()
        log.info("loading the C++ CPU kernels (the first time builds them, about 30 s)")
        with build_lock(build_dir):
            # -march=native: the module is built where it runs, so it may use that CPU's vector width.
            # GCC's -O3 unroll-and-jam turned a vectorised token loop scalar (several times slower): off.
            return load(
                name=_NAME,
                sources=[str(p) for p in _SOURCES],
                build_directory=str(build_dir),
                extra_cflags=["-O3", "-march=native", "-fopenmp", "-fno-loop-unroll-and-jam", "-fno-loop-interchange"],
                extra_ldflags=["-fopenmp"],
            )
    except Exception as exc:  # no compiler, no ninja, a failed build: the torch path still works
        log.warning("C++ CPU kernels unavailable, using the torch path: %s", exc)
        return None


def build_directory() -> Path:
    """One build per Python, torch, environment and CPU kind. torch rebuilds a module whose build
    flags changed, and its include paths are the environment's own: two environments sharing one
    directory (a project venv and a CI venv) would rebuild each other's module at every switch."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    env = hashlib.sha256(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:8]
    return Path(root) / f"{_NAME}_{python}_torch{torch.__version__}_env{env}_cpu{cpu_tag()}"


@functools.cache
def cpu_tag() -> str:
    """A short hash of the CPU's model and feature flags.

    -march=native code may use instructions only that CPU kind has (AVX-512 here), so a cache
    directory shared by different machines (an NFS home) keeps one build per kind rather than
    handing one machine's build to another, where it would die of an illegal instruction.
    """
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        key = "\n".join(next((line for line in lines if line.startswith(f)), "") for f in ("model name", "flags"))
    except OSError:
        key = ""
    key = key or f"{platform.machine()} {platform.processor()}"
    return hashlib.sha256(key.encode()).hexdigest()[:8]


@contextlib.contextmanager
def build_lock(build_dir: Path) -> Iterator[None]:
    """Held around torch's build and load of `build_dir`; one process at a time, waiting for a live one.

    torch's own lock is a file (`lock`) created for a build and deleted after it: a process killed
    in between leaves it behind, and every later process would wait on it forever. This lock is an
    flock, which the OS drops when its holder dies; torch's file is only ever made under it, so one
    found while holding it was left by a dead build, and is removed.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / "build.flock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        left_behind = build_dir / "lock"
        if left_behind.exists():
            log.warning("removing the build lock of an interrupted build: %s", left_behind)
            left_behind.unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(held, fcntl.LOCK_UN)


def use_cpu_kernels(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and cpu_kernels() is not None
