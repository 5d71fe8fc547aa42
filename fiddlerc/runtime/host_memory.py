"""Host memory for the weights the CPU streams at decode: anonymous memory in transparent huge pages.

A one-token product reads its weight once, front to back, so it runs at memory speed only if the
hardware prefetchers and the TLB keep up; they do better on 2 MiB pages than on 4 KiB ones (where
the kernel allows them: `/sys/kernel/mm/transparent_hugepage/enabled` set to `always` or `madvise`),
by a few percent of decode speed.

The loader uses huge pages only for the copies it makes anyway: a dtype conversion (a bf16 run of an
fp32 checkpoint converts each weight straight into huge pages) and the fused QKV rows. A weight that
needs no copy stays memory-mapped: copying it would cost load time (the page faults of fresh memory,
about a second per GB in a VM) for those few percent.
"""

from __future__ import annotations

import ctypes
import gc
import mmap
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def huge_pages_available() -> bool:
    """Whether this kernel gives transparent huge pages to memory advised for them."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        mode = _THP.read_text()
    except OSError:
        return False
    return "[always]" in mode or "[madvise]" in mode


def host_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous copy of the CPU tensor `t` (in `dtype`, default its own) in its own anonymous
    mapping, aligned to and advised for huge pages. Freed when the last tensor viewing it goes."""
    dtype = dtype or t.dtype
    nbytes = t.numel() * dtype.itemsize
    if nbytes < HUGE_PAGE:  # not one whole huge page: an ordinary allocation is as good
        return torch.empty(t.shape, dtype=dtype).copy_(t)
    mm = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    mm.madvise(mmap.MADV_HUGEPAGE)  # before the first touch, so that the faults allocate huge pages
    raw = torch.frombuffer(mm, dtype=torch.uint8)  # holds a reference to the map
    start = -raw.data_ptr() % HUGE_PAGE
    out = raw[start : start + nbytes].view(dtype).view(t.shape)
    return out.copy_(t)


def return_freed_heap(collect: bool = True) -> None:
    """Give the heap's free memory back to the kernel (glibc's `malloc_trim`; elsewhere nothing). Binding
    weights frees many temporaries of a few MB (dtype conversions, concatenations) that glibc keeps in its
    heap once its adaptive mmap threshold has grown past their size, an eighth of a bf16 model's weight
    bytes resident for nothing. With `collect`, the garbage is collected first: Hugging Face modules whose weights were replaced sit in reference cycles
    until the collector runs."""
    if collect:
        gc.collect()
    try:
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # the symbols this process already has
    except OSError:
        trim = None
    if trim is not None:
        trim(0)
