"""Group commit: calls from many callers, sent to Redis together.

Used by the gateway (each connection's audio and results re-reads) and the worker (each
session's interims and finals). At real time each caller nearly always has one thing to
send at a time, so one Redis call per caller meant one round trip (and its system calls
and wake-ups) per call.
`GroupCommit` collects every call made while the previous batch was in flight (or during
the same event-loop turn) and hands them to `send_many` as one batch, one batch at a time:
batches grow with load and cost nothing in latency when the load is light.

What does not change for a caller:
- its call returns only after `send_many` answered for it;
- its order: a caller awaits each call before making the next, so one caller never has
  two calls in one batch or in two batches at once;
- its errors: `send_many` returns an exception in a call's place to fail only that call;
  if `send_many` raises (a connection error: nothing is known about any call), every
  caller of that batch gets the exception (and retries, the calls being idempotent);
- back-pressure: a caller has at most one call here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from shared.metrics import ROUND_TRIP_BOUNDS_S, Histogram

Req = TypeVar("Req")
Res = TypeVar("Res")


class BatcherClosed(Exception):
    """A call after `close`: the process is shutting down."""


class GroupCommit(Generic[Req, Res]):
    def __init__(
        self,
        send_many: Callable[[list[Req]], Awaitable[Sequence[Res | BaseException]]],
        *,
        name: str,
        max_calls: int,
        weight: Callable[[Req], int] | None = None,
        max_weight: int | None = None,
    ) -> None:
        """`max_calls` bounds a batch; with `weight`, so does `max_weight` (a single
        call heavier than it still goes, alone)."""
        if max_calls < 1:
            raise ValueError(f"max_calls must be >= 1, got {max_calls}")
        if max_weight is not None and max_weight < 1:
            raise ValueError(f"max_weight must be >= 1, got {max_weight}")
        self._send_many = send_many
        self._name = name
        self._max_calls = max_calls
        self._weight = weight
        self._max_weight = max_weight
        self._queue: list[tuple[Req, asyncio.Future[Res]]] = []
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        #: Batches sent and calls carried, for metrics and tests.
        self.pipelines = 0
        self.calls = 0
        #: Each answered batch's round trip (`send_many`), seconds, for `/metrics`.
        self.round_trip = Histogram(ROUND_TRIP_BOUNDS_S)

    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name=self._name)

    async def call(self, request: Req) -> Res:
        """`send_many([request])[0]`, sent with whatever other callers send meanwhile
        (`BatcherClosed` after `close`: `submit`'s future is already failed then)."""
        return await self.submit(request)

    def submit(self, request: Req) -> asyncio.Future[Res]:
        """`call` without a coroutine: the future of the call's result, for a caller that
        goes on in a done-callback instead of awaiting in a task (the same guarantees;
        cancelling the future leaves the call out of its batch if not yet sent). After
        `close`, a future already failed with `BatcherClosed`."""
        if self._closed:  # (never starting the batcher again)
            closed: asyncio.Future[Res] = asyncio.get_running_loop().create_future()
            closed.set_exception(BatcherClosed("shutting down"))
            return closed
        if self._loop is None:
            self.start()
        assert self._loop is not None
        # The loop the batcher started on, not asyncio.get_running_loop(): on Python 3.11
        # that costs a getpid() system call, and the gateway calls this once per frame.
        fut: asyncio.Future[Res] = self._loop.create_future()
        self._queue.append((request, fut))
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        return fut

    async def close(self) -> None:
        """Stop; calls still waiting fail with `BatcherClosed` (a batch in flight is
        cancelled: its callers see the cancellation and, their calls being idempotent,
        lose nothing that a retry would not redo)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(self._queue, BatcherClosed("shutting down"))
        self._queue = []

    async def _run(self) -> None:
        assert self._loop is not None
        while True:
            if not self._queue:
                self._wake = self._loop.create_future()
                try:
                    await self._wake
                finally:
                    self._wake = None
            batch = self._take()
            try:
                await self._send(batch)
            except asyncio.CancelledError:
                self._fail_all(batch, BatcherClosed("shutting down"))
                raise

    def _take(self) -> list[tuple[Req, asyncio.Future[Res]]]:
        """The oldest calls, within the limits; at least one."""
        count = min(len(self._queue), self._max_calls)
        if self._weight is not None and self._max_weight is not None:
            total = 0
            for i, (request, _) in enumerate(self._queue[:count]):
                total += self._weight(request)
                if i and total > self._max_weight:
                    count = i
                    break
        batch = self._queue[:count]
        del self._queue[:count]
        return batch

    async def _send(self, batch: list[tuple[Req, asyncio.Future[Res]]]) -> None:
        # A caller that gave up (its connection ended) is left out; its future is done.
        live = [call for call in batch if not call[1].done()]
        if not live:
            return
        # Not the loop's clock: uvloop's counts whole milliseconds.
        started = time.perf_counter()
        try:
            results = await self._send_many([request for request, _ in live])
        except Exception as exc:  # connection errors and the like: nothing is known
            self._fail_all(live, exc)
            return
        self.round_trip.observe(time.perf_counter() - started)
        self.pipelines += 1
        self.calls += len(live)
        for (_, fut), result in zip(live, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)

    @staticmethod
    def _fail_all(calls: Sequence[tuple[object, asyncio.Future[Res]]], exc: BaseException) -> None:
        for _, fut in calls:
            if not fut.done():
                fut.set_exception(exc)
