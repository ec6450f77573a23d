"""Returning freed memory to the operating system.

PyTorch's CPU allocator uses the C library's ``malloc``. glibc keeps freed blocks below its (dynamic, up to
32 MB) mmap threshold in the heap, so a process that allocates and frees many [D, D] work matrices keeps their
sum resident unless the heap is trimmed. The merge engine trims after each large space and after the
statistics pass.
"""

from __future__ import annotations

import ctypes
import functools


def release_freed_memory() -> None:
    """Hand memory freed by the sweep's temporaries back to the OS (glibc keeps freed blocks below its mmap
    threshold in the heap, so a process's RSS would otherwise stay at the sum of every sweep's temporaries)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None
