"""One model, many sessions: the decode queue in front of the engine thread.

Finals go before interims, and among each kind the oldest request first. An interim
that waited longer than `interim_stale_s` is dropped without decoding (the session has
moved on and will ask again): that is how interim frequency adapts to load, while
finals are never dropped. Decoding runs in a dedicated thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from worker.engine import Engine, Segment
from worker.stream import DecodeRequest

log = logging.getLogger(__name__)


@dataclass(order=True)
class _Job:
    priority: int
    order: int
    request: DecodeRequest = field(compare=False)
    language: str | None = field(compare=False)
    queued_at: float = field(compare=False)
    future: asyncio.Future[list[Segment] | None] = field(compare=False)


class Scheduler:
    def __init__(self, engine: Engine, *, beam_size: int, interim_stale_s: float) -> None:
        self.engine = engine
        self.beam_size = beam_size
        self.interim_stale_s = interim_stale_s
        self._heap: list[_Job] = []
        self._order = itertools.count()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
        self._task: asyncio.Task[None] | None = None
        self.busy_s = 0.0
        self.decodes = {"final": 0, "interim": 0, "interim_dropped": 0}

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="scheduler")

    @property
    def queued(self) -> int:
        return len(self._heap)

    async def decode(self, request: DecodeRequest, language: str | None) -> list[Segment] | None:
        """Segments of the request's audio; None when a stale interim was dropped."""
        future: asyncio.Future[list[Segment] | None] = asyncio.get_running_loop().create_future()
        priority = 0 if request.kind == "final" else 1
        heapq.heappush(
            self._heap,
            _Job(priority, next(self._order), request, language, time.monotonic(), future),
        )
        self._wake.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._heap:
                self._wake.clear()
                await self._wake.wait()
                continue
            job = heapq.heappop(self._heap)
            if job.future.done():  # the session went away
                continue
            req = job.request
            if req.kind == "interim" and time.monotonic() - job.queued_at > self.interim_stale_s:
                self.decodes["interim_dropped"] += 1
                job.future.set_result(None)
                continue
            final = req.kind == "final"
            started = time.monotonic()
            try:
                call = functools.partial(
                    self.engine.transcribe,
                    req.audio,
                    language=job.language,
                    word_timestamps=final,
                    beam_size=self.beam_size if final else 1,
                    prompt=req.prompt,
                )
                segments = await loop.run_in_executor(self._pool, call)
            except Exception as exc:  # engine failure: the session decides what to do
                log.exception("decode failed")
                if not job.future.done():
                    job.future.set_exception(exc)
                continue
            finally:
                self.busy_s += time.monotonic() - started
            self.decodes[req.kind] += 1
            if not job.future.done():
                job.future.set_result(segments)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        for job in self._heap:
            if not job.future.done():
                job.future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
