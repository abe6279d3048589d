"""Giving host memory back to the OS while weights move into one packed buffer (Linux; no-op elsewhere).

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

_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4  # Linux: drop the pages; a private file mapping re-reads them from the file


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
