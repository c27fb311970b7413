"""The histofuse process keeps freed memory in glibc's heap (no mmap per large buffer) unless the user chose."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import ctypes, ctypes.util, os, sys
    import numpy as np
    from pipeline.allocator import keep_freed_memory

    class Info(ctypes.Structure):  # glibc's struct mallinfo2
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "mallinfo2"):
        print("no-mallinfo2"); sys.exit(0)
    libc.mallinfo2.restype = Info
    applied = keep_freed_memory()
    before = libc.mallinfo2().hblkhd
    a = np.ones(64 << 20, np.uint8)  # 64 MiB: glibc's default puts it in its own mmap
    mapped = libc.mallinfo2().hblkhd - before
    print(applied, mapped >= a.nbytes, os.environ.get("MALLOC_MMAP_MAX_"))
    """
)


def _probe(**env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    if out.stdout.strip() == "no-mallinfo2":
        pytest.skip("not glibc >= 2.33")
    return out.stdout.strip()


def test_large_buffers_come_from_the_heap_and_children_inherit_the_setting():
    assert _probe() == "True False 0"  # applied: the 64 MiB buffer is not an mmap; set for child processes


def test_a_user_setting_wins():
    assert _probe(MALLOC_MMAP_MAX_="65536") == "False True 65536"  # theirs (glibc's default): mmapped as usual
