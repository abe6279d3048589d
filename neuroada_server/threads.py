"""Threads beside the worker: torch on one thread there, and start-up work on a thread of its own.

torch's CPU ops and our C++ kernels run on OpenMP (libgomp). Every thread that runs a parallel
region gets a team of helper threads, kept for as long as that thread lives; once a process's
helpers outnumber its CPUs, libgomp cuts the spinning of every team's threads at their barriers to
almost nothing, so each of the worker's hundred-odd parallel regions a decode step waits on a
futex wake-up instead. One long-lived thread that once ran a parallel torch op (the adapter
loader, a pooled thread that built the engine) made the worker's decode steps about 1.3-1.5x
slower for the rest of the process's life (benchmarks/RESULTS.md).

So the worker thread alone computes in parallel: the loader and the request threads that touch
tensors call `serial_torch` first, and the engine is built on a thread that ends with the build
(the server's, and each Ray replica's).
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")


def serial_torch() -> None:
    """Run this thread's torch ops on this thread alone (OpenMP's thread count is per thread)."""
    torch.get_num_threads()  # torch's own per-thread OpenMP set-up first: it would undo what follows
    set_threads = _omp_set_num_threads()
    if set_threads is not None:
        set_threads(1)


def serially(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn`, calling `serial_torch` first: for work handed to a pooled thread."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> T:
        serial_torch()
        return fn(*args, **kwargs)

    return run


def on_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on a new thread that ends when it returns, taking its OpenMP team with it."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"neuroada-{getattr(fn, '__name__', 'task')}", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


async def in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """`on_own_thread` for a coroutine: a pooled thread waits for it (and computes nothing)."""
    return await asyncio.to_thread(on_own_thread, fn, *args)


@functools.cache
def _omp_set_num_threads() -> Callable[[int], None] | None:
    """`omp_set_num_threads` of the OpenMP runtime loaded in this process (torch's own copy, found in
    the process's mappings: loading one by name could start a second runtime). None elsewhere."""
    try:
        for line in Path("/proc/self/maps").read_text().splitlines():
            fields = line.split(maxsplit=5)  # address, perms, offset, device, inode[, path]
            path = fields[5] if len(fields) == 6 else ""
            if Path(path).name.startswith(("libgomp", "libomp", "libiomp")):
                return ctypes.CDLL(path).omp_set_num_threads
    except (OSError, AttributeError):
        pass
    return None
