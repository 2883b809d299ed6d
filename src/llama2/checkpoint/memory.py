"""Keeping a process's resident memory near what it holds while it streams big tensors through."""

from __future__ import annotations

import ctypes
import functools
import mmap
import sys

from torch import Tensor


def release_pages(t: Tensor) -> None:
    """Ask the kernel to drop `t`'s resident pages (Linux `madvise(MADV_PAGEOUT)`), once it is consumed.

    For a memory-mapped file the pages are re-read on the next access, so this only lowers the
    resident set; for anonymous memory without swap it does nothing. Used on source tensors that
    were converted (dtype, quantization), so a whole checkpoint never becomes resident.
    """
    if t.device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    storage = t.untyped_storage()
    start, nbytes = storage.data_ptr(), storage.nbytes()
    page = mmap.PAGESIZE
    lo = -(-start // page) * page
    hi = (start + nbytes) // page * page
    if hi > lo:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_PAGEOUT)


def trim_heap() -> None:
    """`malloc_trim(0)` (glibc): return freed heap memory to the OS.

    glibc raises its mmap threshold after large frees, so per-tensor temporaries of a few MB land
    on the heap and, without this, stay resident after being freed.
    """
    if sys.platform.startswith("linux"):
        trim = getattr(_libc(), "malloc_trim", None)
        if trim is not None:
            trim(0)


_MADV_PAGEOUT = 21  # linux/mman.h (Linux >= 5.4); older kernels answer EINVAL, which is harmless


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)
