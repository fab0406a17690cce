"""One Redis round trip for the audio of many connections.

At real time a connection's writer nearly always has one frame to store, so one INGEST
call per frame per connection meant one round trip (and its syscalls and wake-ups) per
frame. `IngestBatcher` is the gateway-wide group commit: every `ingest` made while the
previous pipeline was in flight (or during the same event-loop turn) goes out together
as one pipeline of INGEST calls (`Store.ingest_many`).

What does not change for a connection:
- its call returns only after its frames are stored (so the `ack` still means stored);
- its order: a writer awaits each call before making the next, so one session never has
  two calls in one pipeline or in two pipelines at once;
- its errors: `SessionGone`, `SeqGap` and script errors reach the one caller they belong
  to, as `Store.ingest` raises them; a connection error (nothing is known about any call)
  reaches every caller of that pipeline, and each retries as it did before (INGEST is
  idempotent on seq);
- back-pressure: a caller has at most one call here, so memory stays bounded by each
  connection's own pending queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from shared.envelope import AudioChunk
from shared.keys import SessionId
from shared.store import IngestResult, Store

log = logging.getLogger(__name__)

#: Calls per pipeline, at most: bounds one reply's size and the time Redis spends on one
#: pipeline before it serves other clients (workers, pub/sub) again.
MAX_CALLS_PER_PIPELINE = 256
#: Audio bytes per pipeline, at most (a single call may exceed it alone): after a stall
#: every connection may come back with a full batch, and one write of all of them would
#: be tens of MB in one buffer.
MAX_BYTES_PER_PIPELINE = 4 * 2**20

_Call = tuple[SessionId, Sequence[AudioChunk], "asyncio.Future[IngestResult]"]


class BatcherClosed(Exception):
    """`ingest` after `close`: the gateway is shutting down."""


class IngestBatcher:
    """Collects `ingest` calls from every connection and sends them as pipelines, one
    at a time: while one is in flight the next fills up, so batches grow with load and
    cost nothing in latency when the load is light."""

    def __init__(
        self,
        store: Store,
        *,
        max_calls_per_pipeline: int = MAX_CALLS_PER_PIPELINE,
        max_bytes_per_pipeline: int = MAX_BYTES_PER_PIPELINE,
    ) -> None:
        if max_calls_per_pipeline < 1:
            raise ValueError(f"max_calls_per_pipeline must be >= 1, got {max_calls_per_pipeline}")
        if max_bytes_per_pipeline < 1:
            raise ValueError(f"max_bytes_per_pipeline must be >= 1, got {max_bytes_per_pipeline}")
        self._store = store
        self._max_calls = max_calls_per_pipeline
        self._max_bytes = max_bytes_per_pipeline
        self._queue: list[_Call] = []
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        #: Pipelines sent and calls carried, for metrics and tests.
        self.pipelines = 0
        self.calls = 0

    def start(self) -> None:
        if self._task is None:
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._run(), name="ingest")

    async def ingest(self, sid: SessionId, chunks: Sequence[AudioChunk]) -> IngestResult:
        """`Store.ingest`, sent with whatever other connections store meanwhile."""
        if self._closed:
            raise BatcherClosed("the gateway is shutting down")
        if self._loop is None:
            self.start()
        assert self._loop is not None
        # The loop the batcher started on, not asyncio.get_running_loop(): on Python 3.11
        # that costs a getpid() system call, and this runs once per stored frame.
        fut: asyncio.Future[IngestResult] = self._loop.create_future()
        self._queue.append((sid, chunks, fut))
        wake = self._wake
        if wake is not None and not wake.done():
            wake.set_result(None)
        return await fut

    async def close(self) -> None:
        """Stop; calls still waiting fail with `BatcherClosed` (a pipeline in flight is
        cancelled: its callers see the cancellation and, being idempotent, lose nothing
        that a resume would not resend)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._fail_all(self._queue, BatcherClosed("the gateway is shutting down"))
        self._queue = []

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._wake = loop.create_future()
                try:
                    await self._wake
                finally:
                    self._wake = None
            batch = self._take()
            try:
                await self._send(batch)
            except asyncio.CancelledError:
                self._fail_all(batch, BatcherClosed("the gateway is shutting down"))
                raise

    def _take(self) -> list[_Call]:
        """The oldest calls, within both limits; at least one."""
        size, count = 0, 0
        for _, chunks, _ in self._queue[: self._max_calls]:
            size += sum(len(chunk.pcm) for chunk in chunks)
            if count and size > self._max_bytes:
                break
            count += 1
        batch = self._queue[:count]
        del self._queue[:count]
        return batch

    async def _send(self, batch: list[_Call]) -> None:
        # A caller that gave up (its connection ended) is left out; its future is done.
        live = [call for call in batch if not call[2].done()]
        if not live:
            return
        try:
            results = await self._store.ingest_many([(sid, chunks) for sid, chunks, _ in live])
        except Exception as exc:  # connection errors and the like: nothing is known
            self._fail_all(live, exc)
            return
        self.pipelines += 1
        self.calls += len(live)
        for (_, _, fut), result in zip(live, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, IngestResult):
                fut.set_result(result)
            else:
                fut.set_exception(result)

    @staticmethod
    def _fail_all(calls: list[_Call], exc: BaseException) -> None:
        for _, _, fut in calls:
            if not fut.done():
                fut.set_exception(exc)
