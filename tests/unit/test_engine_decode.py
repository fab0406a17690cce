"""Unit tests for how WhisperEngine calls faster-whisper and filters what comes back.

No model is loaded: the engine is built around a fake `WhisperModel` that records its
arguments and returns prepared segments (lazily, like the real one).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest

from shared.config import MIN_ENCODE_S, Config
from shared.errors import ConfigError
from worker.engine import (
    COMPRESSION_RATIO_MAX,
    FULL_WINDOW_FRAMES,
    TRAILING_SEGMENT_MIN_LOGPROB,
    TRAILING_SEGMENT_NO_SPEECH,
    TRAILING_SEGMENT_NO_SPEECH_LOGPROB,
    WhisperEngine,
    _windowed_model_class,
    encode_frames,
    max_new_tokens,
)


@dataclass
class FakeWord:
    word: str
    start: float
    end: float
    probability: float = 0.9


@dataclass
class FakeSegment:
    start: float
    end: float
    text: str
    avg_logprob: float
    words: list[FakeWord] = field(default_factory=list)
    compression_ratio: float = 1.0
    no_speech_prob: float = 0.0


class FakeModel:
    def __init__(self, segments: list[FakeSegment]) -> None:
        self.segments = segments
        self.kwargs: dict[str, Any] = {}
        self.iterated = 0
        self.encode_frames = FULL_WINDOW_FRAMES
        self.window_at_call = 0
        self.windows: list[int] = []  # the window of every call
        self.by_window: dict[int, list[FakeSegment]] = {}  # other segments for a window

    def transcribe(self, audio: Any, **kwargs: Any) -> tuple[Iterator[FakeSegment], None]:
        self.kwargs = kwargs
        self.window_at_call = self.encode_frames
        self.windows.append(self.encode_frames)
        segments = self.by_window.get(self.encode_frames, self.segments)

        def lazy() -> Iterator[FakeSegment]:
            for seg in segments:
                self.iterated += 1
                yield seg

        return lazy(), None


def engine_with(segments: list[FakeSegment]) -> tuple[WhisperEngine, FakeModel]:
    engine = object.__new__(WhisperEngine)  # no model load
    model = FakeModel(segments)
    engine._model = model
    engine.name = "fake"
    engine.multilingual = False
    engine.encode_min_s = 15.0
    engine.window_retries = 0
    return engine, model


def decode(engine: WhisperEngine) -> list[str]:
    audio = np.zeros(16000, np.float32)
    out = engine.transcribe(audio, language="en", word_timestamps=True, beam_size=1)
    return [s.text for s in out]


def test_no_temperature_fallback() -> None:
    """Each call decodes at temperature 0 only: no re-decoding chain."""
    engine, model = engine_with([FakeSegment(0.0, 0.5, " However.", -0.5)])
    assert decode(engine) == ["However."]
    assert model.kwargs["temperature"] == 0.0


def test_low_confidence_trailing_segment_is_dropped() -> None:
    """A second segment below the log-probability threshold (a guess at the silent tail)
    is dropped, and the generator is still run to its end."""
    engine, model = engine_with(
        [
            FakeSegment(0.0, 0.8, " However.", -0.49, [FakeWord("However.", 0.0, 0.8)]),
            FakeSegment(0.8, 1.2, " Remember.", TRAILING_SEGMENT_MIN_LOGPROB - 0.6),
        ]
    )
    assert decode(engine) == ["However."]
    assert model.iterated == 2


def test_confident_later_segments_and_a_weak_first_one_are_kept() -> None:
    """Only later, low-confidence segments go: a weak first segment (it may be all there is)
    and confident later ones stay, in order."""
    engine, _ = engine_with(
        [
            FakeSegment(0.0, 4.0, " first part", TRAILING_SEGMENT_MIN_LOGPROB - 0.5),
            FakeSegment(4.0, 8.0, " second part", -0.3),
            FakeSegment(8.0, 9.0, " third part", TRAILING_SEGMENT_MIN_LOGPROB + 0.01),
        ]
    )
    assert decode(engine) == ["first part", "second part", "third part"]


# --- the encoder window -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "min_s", "frames"),
    [
        (0.0, 15.0, 1500),  # nothing: the minimum
        (1.0, 15.0, 1500),
        (13.99, 15.0, 1500),  # 1400 content frames + 100 margin: exactly the minimum
        (14.0, 15.0, 1600),  # 1401 + 100: rounded up to the next second
        (20.0, 10.0, 2200),
        (27.0, 15.0, 2900),
        (29.5, 15.0, FULL_WINDOW_FRAMES),  # never more than Whisper's window
        (45.0, 15.0, FULL_WINDOW_FRAMES),
        (1.0, 30.0, FULL_WINDOW_FRAMES),  # 30: always the full window
        (1.0, MIN_ENCODE_S, 1000),
    ],
)
def test_encode_frames(seconds: float, min_s: float, frames: int) -> None:
    assert encode_frames(round(seconds * 16000), min_s) == frames


def test_each_call_sets_the_window_from_its_own_audio() -> None:
    engine, model = engine_with([FakeSegment(0.0, 0.5, " However.", -0.5)])
    audio = np.zeros(16000 * 20, np.float32)
    engine.transcribe(audio, language="en", word_timestamps=True, beam_size=1)
    assert model.window_at_call == 2200
    engine.transcribe_words(np.zeros(16000, np.float32), language="en", beam_size=1)
    assert model.window_at_call == 1500
    engine.encode_min_s = 30.0
    decode(engine)
    assert model.window_at_call == FULL_WINDOW_FRAMES


class FakeCt2:
    device = "cpu"

    def __init__(self) -> None:
        self.device_index = [0]
        self.shapes: list[tuple[int, ...]] = []

    def encode(self, features: Any, to_cpu: bool = False) -> str:
        self.shapes.append(tuple(features.shape))
        return "encoded"


def test_windowed_model_encodes_only_the_window() -> None:
    """faster-whisper pads every window to 3000 frames; the model cuts that padding off
    before CTranslate2 encodes it, and leaves a shorter input alone."""
    cls = _windowed_model_class()
    model = object.__new__(cls)  # no model load
    model.model = FakeCt2()
    model.encode_frames = 1200
    padded = np.zeros((80, FULL_WINDOW_FRAMES), np.float32)
    assert model.encode(padded) == "encoded"
    model.encode(np.zeros((80, 900), np.float32))
    model.encode_frames = FULL_WINDOW_FRAMES
    model.encode(padded)
    assert model.model.shapes == [(1, 80, 1200), (1, 80, 900), (1, 80, FULL_WINDOW_FRAMES)]


@pytest.mark.parametrize("value", [MIN_ENCODE_S, 15.0, 30.0])
def test_encode_min_s_accepted(value: float) -> None:
    assert Config(encode_min_s=value).encode_min_s == value


@pytest.mark.parametrize("value", [MIN_ENCODE_S - 0.01, 30.01, float("nan")])
def test_encode_min_s_refused(value: float) -> None:
    with pytest.raises(ConfigError, match="ENCODE_MIN_S"):
        Config(encode_min_s=value)


LOOP = " . . . . . . . . . . . . . . . . . . . . . . . . . . . . . . . . . . . . . ."


@pytest.mark.parametrize("no_speech", [0.0, TRAILING_SEGMENT_NO_SPEECH - 0.01])
def test_a_looping_short_window_decode_is_done_again_over_the_full_window(
    no_speech: float,
) -> None:
    """A confident loop of dots after the first sentence that the model does not rate as
    non-speech may have eaten words: the call is decoded again over 30 s, and that result
    is the one returned."""
    engine, model = engine_with(
        [
            FakeSegment(0.0, 2.0, " The little boat sailed away.", -0.2),
            FakeSegment(
                2.0,
                3.0,
                LOOP,
                -0.01,
                compression_ratio=COMPRESSION_RATIO_MAX + 0.1,
                no_speech_prob=no_speech,
            ),
        ]
    )
    model.by_window[FULL_WINDOW_FRAMES] = [
        FakeSegment(0.0, 2.0, " The little boat sailed that way.", -0.3)
    ]
    assert decode(engine) == ["The little boat sailed that way."]
    assert model.windows == [1500, FULL_WINDOW_FRAMES]
    assert engine.window_retries == 1


def test_a_looping_first_segment_is_decoded_again_whatever_its_no_speech_rating() -> None:
    engine, model = engine_with(
        [FakeSegment(0.0, 2.0, LOOP, -0.01, compression_ratio=29.7, no_speech_prob=0.9)]
    )
    model.by_window[FULL_WINDOW_FRAMES] = [FakeSegment(0.0, 2.0, " hello there", -0.3)]
    assert decode(engine) == ["hello there"]
    assert model.windows == [1500, FULL_WINDOW_FRAMES] and engine.window_retries == 1


@pytest.mark.parametrize("no_speech", [TRAILING_SEGMENT_NO_SPEECH, 0.92])
def test_a_loop_over_the_silent_tail_is_dropped_without_a_full_window(no_speech: float) -> None:
    """The fixture that loops at 12-15 s: the first segment is right ("sailed away"), the
    dots after it are rated non-speech (0.92): they are dropped and the first segment
    stands, with no 30 s decode (that one heard "sailed that way")."""
    engine, model = engine_with(
        [
            FakeSegment(0.0, 2.0, " The little boat sailed away.", -0.2),
            FakeSegment(2.0, 2.3, LOOP, -0.02, compression_ratio=29.7, no_speech_prob=no_speech),
        ]
    )
    model.by_window[FULL_WINDOW_FRAMES] = [
        FakeSegment(0.0, 2.0, " The little boat sailed that way.", -0.3)
    ]
    assert decode(engine) == ["The little boat sailed away."]
    assert model.windows == [1500] and engine.window_retries == 0


@pytest.mark.parametrize(
    ("seconds", "cap"),
    [(0.0, 20), (1.0, 40), (2.35, 67), (9.95, 219), (9.96, None), (28.0, None)],
)
def test_generation_is_capped_by_the_audio_length(seconds: float, cap: int | None) -> None:
    """A loop on short audio stops at 20 + 20 tokens a second instead of Whisper's 448;
    from 220 on, no cap (a long prompt plus a larger one could exceed 448)."""
    assert max_new_tokens(round(seconds * 16000)) == cap


def test_each_call_passes_its_token_cap() -> None:
    engine, model = engine_with([FakeSegment(0.0, 0.5, " hi", -0.2)])
    decode(engine)  # 1 s of audio
    assert model.kwargs["max_new_tokens"] == 40
    engine.transcribe(
        np.zeros(16000 * 20, np.float32), language="en", word_timestamps=False, beam_size=1
    )
    assert model.kwargs["max_new_tokens"] is None


def test_a_ratio_at_the_threshold_is_not_a_loop() -> None:
    engine, model = engine_with(
        [
            FakeSegment(0.0, 2.0, " one", -0.2),
            FakeSegment(2.0, 3.0, " two two", -0.2, compression_ratio=COMPRESSION_RATIO_MAX),
        ]
    )
    assert decode(engine) == ["one", "two two"]
    assert model.windows == [1500] and engine.window_retries == 0


def test_a_loop_after_the_first_segment_of_a_full_window_is_dropped() -> None:
    """Over the full window there is nothing to retry: a looping later segment goes like
    a low-confidence one; a looping first segment (all there is) stays."""
    engine, model = engine_with(
        [
            FakeSegment(0.0, 2.0, " first", -0.2, compression_ratio=3.0),
            FakeSegment(2.0, 3.0, LOOP, -0.01, compression_ratio=29.7),
        ]
    )
    engine.encode_min_s = 30.0
    assert decode(engine) == ["first"]
    assert model.windows == [FULL_WINDOW_FRAMES] and engine.window_retries == 0


def test_packed_words_of_a_looping_segment_are_unreliable() -> None:
    engine, _ = engine_with(
        [
            FakeSegment(0.0, 1.0, " yes", -0.2, [FakeWord(" yes", 0.0, 1.0)]),
            FakeSegment(1.0, 2.0, LOOP, -0.01, [FakeWord(" .", 1.0, 2.0)], 29.7),
        ]
    )
    engine.encode_min_s = 30.0
    words = engine.transcribe_words(np.zeros(16000, np.float32), language="en", beam_size=1)
    assert [(w.text, w.reliable) for w in words] == [(" yes", True), (" .", False)]


@pytest.mark.parametrize(
    ("no_speech", "logprob", "kept"),
    [
        (0.68, -1.00 + 0.01, False),  # jfk: " Thank you." after the last word
        (TRAILING_SEGMENT_NO_SPEECH, TRAILING_SEGMENT_NO_SPEECH_LOGPROB - 0.01, False),
        (TRAILING_SEGMENT_NO_SPEECH - 0.01, TRAILING_SEGMENT_NO_SPEECH_LOGPROB - 0.01, True),
        (TRAILING_SEGMENT_NO_SPEECH, TRAILING_SEGMENT_NO_SPEECH_LOGPROB, True),
        (0.07, -0.24, True),  # a real continuation: same window, confident
    ],
)
def test_a_later_segment_the_model_rates_as_non_speech_is_dropped(
    no_speech: float, logprob: float, kept: bool
) -> None:
    engine, _ = engine_with(
        [
            FakeSegment(0.0, 2.0, " Ask what you can do for your country.", -0.3),
            FakeSegment(2.8, 2.9, " Thank you.", logprob, no_speech_prob=no_speech),
        ]
    )
    expected = ["Ask what you can do for your country."] + (["Thank you."] if kept else [])
    assert decode(engine) == expected


def test_a_first_segment_rated_non_speech_is_kept() -> None:
    """The first segment may be all there is (a quiet speaker): never dropped."""
    engine, _ = engine_with([FakeSegment(0.0, 1.0, " Okay.", -0.9, no_speech_prob=0.6)])
    assert decode(engine) == ["Okay."]


def test_the_window_is_per_thread() -> None:
    """With several decode threads on one model, each call's window is its own."""
    import threading

    model = object.__new__(_windowed_model_class())
    model.encode_frames = 1100
    seen: list[int] = []

    def other() -> None:
        seen.append(model.encode_frames)  # not set in this thread: the full window
        model.encode_frames = 2300
        seen.append(model.encode_frames)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [FULL_WINDOW_FRAMES, 2300]
    assert model.encode_frames == 1100


@pytest.mark.parametrize(("value", "ok"), [(0, False), (1, True), (2, True)])
def test_decode_threads_edge(value: int, ok: bool) -> None:
    if ok:
        assert Config(decode_threads=value).decode_threads == value
    else:
        with pytest.raises(ConfigError, match="DECODE_THREADS"):
            Config(decode_threads=value)
