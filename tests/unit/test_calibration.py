"""`slots` auto (worker/calibration.py): the slots policy at its edges, which calls one round
makes, the timing with an injected clock (first round untimed, fastest timed round counts),
the shipped clips, and the settings that drive it."""

from __future__ import annotations

import math
import threading
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

from shared.config import Config, load_config
from shared.envelope import Word
from shared.errors import ConfigError
from worker.calibration import (
    ROUNDS,
    auto_slots,
    calibrate,
    load_clips,
    measure,
    round_groups,
)
from worker.engine import SAMPLE_RATE, Audio, Segment
from worker.samples import CLIP_NAMES


@pytest.mark.parametrize(
    ("rate", "factor", "cap", "slots"),
    [
        (60.0, 0.45, 512, 27),  # 27.0 exactly
        (59.99, 0.45, 512, 26),  # just below: floor
        (28.9, 0.45, 512, 13),
        (2.0, 0.45, 512, 1),  # less than one session's worth still serves one
        (0.0, 0.45, 512, 1),
        (10_000.0, 0.45, 512, 512),  # capped
        (1137.8, 0.45, 512, 512),  # 512.01: capped
        (1135.0, 0.45, 512, 510),
        (math.inf, 0.45, 512, 512),  # an engine too fast to time
        (60.0, 1.0, 60, 60),  # cap reached exactly
    ],
)
def test_auto_slots(rate: float, factor: float, cap: int, slots: int) -> None:
    assert auto_slots(rate, factor, cap) == slots


@pytest.mark.parametrize(("factor", "cap"), [(0.0, 512), (-1.0, 512), (0.45, 0)])
def test_auto_slots_refuses_bad_settings(factor: float, cap: int) -> None:
    with pytest.raises(ValueError):
        auto_slots(60.0, factor, cap)


def _clips(*seconds: float) -> list[Audio]:
    return [np.full(int(s * SAMPLE_RATE), i + 1, np.float32) for i, s in enumerate(seconds)]


@pytest.mark.parametrize(
    ("threads", "batch", "shape"),
    [
        (2, 2, [[1, 2], [3, 4]]),  # the worker's defaults: one call per thread
        (1, 1, [[1], [2], [3], [4]]),
        (2, 1, [[1], [2], [3], [4]]),
        (1, 8, [[1, 2, 3, 4, 1, 2, 3, 4]]),  # a big batch repeats the set
        (3, 2, [[1, 2], [3, 4], [1, 2]]),  # every thread gets a full batch
        (1, 3, [[1, 2, 3], [4, 1, 2]]),  # whole batches only
    ],
)
def test_round_groups(threads: int, batch: int, shape: list[list[int]]) -> None:
    groups = round_groups(_clips(1, 2, 3, 4), threads, batch)
    assert [[int(a[0]) for a in g] for g in groups] == shape


def test_round_groups_refuses_nothing_to_do() -> None:
    for clips, threads, batch in (([], 1, 1), (_clips(1), 0, 1), (_clips(1), 1, 0)):
        with pytest.raises(ValueError):
            round_groups(clips, threads, batch)


class ClockEngine:
    """Advances a fake clock by a fixed cost per call and per second of audio; the first
    `slow_calls` calls cost `first_cost` more (lazy initialisation). Records every call."""

    name = "clock"
    can_pack = False

    def __init__(
        self,
        per_call: float,
        per_audio_s: float,
        *,
        can_batch: bool = True,
        slow_calls: int = 0,
        first_cost: float = 0.0,
        words: int = 3,
    ) -> None:
        self.now = 0.0
        self.per_call = per_call
        self.per_audio_s = per_audio_s
        self.can_batch = can_batch
        self.slow_calls = slow_calls
        self.first_cost = first_cost
        self.words = words
        self.calls: list[tuple[str, int, dict[str, Any]]] = []
        self.extra: list[float] = []  # added to the clock by call number, after first_cost
        self._lock = threading.Lock()

    def clock(self) -> float:
        return self.now

    def _charge(self, kind: str, audios: Sequence[Audio], kw: dict[str, Any]) -> None:
        with self._lock:
            n = len(self.calls)
            cost = self.per_call + self.per_audio_s * sum(len(a) for a in audios) / SAMPLE_RATE
            if n < self.slow_calls:
                cost += self.first_cost
            if n < len(self.extra):
                cost += self.extra[n]
            self.now += cost
            self.calls.append((kind, len(audios), kw))

    def _segments(self, audio: Audio) -> list[Segment]:
        text = " ".join(["word"] * self.words)
        return [Segment(0.0, len(audio) / SAMPLE_RATE, text, (Word("word", 0.0, 0.1, 1.0),))]

    def transcribe(self, audio: Audio, **kw: Any) -> list[Segment]:
        self._charge("one", [audio], kw)
        return self._segments(audio)

    def transcribe_batch(self, audios: Sequence[Audio], **kw: Any) -> list[list[Segment]]:
        self._charge("batch", audios, kw)
        return [self._segments(a) for a in audios]

    def transcribe_words(self, audio: Audio, **kw: Any) -> list[Any]:
        raise AssertionError("calibration decodes finals, not packed windows")


