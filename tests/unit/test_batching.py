"""The scheduler's cross-session batching (`batch_decodes`): which waiting decodes share one
batched engine call, and where each result goes. A fake engine that names each request
by its audio level; decodes wait for the test to let them finish (no sleeps)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from shared.config import Config
from shared.envelope import Word
from shared.errors import ConfigError
from worker.engine import Audio, Segment
from worker.scheduler import InterimPolicy, PackPolicy, Scheduler
from worker.stream import DecodeRequest

SR = 16000


class BatchEngine:
    name = "batch"
    can_pack = True
    can_batch = True

    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []  # per engine call, the levels it decoded
        self.gate = threading.Semaphore(0)
        self.broken = False

    def _one(self, audio: Audio) -> list[Segment]:
        word = f"L{round(float(audio[0]), 2)}"
        return [Segment(0.0, len(audio) / SR, word, (Word(word, 0.0, len(audio) / SR, 1.0),))]

    def _wait(self) -> None:
        if not self.gate.acquire(timeout=10):
            raise TimeoutError("test never released the decode")

    def transcribe(
        self,
        audio: Audio,
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[Segment]:
        self._wait()
        self.calls.append((f"L{round(float(audio[0]), 2)}",))
        return self._one(audio)

    def transcribe_batch(
        self,
        audios: Sequence[Audio],
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[list[Segment]]:
        self._wait()
        if self.broken:
            raise RuntimeError("engine broke")
        self.calls.append(tuple(f"L{round(float(a[0]), 2)}" for a in audios))
        return [self._one(a) for a in audios]


def request(kind: str, level: float, prompt: str = "") -> DecodeRequest:
    audio = np.full(SR, level, np.float32)
    return DecodeRequest(kind, 0, len(audio), audio, 0, prompt=prompt)  # type: ignore[arg-type]


def scheduler(engine: object, batch: int, pack: PackPolicy | None = None) -> Scheduler:
    policy = InterimPolicy(interval_s=60.0, stale_s=60.0)
    s = Scheduler(engine, beam_size=1, policy=policy, pack=pack, batch=batch)  # type: ignore[arg-type]
    s.start()
    return s


Pending = asyncio.Future[list[Segment] | None]


async def hold_then_queue(
    engine: BatchEngine, sched: Scheduler, requests: list[tuple[DecodeRequest, str | None]]
) -> tuple[Pending, list[Pending]]:
    """A final of session "a" holds the engine; then `requests` (request, language), one
    session each, queue up behind it."""
    first = asyncio.ensure_future(sched.decode(request("final", 0.1), "en", session="a"))
    for _ in range(1000):  # until the first decode holds the engine (bounded)
        if sched.busy_fraction() > 0:
            break
        await asyncio.sleep(0)
    else:
        raise AssertionError("the first decode never started")
    waiting: list[Pending] = [
        asyncio.ensure_future(sched.decode(req, lang, session=f"s{i}"))
        for i, (req, lang) in enumerate(requests)
    ]
    await asyncio.sleep(0)  # let them reach the queue (ordering, not timing)
    return first, waiting


def texts(results: Sequence[list[Segment] | None]) -> list[str | None]:
    return [r[0].text if r else None for r in results]


async def test_finals_waiting_together_go_in_one_batch_each_with_its_own_result() -> None:
    engine = BatchEngine()
    sched = scheduler(engine, batch=8)
    try:
        first, waiting = await hold_then_queue(
            engine, sched, [(request("final", lv), "en") for lv in (0.2, 0.3, 0.4)]
        )
        engine.gate.release(2)
        results = await asyncio.wait_for(asyncio.gather(first, *waiting), 10)
        assert texts(results) == ["L0.1", "L0.2", "L0.3", "L0.4"]
        assert engine.calls == [("L0.1",), ("L0.2", "L0.3", "L0.4")]
        c = sched.counters
        assert (c.final, c.batches, c.batched, c.packs) == (4, 1, 3, 0)
        # /metrics: a batched call is timed once; each final in it waited on its own.
        t = sched.timings
        assert t.engine_call["final"].count == 2 == c.final + c.batches - c.batched
        assert t.final_queue_wait.count == 4
    finally:
        await sched.close()


async def test_a_batch_holds_at_most_batch_decodes_and_only_one_language_and_prompt() -> None:
    engine = BatchEngine()
    sched = scheduler(engine, batch=2)
    try:
        first, waiting = await hold_then_queue(
            engine,
            sched,
            [
                (request("final", 0.2), "en"),
                (request("final", 0.3, prompt="other context"), "en"),
                (request("final", 0.4), "de"),
                (request("final", 0.5), "en"),
                (request("final", 0.6), "en"),
            ],
        )
        engine.gate.release(5)
        results = await asyncio.wait_for(asyncio.gather(first, *waiting), 10)
        assert texts(results) == ["L0.1", "L0.2", "L0.3", "L0.4", "L0.5", "L0.6"]
        # Oldest first; one that does not fit keeps its place for a later call.
        assert engine.calls == [("L0.1",), ("L0.2", "L0.5"), ("L0.3",), ("L0.4",), ("L0.6",)]
    finally:
        await sched.close()


async def test_interims_batch_with_interims_and_finals_go_first() -> None:
    engine = BatchEngine()
    sched = scheduler(engine, batch=8)
    try:
        first, waiting = await hold_then_queue(
            engine,
            sched,
            [
                (request("interim", 0.2), "en"),
                (request("interim", 0.3), "en"),
                (request("final", 0.4), "en"),
            ],
        )
        engine.gate.release(3)
        results = await asyncio.wait_for(asyncio.gather(first, *waiting), 10)
        assert texts(results) == ["L0.1", "L0.2", "L0.3", "L0.4"]
        assert engine.calls == [("L0.1",), ("L0.4",), ("L0.2", "L0.3")]
        assert sched.counters.batched == 2
    finally:
        await sched.close()


async def test_a_failed_batch_fails_every_request_in_it() -> None:
    engine = BatchEngine()
    sched = scheduler(engine, batch=8)
    try:
        first, waiting = await hold_then_queue(
            engine, sched, [(request("final", lv), "en") for lv in (0.2, 0.3)]
        )
        engine.broken = True
        engine.gate.release(2)
        assert texts([await asyncio.wait_for(first, 10)]) == ["L0.1"]
        for fut in waiting:
            with pytest.raises(RuntimeError, match="engine broke"):
                await asyncio.wait_for(fut, 10)
    finally:
        await sched.close()


async def test_without_batch_support_or_at_one_nothing_is_batched() -> None:
    class NoBatch(BatchEngine):
        can_batch = False

    for engine, batch in ((NoBatch(), 8), (BatchEngine(), 1)):
        sched = scheduler(engine, batch=batch)
        assert sched.batch == 1
        await sched.close()


async def test_a_pack_policy_of_one_item_leaves_batching_on() -> None:
    sched = scheduler(BatchEngine(), batch=8, pack=PackPolicy(max_items=1))
    assert sched.batch == 8
    await sched.close()


def test_the_service_batches_two_by_default_and_packs_only_when_asked() -> None:
    assert Config().batch_decodes == 2
    assert Config().pack_finals == 1


def test_batch_decodes_is_checked_at_its_edges() -> None:
    assert Config(batch_decodes=1).batch_decodes == 1
    assert Config(batch_decodes=64).batch_decodes == 64
    for bad in (0, 65):
        with pytest.raises(ConfigError, match="--batch-decodes"):
            Config(batch_decodes=bad)
