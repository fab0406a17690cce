"""A connection's pending queue: the client's frames and commands on their way to Redis.

The part of `asyncio.Queue` the connection uses (bounded, FIFO, `put` waits for room,
`get` waits for an item, the same wake-up order and cancellation handling), built on the
connection's own event loop. `asyncio.Queue` looks the running loop up each time a getter
or putter waits, and on Python 3.11 that is a `getpid()` system call: the writer task
waits on its queue once per frame, so with a thousand connections that was thousands of
system calls a second for nothing.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PendingQueue(Generic[T]):
    def __init__(self, maxsize: int, loop: asyncio.AbstractEventLoop) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be >= 1, got {maxsize}")
        self.maxsize = maxsize
        self._loop = loop
        self._items: collections.deque[T] = collections.deque()
        self._getters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._putters: collections.deque[asyncio.Future[None]] = collections.deque()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def full(self) -> bool:
        return len(self._items) >= self.maxsize

    def peek(self) -> T:
        """The oldest item, left in the queue."""
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items[0]

    def put_nowait(self, item: T) -> None:
        if self.full():
            raise asyncio.QueueFull
        self._items.append(item)
        self._wake_next(self._getters)

    def get_nowait(self) -> T:
        if not self._items:
            raise asyncio.QueueEmpty
        item = self._items.popleft()
        self._wake_next(self._putters)
        return item

    async def put(self, item: T) -> None:
        while self.full():
            await self._wait(self._putters, lambda: not self.full())
        self.put_nowait(item)

    async def get(self) -> T:
        while not self._items:
            await self._wait(self._getters, lambda: bool(self._items))
        return self.get_nowait()

    async def _wait(
        self, waiters: collections.deque[asyncio.Future[None]], ready: Callable[[], bool]
    ) -> None:
        fut = self._loop.create_future()
        waiters.append(fut)
        try:
            await fut
        except BaseException:
            fut.cancel()  # in case it was not done yet
            try:
                waiters.remove(fut)
            except ValueError:
                pass
            if ready() and not fut.cancelled():
                # It was woken and then cancelled: pass the wake-up on, not lose it.
                self._wake_next(waiters)
            raise

    @staticmethod
    def _wake_next(waiters: collections.deque[asyncio.Future[None]]) -> None:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
