"""`gateway.pending.PendingQueue` behaves as `asyncio.Queue` does for what the connection
uses: order, bounds, waiting getters and putters, and no wake-up lost to a cancellation.
Each scenario runs on both, and both must agree."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.pending import PendingQueue


def make(kind: str, maxsize: int) -> Any:
    if kind == "asyncio":
        return asyncio.Queue(maxsize)
    return PendingQueue(maxsize, asyncio.get_running_loop())


KINDS = ["asyncio", "pending"]


async def settle() -> None:
    for _ in range(5):  # let woken tasks run (no time passes; only the loop turns)
        await asyncio.sleep(0)


@pytest.mark.parametrize("kind", KINDS)
async def test_fifo_and_bounds(kind: str) -> None:
    q = make(kind, 2)
    assert q.empty() and not q.full() and q.qsize() == 0
    q.put_nowait(1)
    q.put_nowait(2)
    assert q.full() and q.qsize() == 2
    with pytest.raises(asyncio.QueueFull):
        q.put_nowait(3)
    assert [q.get_nowait(), q.get_nowait()] == [1, 2]
    with pytest.raises(asyncio.QueueEmpty):
        q.get_nowait()


@pytest.mark.parametrize("kind", KINDS)
async def test_a_getter_waits_for_an_item(kind: str) -> None:
    q = make(kind, 2)
    task = asyncio.create_task(q.get())
    await settle()
    assert not task.done()
    q.put_nowait("x")
    assert await task == "x"


@pytest.mark.parametrize("kind", KINDS)
async def test_putters_wait_for_room_and_go_in_order(kind: str) -> None:
    q = make(kind, 1)
    q.put_nowait(0)
    putters = [asyncio.create_task(q.put(i)) for i in (1, 2, 3)]
    await settle()
    assert not any(p.done() for p in putters)
    got = []
    for _ in range(4):
        got.append(await q.get())
        await settle()
    assert got == [0, 1, 2, 3]
    assert all(p.done() for p in putters)


@pytest.mark.parametrize("kind", KINDS)
async def test_a_putter_cancelled_after_its_wake_up_passes_it_on(kind: str) -> None:
    q = make(kind, 1)
    q.put_nowait(0)
    first = asyncio.create_task(q.put(1))
    second = asyncio.create_task(q.put(2))
    await settle()
    assert q.get_nowait() == 0  # wakes `first`...
    first.cancel()  # ...which is cancelled before it runs: `second` must get the room
    await settle()
    assert first.cancelled()
    assert second.done()
    assert q.get_nowait() == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_a_cancelled_getter_loses_no_item(kind: str) -> None:
    q = make(kind, 4)
    first = asyncio.create_task(q.get())
    second = asyncio.create_task(q.get())
    await settle()
    q.put_nowait("a")  # wakes `first`...
    first.cancel()  # ...cancelled before it runs: `second` takes the item
    await settle()
    assert first.cancelled()
    assert await second == "a"
    assert q.empty()


async def test_maxsize_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="maxsize"):
        PendingQueue(0, asyncio.get_running_loop())
