"""File jobs' decodes in the scheduler (worker/scheduler.py, kind `file`).

The policy (`DecodeQueue`) on a fake clock: a file decode comes after every final and
due interim, one at a time, only while the live load is under `file_max_busy`, and is
in neither live load meter. Then the async shell with a fake engine that holds each
decode until the test lets it go: what reaches the engine, in what order, and
`decode_file` giving up (None) when it cannot start in time.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass

import numpy as np
import pytest

from worker.engine import Audio, RawWord, Segment
from worker.scheduler import DecodeQueue, InterimPolicy, Kind, Scheduler
from worker.stream import DecodeRequest


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# Interims never go stale or get shed here unless a test makes the engine busy.
POLICY = InterimPolicy(interval_s=60.0, stale_s=60.0, busy_target=0.5, shed_busy=0.9)


def make_queue(file_max_busy: float = 0.5) -> tuple[DecodeQueue[str], FakeClock]:
    clock = FakeClock()
    return DecodeQueue(POLICY, clock, load_window_s=4.0, file_max_busy=file_max_busy), clock


def pop_payload(q: DecodeQueue[str]) -> str | None:
    job, _dropped = q.pop()
    return None if job is None else job.payload


# --- the policy --------------------------------------------------------------------------


def test_file_decodes_wait_behind_finals_and_interims() -> None:
    """A file job queued first still leaves the queue after every final and interim."""
    q, _ = make_queue()
    q.push("file", "", "file-1")
    q.push("interim", "a", "interim-a")
    q.push("final", "b", "final-b")
    assert [pop_payload(q) for _ in range(4)] == ["final-b", "interim-a", "file-1", None]


def test_one_file_decode_at_a_time_and_the_next_keeps_its_place() -> None:
    """While one file decode runs, another waits (queued, not dropped), and goes once
    the first ends; a final meanwhile is not held up."""
    q, clock = make_queue()
    q.push("file", "", "file-1")
    q.push("file", "", "file-2")
    first, _ = q.pop()
    assert first is not None and first.payload == "file-1"
    q.started(first)
    assert pop_payload(q) is None and len(q) == 1 and q.files_waiting == 1
    q.push("final", "a", "final-a")
    assert pop_payload(q) == "final-a"
    clock.now += 1.0
    q.finished(first)
    assert pop_payload(q) == "file-2"


def test_a_file_decode_waits_while_live_load_is_at_its_limit() -> None:
    """Finals kept the engine busy (load >= file_max_busy): the file job stays queued;
    once the load window has moved on past them it may start."""
    q, clock = make_queue(file_max_busy=0.5)
    final = q.push("final", "a", "final-a")
    q.push("file", "", "file-1")
    assert q.pop()[0] is final
    q.started(final)
    clock.now += 2.0  # 2 s busy of the 4 s window: 0.5, not under the limit
    q.finished(final)
    assert q.load.busy_fraction(clock.now) == pytest.approx(0.5)
    assert pop_payload(q) is None and q.files_waiting == 1
    clock.now += 2.0  # the window still holds all 2 s of the decode
    assert pop_payload(q) is None and q.files_waiting == 1
    clock.now += 0.5  # now 1.5 s of it: 0.375
    assert pop_payload(q) == "file-1"


def test_file_decodes_are_not_live_load() -> None:
    """A long file decode moves neither load meter (so it sheds no interim and closes
    no claim gate), and is counted and timed as `file`."""
    q, clock = make_queue()
    q.push("file", "", "file-1")
    job, _ = q.pop()
    assert job is not None
    q.started(job)
    clock.now += 10.0
    assert q.load.busy_fraction(clock.now) == 0.0
    assert q.final_load.busy_fraction(clock.now) == 0.0
    q.finished(job)
    assert q.load.busy_fraction(clock.now) == 0.0 and q.final_wait_s() == 0.0
    assert (q.counters.file, q.counters.final, q.counters.interim) == (1, 0, 0)
    assert q.timings.engine_call["file"].count == 1
    assert q.timings.engine_call["file"].sum == pytest.approx(10.0)
    # An interim right after is due at full rate: the engine looks idle to live work.
    q.push("interim", "a", "interim-a")
    assert pop_payload(q) == "interim-a"


def test_withdrawing_a_queued_file_decode() -> None:
    """Withdrawn, a file job leaves the queue; one not there is not found."""
    q, _ = make_queue()
    job = q.push("file", "", "file-1")
    q.push("final", "a", "final-a")
    assert q.withdraw(job) and not q.withdraw(job)
    assert [pop_payload(q), pop_payload(q)] == ["final-a", None]


def test_file_max_busy_must_be_a_fraction() -> None:
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            DecodeQueue(POLICY, FakeClock(), file_max_busy=bad)


# --- the async shell -----------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    tag: str
    word_timestamps: bool
    beam_size: int


class GateEngine:
    """Records each decode (its prompt is its tag) and holds it until released."""

    name = "gate"
    can_pack = False

    def __init__(self) -> None:
        self.calls: queue.Queue[Call] = queue.Queue()
        self.release = threading.Semaphore(0)

    def transcribe(
        self,
        audio: Audio,
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[Segment]:
        self.calls.put(Call(prompt or "", word_timestamps, beam_size))
        if not self.release.acquire(timeout=10):
            raise TimeoutError("test never released the decode")
        return [Segment(0.0, 0.1, prompt or "", ())]

    def transcribe_words(
        self, audio: Audio, *, language: str | None, beam_size: int
    ) -> list[RawWord]:
        raise AssertionError("no packed windows here")

    async def next_call(self) -> Call:
        return await asyncio.to_thread(self.calls.get, True, 10)


def request(kind: Kind, tag: str) -> DecodeRequest:
    return DecodeRequest(kind, 0, 1600, np.zeros(1600, np.float32), 0, prompt=tag)


def window() -> Audio:
    return np.zeros(16000, np.float32)


async def test_a_file_decode_runs_after_the_live_ones_with_words_and_the_full_beam() -> None:
    """While the engine decodes, a file window, an interim and a final arrive: the final,
    then the interim, then the file; the file's call asks for word times and the
    worker's beam."""
    engine = GateEngine()
    sched = Scheduler(engine, beam_size=5, policy=POLICY, file_max_busy=1.0)
    sched.start()
    try:
        first = asyncio.ensure_future(sched.decode(request("final", "f0"), "en", session="a"))
        assert (await engine.next_call()).tag == "f0"
        file = asyncio.ensure_future(
            sched.decode_file(window(), language="en", prompt="file", timeout_s=60)
        )
        interim = asyncio.ensure_future(sched.decode(request("interim", "i1"), "en", "b"))
        final = asyncio.ensure_future(sched.decode(request("final", "f1"), "en", session="c"))
        await asyncio.sleep(0)  # all three reach the queue (ordering, not timing)
        assert sched.queued == 3
        order: list[Call] = []
        for _ in range(4):
            engine.release.release()
            if len(order) < 3:
                order.append(await engine.next_call())
        assert [c.tag for c in order] == ["f1", "i1", "file"]
        assert (order[2].word_timestamps, order[2].beam_size) == (True, 5)
        assert (order[1].word_timestamps, order[1].beam_size) == (False, 1)
        segments = await asyncio.wait_for(file, 10)
        assert segments is not None and segments[0].text == "file"
        await asyncio.wait_for(asyncio.gather(first, interim, final), 10)
        assert (sched.counters.file, sched.counters.final, sched.counters.interim) == (1, 2, 1)
    finally:
        await sched.close()


