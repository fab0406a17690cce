"""The load generator's pacer (shared/loadtest.py): every frame is sent, never before it
is due, and with a tick the pacer wakes at most once per tick however many are due."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from typing import cast

import pytest

from shared.loadtest import Pacer, Stream


class Paced:
    """Stands in for a session's `Stream`: frames due every `period_s` from `start`."""

    def __init__(self, start: float, period_s: float, frames: int, done: asyncio.Event) -> None:
        self.start, self.period_s, self.frames = start, period_s, frames
        self.sent: list[tuple[float, float]] = []  # (due, sent)
        self.done = done

    def due(self, k: int) -> float:
        return self.start + k * self.period_s

    async def pump(self, now: float) -> float | None:
        while len(self.sent) < self.frames:
            due = self.due(len(self.sent))
            if due > now:
                return due
            self.sent.append((due, time.monotonic()))
        self.done.set()
        return None


async def run(tick_s: float, streams: int) -> tuple[Pacer, list[Paced], float]:
    pacer = Pacer(tick_s)
    t0 = time.monotonic()
    events = [asyncio.Event() for _ in range(streams)]
    paced = [Paced(t0 + i * 0.0007, 0.01, 8, events[i]) for i in range(streams)]
    for p in paced:
        pacer.schedule(p.start, cast(Stream, p))
    task = asyncio.create_task(pacer.run())
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 30)
    elapsed = time.monotonic() - t0
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return pacer, paced, elapsed


@pytest.mark.parametrize("tick_s", [0.0, 0.02])
async def test_every_frame_is_sent_and_never_early(tick_s: float) -> None:
    _, paced, _ = await run(tick_s, 30)
    for p in paced:
        assert len(p.sent) == p.frames
        assert all(sent >= due for due, sent in p.sent)


async def test_a_tick_bounds_the_wakeups() -> None:
    pacer, _, elapsed = await run(0.02, 30)
    # 30 sessions x 8 frames, 240 distinct due times: one wake-up per tick at most, plus
    # the first (`schedule` wakes it too, but here it is only called before the start).
    assert pacer.wakeups <= math.floor(elapsed / 0.02) + 2, (pacer.wakeups, elapsed)
