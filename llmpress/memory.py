"""Process memory: the peak and current resident set, what is free, and handing freed heap
memory back to the OS."""

from __future__ import annotations

import functools
import resource
from pathlib import Path
from typing import Callable

MIB = 2**20


def peak_rss_mb() -> float:
    """This process's peak resident set so far, MiB (reported as MB in tables). Linux's
    VmHWM, which starts afresh in a new program; ``ru_maxrss`` survives exec, so a command
    started by a big process would report its parent's peak."""
    hwm = _meminfo("/proc/self/status", "VmHWM:")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def _meminfo(path: str, key: str) -> float | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024 / MIB
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_mb() -> float:
    """This process's resident set now, MiB (Linux /proc; 0 where unavailable)."""
    return _meminfo("/proc/self/status", "VmRSS:") or 0.0


def available_mb() -> float | None:
    """Host memory a new allocation can still get (MemAvailable), MiB, or None where unknown."""
    return _meminfo("/proc/meminfo", "MemAvailable:")


def release_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). The
    per-layer solves free many large temporaries; without this the resident set keeps them as
    heap fragments and peak memory grows with the number of layers, not with their size."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        import ctypes
        import ctypes.util

        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
