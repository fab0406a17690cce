"""Unit tests for how WhisperEngine calls faster-whisper and filters what comes back.

No model is loaded: the engine is built around a fake `WhisperModel` that records its
arguments and returns prepared segments (lazily, like the real one).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.engine import TRAILING_SEGMENT_MIN_LOGPROB, WhisperEngine


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


class FakeModel:
    def __init__(self, segments: list[FakeSegment]) -> None:
        self.segments = segments
        self.kwargs: dict[str, Any] = {}
        self.iterated = 0

    def transcribe(self, audio: Any, **kwargs: Any) -> tuple[Iterator[FakeSegment], None]:
        self.kwargs = kwargs

        def lazy() -> Iterator[FakeSegment]:
            for seg in self.segments:
                self.iterated += 1
                yield seg

        return lazy(), None


def engine_with(segments: list[FakeSegment]) -> tuple[WhisperEngine, FakeModel]:
    engine = object.__new__(WhisperEngine)  # no model load
    model = FakeModel(segments)
    engine._model = model
    engine.name = "fake"
    engine.multilingual = False
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
