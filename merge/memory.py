"""The process's memory policy while a merge runs: freed tensor memory is kept for the next tensor (glibc), and
Python's cycle collector waits until the merge ends.

A merge allocates and frees the same few tensor sizes thousands of times. By default glibc serves blocks above its
mmap threshold (128 KiB at start, raised as blocks are freed, at most 32 MiB) with fresh mmap'd pages, so every
large temporary page-faults its way in again: a third to a half of the compute time of model_stock, arcee_fusion,
sce and karcher on the 0.89B benchmark, whose layer tensors' float32 copies are 46 MB. Inside `merge_memory`
blocks up to 96 MiB come from the heap, and freed heap memory is returned to the system above 64 MiB at the top.
Larger blocks (a 65M-entry embedding's temporaries: 125-500 MiB) stay mmap'd: on the heap, the holes they leave
that the next, larger block cannot use stay resident, and DELLA's peak rose from 2.8 to 3.1-3.9 GB (3.8 GB with a
1 GiB threshold, 3.1-3.4 GB with 128 MiB; 2.8 GB with 96 MiB). On leaving, the mmap threshold goes to 32 MiB
(where glibc's adaptive policy settles once a process has freed a 32 MiB block) and the free memory is returned
to the system.

Every torch op allocates Python objects, so the cycle collector runs thousands of times during a merge, and its
full passes walk every object the process holds (numba's, torch's): 3-4% of model_stock's CPU time in a profile.
Tensors are freed by reference counting, not by the collector, so it is paused inside `merge_memory` and resumed
when the last merge running ends (not forced to run then: a full collection in a large process costs tens of ms,
which a thousand small merges in one test process would pay a thousand times). Numbers are unaffected: only where
tensors live changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import platform
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 96 << 20  # blocks below this come from the heap inside a merge (a layer's temporaries)
TRIM_THRESHOLD = 64 << 20  # free memory above this at the heap top goes back (glibc's settled adaptive value)
MMAP_AFTER = 32 << 20  # after a merge: glibc's largest adaptive mmap threshold
_lock = threading.Lock()
_active = 0  # merges inside merge_memory (a search runs several at once): the last one out restores
_collecting = True  # whether the cycle collector ran before the first merge in


@cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextmanager
def merge_memory() -> Iterator[None]:
    """Large temporaries reuse freed heap memory (glibc only) and the cycle collector pauses while the block runs."""
    global _active, _collecting
    libc = _glibc()
    with _lock:
        if _active == 0:
            _collecting = gc.isenabled()
            gc.disable()
            if libc is not None:
                libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        _active += 1
    try:
        yield
    finally:
        with _lock:
            _active -= 1
            if _active == 0:
                if _collecting:
                    gc.enable()
                if libc is not None:
                    libc.mallopt(M_MMAP_THRESHOLD, MMAP_AFTER)
                    libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
                    libc.malloc_trim(0)
