"""Process-wide settings for the long-running commands (gateway, worker, loadtest)."""

from __future__ import annotations

import gc

#: Net container allocations between two young-generation collections (CPython's default
#: is 700). An event loop serving hundreds of connections makes and drops futures, tasks
#: and frames by the thousand per second; nearly all are freed by reference counting, yet
#: at the default threshold the cyclic collector ran hundreds of times a second and took
#: about 6% of the gateway's CPU under load (py-spy --native, 300 sessions).
GC_GEN0_THRESHOLD = 20_000


def tune_gc() -> None:
    """Leave everything made while starting up (modules, config, models) out of future
    collections, and collect the young generation less often. Cycles are still collected:
    later, and in larger batches."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)