def test_measure_times_rounds_after_the_first_and_keeps_the_fastest() -> None:
    """One thread, no batching: 4 calls a round. The first round pays 10 s of lazy
    initialisation and is not timed; the timed rounds are slowed by 2, 1, 0 and 0.5 s, and
    the fastest (the third) counts."""
    assert ROUNDS == 4
    engine = ClockEngine(0.5, 0.1, slow_calls=1, first_cost=10.0)
    for extra in (2.0, 1.0, 0.0, 0.5):  # on the first call of each timed round
        engine.extra += [0.0] * 4
        engine.extra[-4] = extra
    engine.extra = [0.0] * 4 + engine.extra
    clips = _clips(5, 5, 5, 5)
    found = measure(engine, clips, threads=1, batch=1, beam_size=1, clock=engine.clock)
    assert len(engine.calls) == 4 * (ROUNDS + 1)
    assert {kind for kind, _, _ in engine.calls} == {"one"}
    round_s = 4 * 0.5 + 20 * 0.1  # 4.0 s for 20 s of audio
    assert found.rounds_s == pytest.approx((round_s + 2, round_s + 1, round_s, round_s + 0.5))
    assert found.rate == pytest.approx(20 / round_s)
    assert found.round_audio_s == pytest.approx(20.0)
    assert found.words == 3 * 4 * ROUNDS  # timed rounds only
    assert (found.threads, found.batch) == (1, 1)


def test_measure_decodes_as_the_scheduler_decodes_finals() -> None:
    """Batches of `batch` through transcribe_batch, word timestamps on, told the language,
    the configured beam."""
    engine = ClockEngine(1.0, 0.0)
    found = measure(engine, _clips(6, 7, 6, 6), threads=2, batch=2, beam_size=5, clock=engine.clock)
    assert [(kind, n) for kind, n, _ in engine.calls] == [("batch", 2)] * 2 * (ROUNDS + 1)
    for _, _, kw in engine.calls:
        assert kw == {"language": "en", "word_timestamps": True, "beam_size": 5}
    # Both threads advance the one fake clock: 2 s of clock per round for 25 s of audio.
    assert found.rate == pytest.approx(25 / 2.0)
    assert (found.threads, found.batch) == (2, 2)


def test_measure_counts_no_words_when_the_engine_hears_none() -> None:
    engine = ClockEngine(1.0, 0.0, words=0)
    found = measure(engine, _clips(6), threads=1, batch=1, beam_size=1, clock=engine.clock)
    assert found.words == 0


def test_measure_of_an_instant_engine_is_infinite() -> None:
    engine = ClockEngine(0.0, 0.0)
    found = measure(engine, _clips(6), threads=1, batch=1, beam_size=1, clock=engine.clock)
    assert found.rate == math.inf
    assert auto_slots(found.rate, 0.45, 512) == 512


def test_calibrate_decodes_the_shipped_clips_alone_when_the_engine_cannot_batch() -> None:
    engine = ClockEngine(0.0, 0.0, can_batch=False)
    found = calibrate(engine, threads=1, batch=4, beam_size=1)
    assert found.batch == 1
    assert {kind for kind, _, _ in engine.calls} == {"one"}
    assert len(engine.calls) == len(CLIP_NAMES) * (ROUNDS + 1)


def test_shipped_clips_are_speech_of_a_typical_final_length() -> None:
    clips = load_clips()
    assert len(clips) == len(CLIP_NAMES) == 4
    lengths = [len(c) / SAMPLE_RATE for c in clips]
    assert all(6.0 < s < 7.5 for s in lengths), lengths
    assert sum(lengths) == pytest.approx(26.2, abs=0.1)
    for clip in clips:
        assert clip.dtype == np.float32
        assert 0.05 < float(np.abs(clip).max()) <= 1.0  # sound, in range


def test_slots_setting_takes_auto_and_numbers() -> None:
    assert Config().slots == 0  # auto by default
    assert load_config({"slots": "auto"}, {}).slots == 0
    assert load_config({}, {"STREAMSCRIBE_SLOTS": "AUTO"}).slots == 0
    assert load_config({}, {"STREAMSCRIBE_SLOTS": "0"}).slots == 0
    assert load_config({"slots": "1"}, {}).slots == 1
    with pytest.raises(ConfigError, match="--slot"):
        load_config({"slots": "-1"}, {})
    with pytest.raises(ConfigError, match="cannot read 'many'"):
        load_config({"slots": "many"}, {})


@pytest.mark.parametrize(
    ("name", "bad", "good"),
    [("auto_slots_factor", 0.0, 0.01), ("auto_slots_max", 0, 1)],
)
def test_auto_slots_settings_must_be_positive(name: str, bad: float, good: float) -> None:
    assert getattr(Config(**cast(dict[str, Any], {name: good})), name) == good
    with pytest.raises(ConfigError, match=name.replace("_", "-")):
        Config(**cast(dict[str, Any], {name: bad}))


def test_the_clips_ship_in_the_wheel() -> None:
    """An installed worker (no repository beside it) finds them: they are package data."""
    pyproject = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    data = pyproject["tool"]["setuptools"]["package-data"]["worker"]
    assert "calibration_audio/*.wav" in data
    folder = Path(__file__).parents[2] / "worker" / "calibration_audio"
    assert sorted(p.stem for p in folder.glob("*.wav")) == list(CLIP_NAMES)