async def test_a_file_decode_held_back_by_load_starts_once_it_falls() -> None:
    """A final kept the engine busy for the whole load window (fake clock): the file
    window waits, queued; when the clock moves past the window, the scheduler's own
    re-check starts it (nothing else wakes it)."""
    engine = GateEngine()
    clock = FakeClock()
    sched = Scheduler(engine, beam_size=1, policy=POLICY, clock=clock, file_max_busy=0.5)
    sched.start()
    try:
        final = asyncio.ensure_future(sched.decode(request("final", "f0"), "en", session="a"))
        assert (await engine.next_call()).tag == "f0"
        file = asyncio.ensure_future(
            sched.decode_file(window(), language="en", prompt="file", timeout_s=60)
        )
        clock.now += 10.0
        engine.release.release()
        await asyncio.wait_for(final, 10)
        assert sched.busy_fraction() == 1.0
        assert not sched.queue.file_may_start(clock.now)
        assert sched.queued == 1 and engine.calls.empty()
        clock.now += 10.0  # the busy final has left the load window
        assert (await engine.next_call()).tag == "file"
        engine.release.release()
        assert await asyncio.wait_for(file, 10) is not None
        assert sched.busy_fraction() == 0.0 and sched.final_busy_fraction() == 0.0
    finally:
        await sched.close()


async def test_decode_file_that_cannot_start_in_time_is_withdrawn() -> None:
    """The engine is busy past the file window's timeout: None, and the window is off
    the queue: the next decode the engine sees is a final queued after it."""
    engine = GateEngine()
    sched = Scheduler(engine, beam_size=1, policy=POLICY, file_max_busy=1.0)
    sched.start()
    try:
        busy = asyncio.ensure_future(sched.decode(request("final", "f0"), "en", session="a"))
        assert (await engine.next_call()).tag == "f0"
        result = await sched.decode_file(window(), language="en", prompt="file", timeout_s=0.05)
        assert result is None and sched.queued == 0
        after = asyncio.ensure_future(sched.decode(request("final", "f1"), "en", session="b"))
        engine.release.release()
        assert (await engine.next_call()).tag == "f1"
        engine.release.release()
        await asyncio.wait_for(asyncio.gather(busy, after), 10)
        assert sched.counters.file == 0 and engine.calls.empty()
    finally:
        await sched.close()


async def test_giving_up_withdraws_a_queued_file_decode_but_not_a_started_one() -> None:
    """`give_up` set while the window waits: None at once. Set while it is in the
    engine: the decode ends as usual and its segments come back."""
    engine = GateEngine()
    sched = Scheduler(engine, beam_size=1, policy=POLICY, file_max_busy=1.0)
    sched.start()
    stop = asyncio.Event()
    try:
        busy = asyncio.ensure_future(sched.decode(request("final", "f0"), "en", session="a"))
        assert (await engine.next_call()).tag == "f0"
        queued = asyncio.ensure_future(
            sched.decode_file(window(), language="en", prompt="q", timeout_s=60, give_up=stop)
        )
        await asyncio.sleep(0)  # it reaches the queue (ordering, not timing)
        stop.set()
        assert await asyncio.wait_for(queued, 10) is None and sched.queued == 0
        engine.release.release()
        await asyncio.wait_for(busy, 10)
        stop.clear()
        running = asyncio.ensure_future(
            sched.decode_file(window(), language="en", prompt="r", timeout_s=60, give_up=stop)
        )
        assert (await engine.next_call()).tag == "r"
        stop.set()
        engine.release.release()
        segments = await asyncio.wait_for(running, 10)
        assert segments is not None and segments[0].text == "r"
        assert sched.counters.file == 1
    finally:
        await sched.close()
