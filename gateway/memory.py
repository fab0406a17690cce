"""Keep the gateway's memory to what its connections use, and give back what they freed.

Where it went: each TLS connection's event loop holds a 256 KiB read buffer (uvloop's SSL
protocol, and the standard loop's), and for an application protocol that is a plain
`asyncio.Protocol` every read of decrypted data goes through a 256 KiB block, shrunk to
what was read. glibc's malloc maps blocks that large on their own at first, but each one
freed raises its mmap threshold, after which they come from the heap, and the heap keeps
what they free. A heap census of the idle gateway (bench/heap.py) found nothing alive
that should not be, but 57 MiB free and kept after 200 TLS sessions (10 MiB in use), and
the resident size creeping up as those pages were touched again.

What the gateway does about it:

1. Its connection's transport reads through a `BufferedReads` (gateway/wsconn.py):
   decrypted data goes straight into a small buffer of the connection's own, with no
   block per read, on uvloop as on the standard loop.
2. `fix_mmap_threshold`, at start: the threshold stays at 128 KiB, so each connection's
   256 KiB SSL buffer is mapped on its own, resident only where written (a few KiB), and
   unmapped when the connection closes.
3. `TrimPolicy` and `trim`: once the open connections have fallen by at least
   `heap_trim_drop` and to half their peak since the last trim or less, or to none,
   `malloc_trim(0)` hands the free heap pages back, whatever kept them. A steady load
   never pays for it.

2 and 3 need glibc; elsewhere the gateway neither fixes the threshold nor trims.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
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
        less, or when the last one has closed (a small gateway's fall is never `min_drop`);
        the peak then starts again from `open_now`."""
        self.peak = max(self.peak, open_now)
        if self.min_drop == 0:
            return False
        if open_now == 0 and self.peak > 0:
            self.peak = 0
            return True
        if self.peak - open_now >= self.min_drop and 2 * open_now <= self.peak:
            self.peak = open_now
            return True
        return False


@functools.cache
def glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (Linux), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


#: glibc's `mallopt` parameter for the size from which a block is mapped on its own.
_M_MMAP_THRESHOLD = -3
#: The gateway's: the 256 KiB buffer the event loop's SSL layer keeps per TLS connection
#: is then always mapped on its own, resident only where written (a few KiB) and
#: unmapped when the connection closes. glibc's own default starts at 128 KiB but adapts
#: upwards as such blocks are freed, after which they come from the heap and stay there.
MMAP_THRESHOLD_BYTES = 128 * 1024


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """glibc `mallopt(M_MMAP_THRESHOLD, nbytes)`: blocks of at least `nbytes` are mapped
    on their own, and the threshold stops adapting. Process-wide; False where the C
    library is not glibc (nothing changes)."""
    libc = glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(ctypes.c_int(_M_MMAP_THRESHOLD), ctypes.c_int(nbytes)))


def trim_supported() -> bool:
    """Whether this process's C library can hand free heap memory back (glibc)."""
    return glibc() is not None


def trim() -> bool:
    """glibc `malloc_trim(0)`: return free heap pages to the system. False where the C
    library has no such call (the policy then only counts)."""
    libc = glibc()
    if libc is None:
        return False
    libc.malloc_trim(ctypes.c_size_t(0))
    return True


def resident_mib() -> float | None:
    """This process's resident memory (Linux), MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1 << 20)
