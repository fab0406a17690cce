"""Give freed heap memory back to the operating system once connections have gone.

Each TLS connection's event loop holds a 256 KiB read buffer (uvloop's SSL protocol, and
the standard loop's) and reads through 256 KiB scratch buffers. glibc's malloc serves
these from its heap once the first such block has been freed (its mmap threshold adapts
upwards), and keeps what they free for reuse. After a peak of N connections the gateway
therefore keeps about N x 256 KiB that it no longer uses: bench/heap.py found 57 MiB free
but kept, against 10 MiB in use, after 200 TLS sessions had ended, and the same figures
after 2,000 more. Nothing leaks, but the resident size follows the highest load, never
the current one, and it creeps up as more of those free pages get touched.

`malloc_trim(0)` hands the free pages back. `TrimPolicy` says when: once the open
connections have fallen by at least `min_drop`, and to half their peak or less since the
last trim. A steady load therefore never pays for it, and a fall after a peak does.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Trimmed:
    """One trim: the peak and open connections it followed, resident memory before and
    after (MiB, None where unknown), and how long the call took."""

    peak: int
    open_now: int
    rss_before_mib: float | None
    rss_after_mib: float | None
    took_ms: float


class TrimPolicy:
    """Sans-I/O: fed the number of open connections, says when to trim."""

    def __init__(self, min_drop: int) -> None:
        if min_drop < 0:
            raise ValueError(f"min_drop must be >= 0, got {min_drop}")
        self.min_drop = min_drop  # 0: never
        self.peak = 0  # most connections open at once since the last trim

    def opened(self, open_now: int) -> None:
        """A connection opened; `open_now` counts it."""
        self.peak = max(self.peak, open_now)

    def due(self, open_now: int) -> bool:
        """True when connections have fallen by at least `min_drop` and to half the peak or
        less; the peak then starts again from `open_now`."""
        self.peak = max(self.peak, open_now)
        if self.min_drop == 0:
            return False
        if self.peak - open_now >= self.min_drop and 2 * open_now <= self.peak:
            self.peak = open_now
            return True
        return False


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


def trim_supported() -> bool:
    """Whether this process's C library can hand free heap memory back (glibc)."""
    return _malloc_trim() is not None


def trim() -> bool:
    """glibc `malloc_trim(0)`: return free heap pages to the system. False where the C
    library has no such call (the policy then only counts)."""
    fn = _malloc_trim()
    if fn is None:
        return False
    fn(0)
    return True


def resident_mib() -> float | None:
    """This process's resident memory (Linux), MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
