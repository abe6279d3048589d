"""Host memory for the weights (Linux; plain allocations and no-ops elsewhere).

Huge pages: a decode step streams every weight once. On 4 KiB pages that is a TLB miss every
4 KiB; weights in memory the kernel is asked to back with transparent huge pages (2 MiB,
`madvise(MADV_HUGEPAGE)`, which is what distributions' default THP mode `madvise` waits for) are
read faster (benchmarks/RESULTS.md). Where THP is off, the advice does nothing.

Giving memory back to the OS while weights move into one packed buffer:

transformers maps a safetensors checkpoint into memory: its weights are file pages that stay
resident (and in RSS) once read, as long as any tensor of the file lives, which the embeddings
and norms do. Weights converted on load (another dtype) are heap memory that glibc keeps for
reuse after they are freed. Packing reads every linear weight once; with these two calls as it
goes, it peaks at the buffer plus about one layer instead of twice the linear weights.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import torch

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4  # Linux: drop the pages; a private file mapping re-reads them from the file
_MADV_HUGEPAGE = 14  # Linux: back this range with transparent huge pages where possible
HUGE_PAGE = 1 << 21  # bytes; the PMD size with 4 KiB base pages (x86-64, arm64)


def huge_page_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor [numel], starting on a 2 MiB boundary and advised onto huge pages
    before any of it is touched (the advice governs how a page is first faulted in). Smaller than
    a huge page, or off Linux: a plain `torch.empty`."""
    nbytes = numel * dtype.itemsize
    if _LIBC is None or nbytes < HUGE_PAGE:
        return torch.empty(numel, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # large: a fresh mapping, not yet faulted in
    skip = -raw.data_ptr() % HUGE_PAGE
    aligned = raw[skip : skip + nbytes]
    _LIBC.madvise(ctypes.c_void_p(aligned.data_ptr()), ctypes.c_size_t(nbytes), _MADV_HUGEPAGE)
    return aligned.view(dtype)


def move_to_huge_pages_(tensor: torch.Tensor) -> None:
    """Give a CPU tensor (a parameter: every module sharing it sees the move) a huge-page copy of its
    data, in place; the old memory is released as file pages or heap (as `drop_file_pages` does)."""
    if tensor.device.type != "cpu" or tensor.numel() * tensor.element_size() < HUGE_PAGE:
        return
    moved = huge_page_empty(tensor.numel(), tensor.dtype).view(tensor.shape)
    moved.copy_(tensor.data)
    old = tensor.data
    address, nbytes = old.data_ptr(), old.numel() * old.element_size()
    mappings = private_file_mappings()
    tensor.data = moved
    del old
    drop_file_pages(address, nbytes, mappings)
    trim_heap()


def private_file_mappings() -> list[tuple[int, int]]:
    """[start, end) address ranges of this process's private file mappings."""
    if _LIBC is None:
        return []
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and fields[5].startswith("/") and fields[1].endswith("p"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                ranges.append((start, end))
    return ranges


def drop_file_pages(address: int, nbytes: int, mappings: list[tuple[int, int]]) -> None:
    """Drop the resident pages wholly inside [address, address + nbytes) when that range lies in a
    private file mapping: they were only read, so the file still holds their content. Call it
    once no tensor uses that memory."""
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > start and any(lo <= start and end <= hi for lo, hi in mappings):
        _LIBC.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc's malloc_trim)."""
    if _LIBC is not None and hasattr(_LIBC, "malloc_trim"):
        _LIBC.malloc_trim(0)
