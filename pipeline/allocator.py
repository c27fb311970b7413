"""glibc's allocator told to keep freed memory, as the Makefile's ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``.

With glibc's defaults every large buffer (a batch of decoded tiles, each layer's activations) is a fresh
``mmap`` that is unmapped when freed, so every batch page-faults its memory back in: measured ~2.8x slower tile
extraction on 2 cores (docs/benchmarks.md). :func:`keep_freed_memory` makes the ``histofuse`` process (and the
processes it starts) allocate from the heap and never trim it. Its peak RSS grew with the slide's tile count at
64-tile batches; at the CPU default of 32 it stays flat (measured on the bench slide). A user who set either
variable keeps their own setting; on a C library without ``mallopt`` nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_TRIM = 2**31 - 1  # mallopt takes an int: the largest (the Makefile's 1e11 through the environment)


def keep_freed_memory() -> bool:
    """Apply the setting to this process (``mallopt``) and its children (the environment); False if not applied."""
    if any(v in os.environ for v in VARS):
        return False  # the user's own choice
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): its allocator, its defaults
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(_M_MMAP_MAX, 0) != 1 or mallopt(_M_TRIM_THRESHOLD, _TRIM) != 1:
        log.debug("mallopt refused the allocator setting")
        return False
    os.environ.update({"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(_TRIM)})
    return True
