"""Unit tests for cross-session packing (worker/packing.py) and the scheduler's use of it.

`split` is the rule that hands each word of a packed decode back to its utterance; the
tests below give it words in every awkward place a real decode could put them. The
scheduler tests drive the async shell with a fake engine that reads the window it is
given (each session's audio is a distinct constant level), so a word that reached the
wrong session would show up as the wrong text. The real model is tested on packed real
speech in tests/integration/test_packing_model.py.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

import numpy as np
import pytest

from shared.config import Config
from shared.envelope import Word
from shared.errors import ConfigError
from worker.engine import SAMPLE_RATE, Audio, NullEngine, RawWord, Segment
from worker.packing import MIN_GUARD_S, PACK_PEAK, Layout, layout, pack_audio, packed_samples, split
from worker.scheduler import DecodeQueue, InterimPolicy, PackPolicy, Scheduler
from worker.stream import DecodeRequest

SR = SAMPLE_RATE
GUARD = SR  # 1 s


def lay(*seconds: float, guard: int = GUARD) -> Layout:
    return layout([int(s * SR) for s in seconds], guard)


def word(text: str, start: float, end: float, segment: int = 0, reliable: bool = True) -> RawWord:
    return RawWord(" " + text, start, end, 0.9, segment, reliable)


def texts(result: list[Segment] | None) -> list[str] | None:
    if result is None:
        return None
    return [w.word for s in result for w in s.words]


# --- layout --------------------------------------------------------------------------------


def test_layout_puts_one_guard_between_neighbours_and_none_at_the_ends() -> None:
    lay3 = lay(2, 3, 1)
    assert [(s.start, s.end) for s in lay3.slots] == [
        (0, 2 * SR),
        (3 * SR, 6 * SR),
        (7 * SR, 8 * SR),
    ]
    assert lay3.total == 8 * SR == packed_samples([2 * SR, 3 * SR, SR], GUARD)


def test_pack_audio_keeps_guards_exactly_silent_and_levels_every_utterance() -> None:
    """A quiet session beside a loud one gets the same peak level (Whisper clamps the
    window's features relative to its loudest part)."""
    lay3 = lay(1, 1, 1)
    loud = np.full(SR, 0.8, np.float32)
    quiet = np.full(SR, -0.004, np.float32)
    silent = np.zeros(SR, np.float32)
    window = pack_audio([loud, quiet, silent], lay3)
    assert np.allclose(window[:SR], PACK_PEAK)
    assert np.all(window[SR : 2 * SR] == 0.0)
    assert np.allclose(window[2 * SR : 3 * SR], -PACK_PEAK)
    assert np.all(window[3 * SR :] == 0.0)


@pytest.mark.parametrize(
    ("lengths", "guard"),
    [([], GUARD), ([SR, 0], GUARD), ([SR], int(MIN_GUARD_S * SR) - 1)],
)
def test_layout_refuses_what_it_cannot_keep_apart(lengths: list[int], guard: int) -> None:
    with pytest.raises(ValueError):
        layout(lengths, guard)


def test_pack_audio_refuses_audio_that_does_not_match_its_slot() -> None:
    with pytest.raises(ValueError):
        pack_audio([np.zeros(SR - 1, np.float32)], lay(1))


# --- split -------------------------------------------------------------------------------


def test_words_go_to_the_slot_they_start_in_with_slot_relative_times() -> None:
    lay3 = lay(2, 2, 2)  # slots at 0-2, 3-5, 6-8
    words = [
        word("alpha", 0.1, 0.6, 0),
        word("beta", 0.7, 1.9, 0),
        word("gamma", 3.0, 3.5, 1),
        word("delta", 6.2, 7.0, 2),
        word("epsilon", 7.1, 7.9, 2),
    ]
    out = split(lay3, words)
    assert [texts(r) for r in out] == [["alpha", "beta"], ["gamma"], ["delta", "epsilon"]]
    first = out[2]
    assert first is not None and first[0].text == "delta epsilon"
    assert (first[0].words[0].start, first[0].words[-1].end) == (0.2, 1.9)


def test_a_last_word_may_stretch_into_the_guard_but_not_to_the_next_slot() -> None:
    lay2 = lay(2, 2)  # slots 0-2, 3-5
    ok = split(lay2, [word("man", 1.5, 3.0), word("next", 3.0, 3.4, 1)])
    assert [texts(r) for r in ok] == [["man"], ["next"]]
    over = split(lay2, [word("man", 1.5, 3.05), word("next", 3.1, 3.4, 1)])
    assert over == [None, None]  # whose is it? both slots are decoded again alone


def test_a_word_may_start_a_little_before_its_slot() -> None:
    out = split(lay(2, 2), [word("a", 0.0, 0.5), word("b", 2.7, 3.4, 1)])
    assert [texts(r) for r in out] == [["a"], ["b"]]
    early = split(lay(2, 2), [word("a", 0.0, 0.5), word("b", 2.69, 3.4, 1)])
    assert early == [None, None]  # started in the guard: whose is it?


def test_a_word_in_a_guard_sends_both_neighbours_alone_and_keeps_the_others() -> None:
    lay4 = lay(1, 1, 1, 1)  # slots 0-1, 2-3, 4-5, 6-7
    words = [
        word("a", 0.1, 0.5),
        word("b", 2.1, 2.5, 1),
        word("ghost", 3.4, 3.6, 2),  # in the guard between slots 1 and 2
        word("c", 4.1, 4.5, 3),
        word("d", 6.1, 6.5, 4),
    ]
    out = split(lay4, words)
    assert [texts(r) for r in out] == [["a"], None, None, ["d"]]


def test_words_after_the_last_slot_send_it_alone() -> None:
    out = split(lay(1, 1), [word("a", 0.1, 0.5), word("b", 2.1, 2.6, 1), word("z", 3.2, 3.5, 1)])
    assert [texts(r) for r in out] == [["a"], None]


def test_words_out_of_order_make_every_slot_go_alone() -> None:
    out = split(lay(1, 1, 1), [word("b", 2.1, 2.5), word("a", 0.1, 0.5), word("c", 4.1, 4.5)])
    assert out == [None, None, None]


def test_a_word_ending_before_it_starts_makes_every_slot_go_alone() -> None:
    assert split(lay(1, 1), [word("a", 0.5, 0.4)]) == [None, None]


def test_an_empty_slot_is_decoded_alone() -> None:
    out = split(lay(1, 1, 1), [word("a", 0.1, 0.5), word("c", 4.1, 4.5, 1)])
    assert [texts(r) for r in out] == [["a"], None, ["c"]]


def test_an_unreliable_segment_sends_its_slot_alone() -> None:
    words = [word("a", 0.1, 0.5), word("b", 2.1, 2.5, 1, reliable=False)]
    assert [texts(r) for r in split(lay(1, 1), words)] == [["a"], None]


def test_segments_follow_the_engines_segments_within_a_slot() -> None:
    words = [word("one", 0.1, 0.4, 0), word("two", 0.5, 0.9, 0), word("three", 1.2, 1.8, 1)]
    out = split(lay(2), words)
    assert out[0] is not None
    assert [s.text for s in out[0]] == ["one two", "three"]


# --- the null engine packs like a real one ------------------------------------------------


def test_null_engine_words_split_back_one_per_second_per_slot() -> None:
    lay3 = lay(2.5, 1, 3)
    audios = [np.full(int(s * SR), 0.1, np.float32) for s in (2.5, 1, 3)]
    words = NullEngine().transcribe_words(pack_audio(audios, lay3), language="en", beam_size=1)
    assert [len(texts(r) or []) for r in split(lay3, words)] == [2, 1, 3]


# --- policy and config --------------------------------------------------------------------


def test_pack_policy_fits_by_count_and_by_window() -> None:
    p = PackPolicy(max_items=3, window_s=10.0, guard_s=1.0)
    assert p.fits([4 * SR, 5 * SR])  # 4 + 1 + 5 = 10 s
    assert not p.fits([4 * SR, 5 * SR + 1])
    assert not p.fits([SR, SR, SR, SR])  # 4 items > 3
    assert not PackPolicy(max_items=1).enabled


@pytest.mark.parametrize(
    ("field", "value"),
    [("pack_finals", 0), ("pack_window_s", 30.5), ("pack_window_s", 0.0), ("pack_guard_s", 0.59)],
)
def test_config_refuses_bad_pack_settings_and_names_them(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field.upper()):
        Config(**cast(dict[str, Any], {field: value}))


def test_config_accepts_the_pack_edges() -> None:
    cfg = Config(pack_finals=1, pack_window_s=30.0, pack_guard_s=0.6)
    assert (cfg.pack_finals, cfg.pack_window_s, cfg.pack_guard_s) == (1, 30.0, 0.6)


# --- the scheduler packs waiting finals -----------------------------------------------------


class LevelEngine:
    """Fake engine: each stretch of non-zero audio is one word "L<level>", the level of
    the stretch relative to its first sample.

    `transcribe_words` waits for the test before it answers (no sleeps); a word can be
    moved into a guard with `ghost_after` to exercise the retry path.
    """

    name = "level"
    can_pack = True

    def __init__(self) -> None:
        self.windows: list[int] = []  # slots seen by each packed call
        self.alone: list[str] = []  # prompts of single decodes
        self.gate = threading.Semaphore(0)
        self.ghost_after: float | None = None
        self.broken = False  # packed calls fail

    def transcribe(
        self,
        audio: Audio,
        *,
        language: str | None,
        word_timestamps: bool,
        beam_size: int,
        prompt: str | None = None,
    ) -> list[Segment]:
        self.alone.append(prompt or "")
        if not self.gate.acquire(timeout=10):
            raise TimeoutError("test never released the decode")
        w = _level_word(audio, 0, len(audio))
        return [Segment(0.0, len(audio) / SR, w.word, (w,))]

    def transcribe_words(
        self, audio: Audio, *, language: str | None, beam_size: int
    ) -> list[RawWord]:
        if not self.gate.acquire(timeout=10):
            raise TimeoutError("test never released the decode")
        if self.broken:
            raise RuntimeError("engine broke")
        nonzero = np.flatnonzero(audio)
        cuts = np.flatnonzero(np.diff(nonzero) > 1)
        starts = [int(nonzero[0]), *(int(nonzero[c + 1]) for c in cuts)]
        ends = [*(int(nonzero[c]) + 1 for c in cuts), int(nonzero[-1]) + 1]
        self.windows.append(len(starts))
        out = []
        for k, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
            w = _level_word(audio, lo, hi)
            out.append(RawWord(" " + w.word, lo / SR, hi / SR, 1.0, k))
        if self.ghost_after is not None:
            t = self.ghost_after
            out.append(RawWord(" ghost", t, t + 0.1, 1.0, len(out)))
            out.sort(key=lambda w: w.start)
        return out


def _level_word(audio: Audio, lo: int, hi: int) -> Word:
    """The level relative to the utterance's first sample (packing rescales utterances)."""
    return Word(f"L{round(float(audio[lo + 1] / audio[lo]), 2)}", lo / SR, hi / SR, 1.0)


def final(level: float, seconds: float = 1.0, tag: str = "") -> DecodeRequest:
    audio = np.full(int(seconds * SR), level, np.float32)
    audio[0] = 1.0  # the reference the level is read against
    return DecodeRequest("final", 0, len(audio), audio, 0, prompt=tag or f"p{level}")


async def started(engine: LevelEngine, sched: Scheduler, first: Pending) -> None:
    """Wait until the first decode holds the engine (the queue is then free to fill)."""
    for _ in range(1000):
        if engine.alone or engine.windows or sched.busy_fraction() > 0:
            return
        await asyncio.sleep(0)
    raise AssertionError("the first decode never started")


def sched_with(engine: LevelEngine, pack: PackPolicy, batch: int = 1) -> Scheduler:
    policy = InterimPolicy(interval_s=60.0, stale_s=60.0)
    s = Scheduler(engine, beam_size=1, policy=policy, pack=pack, batch=batch)
    s.start()
    return s


Pending = asyncio.Future[list[Segment] | None]


async def hold_then_queue(
    engine: LevelEngine, sched: Scheduler, requests: list[DecodeRequest]
) -> tuple[Pending, list[Pending]]:
    """Start a final of session "a" (it holds the engine until the gate opens), then queue
    `requests`, one session each, so they wait together."""
    first = asyncio.ensure_future(sched.decode(final(0.1), "en", session="a"))
    await started(engine, sched, first)
    waiting: list[Pending] = [
        asyncio.ensure_future(sched.decode(req, "en", session=f"s{i}"))
        for i, req in enumerate(requests)
    ]
    await asyncio.sleep(0)  # let them reach the queue (ordering, not timing)
    return first, waiting


async def test_finals_waiting_together_share_one_call_and_each_gets_its_own_words() -> None:
    engine = LevelEngine()
    sched = sched_with(engine, PackPolicy(max_items=8, window_s=28.0, guard_s=1.0))
    try:
        first, waiting = await hold_then_queue(
            engine, sched, [final(level) for level in (0.2, 0.3, 0.4)]
        )
        assert sched.queued == 3
        engine.gate.release(2)
        results = await asyncio.wait_for(asyncio.gather(first, *waiting), 10)
        assert [r[0].text if r else None for r in results] == ["L0.1", "L0.2", "L0.3", "L0.4"]
        assert engine.alone == ["p0.1"] and engine.windows == [3]
        c = sched.counters
        assert (c.final, c.packs, c.packed_finals, c.pack_retries) == (4, 1, 3, 0)
    finally:
        await sched.close()


class BatchingLevelEngine(LevelEngine):
    can_batch = True

    def transcribe_batch(self, audios: object, **kwargs: object) -> list[list[Segment]]:
        raise AssertionError("packing was asked for: nothing is batched")


async def test_packing_asked_for_takes_precedence_over_batching() -> None:
    engine = BatchingLevelEngine()
    pack = PackPolicy(max_items=8, window_s=28.0, guard_s=1.0)
    sched = sched_with(engine, pack, batch=8)  # batch_decodes 2 is the service's default
    try:
        assert sched.batch == 1
        first, waiting = await hold_then_queue(
            engine, sched, [final(level) for level in (0.2, 0.3, 0.4)]
        )
        engine.gate.release(2)
        results = await asyncio.wait_for(asyncio.gather(first, *waiting), 10)
        assert [r[0].text if r else None for r in results] == ["L0.1", "L0.2", "L0.3", "L0.4"]
        assert engine.windows == [3]
        c = sched.counters
        assert (c.packs, c.packed_finals, c.batches) == (1, 3, 0)
    finally:
        await sched.close()


async def test_an_unattributable_slot_is_decoded_alone_before_anything_else() -> None:
    engine = LevelEngine()
    sched = sched_with(engine, PackPolicy(max_items=8, window_s=28.0, guard_s=1.0))
    engine.ghost_after = 1.5  # in the guard between the first two packed slots
    try:
        first, waiting = await hold_then_queue(
            engine, sched, [final(level) for level in (0.2, 0.3, 0.4)]
        )
        engine.gate.release(4)  # first alone, the pack, then two slots alone
        results = await asyncio.wait_for(asyncio.gather(first, *waiting), 10)
        assert [r[0].text if r else None for r in results] == ["L0.1", "L0.2", "L0.3", "L0.4"]
        assert engine.alone == ["p0.1", "p0.2", "p0.3"]  # with their own prompts
        c = sched.counters
        assert (c.final, c.packs, c.packed_finals, c.pack_retries) == (4, 1, 1, 2)
    finally:
        await sched.close()


async def test_a_pack_and_its_retries_are_timed_as_calls_and_each_final_waits_once() -> None:
    """The histograms behind /metrics: the first final alone, the pack and the two
    slots decoded again alone are four engine calls for finals; each of the four finals
    has one queue wait (a retry is not counted twice), as many as `decodes_final`; and
    calls = finals + packs - packed finals, the identity /metrics readers can rely on."""
    engine = LevelEngine()
    sched = sched_with(engine, PackPolicy(max_items=8, window_s=28.0, guard_s=1.0))
    engine.ghost_after = 1.5  # in the guard between the first two packed slots
    try:
        first, waiting = await hold_then_queue(
            engine, sched, [final(level) for level in (0.2, 0.3, 0.4)]
        )
        engine.gate.release(4)
        await asyncio.wait_for(asyncio.gather(first, *waiting), 10)
        c, t = sched.counters, sched.timings
        assert (c.final, c.packs, c.packed_finals, c.pack_retries) == (4, 1, 1, 2)
        assert t.engine_call["final"].count == 4 == c.final + c.packs - c.packed_finals
        assert t.final_queue_wait.count == 4 == c.final
        assert t.engine_call["interim"].count == 0
    finally:
        await sched.close()


async def test_a_pack_respects_the_window_and_the_language() -> None:
    engine = LevelEngine()
    sched = sched_with(engine, PackPolicy(max_items=8, window_s=10.0, guard_s=1.0))
    try:
        first = asyncio.ensure_future(sched.decode(final(0.1), "en", session="a"))
        await started(engine, sched, first)
        b = asyncio.ensure_future(sched.decode(final(0.2, 4.0), "en", session="b"))
        c = asyncio.ensure_future(sched.decode(final(0.3, 4.0), "de", session="c"))
        d = asyncio.ensure_future(sched.decode(final(0.4, 6.0), "en", session="d"))
        e = asyncio.ensure_future(sched.decode(final(0.5, 4.0), "en", session="e"))
        await asyncio.sleep(0)
        engine.gate.release(4)
        results = await asyncio.wait_for(asyncio.gather(first, b, c, d, e), 10)
        assert [r[0].text if r else None for r in results] == [
            "L0.1",
            "L0.2",
            "L0.3",
            "L0.4",
            "L0.5",
        ]
        # b (4 s) + e (4 s) + a guard fit 10 s; d (6 s) would not, c speaks another language.
        assert engine.windows == [2]
        assert engine.alone == ["p0.1", "p0.3", "p0.4"]
    finally:
        await sched.close()


async def test_pack_finals_one_never_packs() -> None:
    engine = LevelEngine()
    sched = sched_with(engine, PackPolicy(max_items=1))
    try:
        first, more = await hold_then_queue(engine, sched, [final(level) for level in (0.2, 0.3)])
        engine.gate.release(3)
        await asyncio.wait_for(asyncio.gather(first, *more), 10)
        assert engine.windows == [] and engine.alone == ["p0.1", "p0.2", "p0.3"]
    finally:
        await sched.close()


async def test_an_engine_failure_in_a_pack_reaches_every_session_in_it() -> None:
    engine = LevelEngine()
    sched = sched_with(engine, PackPolicy(max_items=8))
    try:
        first, more = await hold_then_queue(engine, sched, [final(level) for level in (0.2, 0.3)])
        engine.broken = True
        engine.gate.release(2)
        await asyncio.wait_for(first, 10)
        results = await asyncio.gather(*more, return_exceptions=True)
        assert [str(r) for r in results] == ["engine broke", "engine broke"]
        assert engine.windows == []
    finally:
        await sched.close()


def interim(level: float, seconds: float = 1.0) -> DecodeRequest:
    req = final(level, seconds)
    return DecodeRequest("interim", 0, req.end, req.audio, 0, prompt=req.prompt)


async def test_waiting_interims_share_one_call_and_an_unplaced_one_is_skipped() -> None:
    """Interims of several sessions go in one window (no final waits); one the split
    cannot place is answered None (the session asks again later), never retried."""
    engine = LevelEngine()
    sched = sched_with(engine, PackPolicy(max_items=8, window_s=28.0, guard_s=1.0))
    try:
        engine.ghost_after = 3.5  # in the guard after the second interim's slot (2-3 s)
        first, waiting = await hold_then_queue(
            engine, sched, [interim(level) for level in (0.2, 0.3, 0.4)]
        )
        engine.gate.release(2)
        results = await asyncio.wait_for(asyncio.gather(first, *waiting), 10)
        assert [r[0].text if r else None for r in results] == ["L0.1", "L0.2", None, None]
        assert engine.windows == [3] and engine.alone == ["p0.1"]
        c = sched.counters
        assert (c.interim, c.packs, c.packed_interims, c.pack_retries) == (3, 1, 3, 0)
    finally:
        await sched.close()


def test_take_interims_drops_stale_ones_and_leaves_one_that_does_not_fit() -> None:
    clock = FakeClockForQueue()
    q: DecodeQueue[int] = DecodeQueue(InterimPolicy(interval_s=1.0, stale_s=1.0), clock)
    q.push("interim", "old", 0)
    clock.now += 2.0  # "old" is now stale
    q.push("interim", "a", 1)
    q.push("interim", "b", 2)
    q.push("interim", "c", 3)
    job, dropped = q.pop()
    assert job is not None and job.payload == 1 and [d.payload for d in dropped] == [0]
    taken, dropped = q.take_interims(lambda more: len(more) <= 1, limit=7)
    assert [j.payload for j in taken] == [2] and dropped == []
    assert len(q) == 1  # "c" did not fit and waits for the next call
    follow, _ = q.pop()
    assert follow is not None and follow.payload == 3


class FakeClockForQueue:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now
