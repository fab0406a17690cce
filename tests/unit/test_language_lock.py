"""Unit tests for a `language=auto` session's language lock: the policy
(worker/language.py) and how SessionTranscriber applies it (worker/stream.py).

Transcriber audio is whole 512-sample VAD windows ("speech" loud, "silence" zeros, a fake
VAD says 1.0 or 0.0); 50 windows of speech at the session's start plus 0.2 s of padding
after them make a final of 1.8 s. Early finals and interims are off unless a test turns them on.
"""

from __future__ import annotations

import numpy as np
import pytest

from shared.config import Config
from shared.envelope import Word
from shared.errors import ConfigError
from tests.vad_audio import fake_vad, silence, speech
from worker.engine import SAMPLE_RATE, Segment
from worker.language import TOP_LANGUAGES, LanguageLock
from worker.stream import DecodeRequest, Final, Interim, SessionTranscriber, StreamOptions

GERMAN = (("de", 0.9), ("nl", 0.05), ("en", 0.03))
THAI = (("th", 0.91), ("de", 0.05))
ENGLISH = (("en", 0.97), ("cy", 0.01))

# --- the policy ------------------------------------------------------------------------------


def test_no_lock_before_lock_s_of_speech() -> None:
    lock = LanguageLock(lock_s=8.0, share=0.8)
    assert lock.observe(GERMAN, 4.0) is None
    assert lock.observe(GERMAN, 3.9) is None  # 7.9 s: one tenth short
    assert lock.locked is None
    assert lock.observe(GERMAN, 0.1) == "de"
    assert lock.locked == "de"


def test_locks_once_and_then_ignores_detections() -> None:
    lock = LanguageLock(lock_s=2.0, share=0.8)
    assert lock.observe(GERMAN, 3.0) == "de"
    assert lock.observe(ENGLISH, 30.0) is None
    assert lock.locked == "de"


def test_share_edge() -> None:
    """The leading language needs exactly `share` of the weight: 0.8 locks, below not."""
    at = LanguageLock(lock_s=1.0, share=0.8)
    assert at.observe((("fr", 0.8), ("en", 0.2)), 1.0) == "fr"
    below = LanguageLock(lock_s=1.0, share=0.8)
    assert below.observe((("fr", 0.79), ("en", 0.21)), 1.0) is None
    assert below.best_share == pytest.approx(0.79)


def test_one_confident_wrong_utterance_does_not_lock() -> None:
    """A short utterance taken for Thai (as base took espeak German) is outweighed: the
    session locks on German only once German holds the share."""
    lock = LanguageLock(lock_s=6.0, share=0.8)
    assert lock.observe(THAI, 3.4) is None
    assert lock.observe(GERMAN, 3.0) is None  # 6.4 s, but Thai and German split it
    assert lock.locked is None
    for _ in range(8):
        if lock.observe(GERMAN, 3.0) is not None:
            break
    assert lock.locked == "de"
    assert lock.best_share >= 0.8


def test_weight_is_per_second_of_speech() -> None:
    """The same two detections lock whichever language spoke longer."""
    german_long = LanguageLock(lock_s=10.0, share=0.8)
    assert german_long.observe(ENGLISH, 1.0) is None
    assert german_long.observe(GERMAN, 9.0) == "de"  # 0.9 * 9 of 10 s: 0.81
    english_long = LanguageLock(lock_s=10.0, share=0.8)
    assert english_long.observe(GERMAN, 1.0) is None
    assert english_long.observe(ENGLISH, 9.0) == "en"  # (0.97 * 9 + 0.03) of 10 s: 0.876


def test_alternating_languages_never_lock() -> None:
    lock = LanguageLock(lock_s=4.0, share=0.8)
    for i in range(40):
        assert lock.observe(GERMAN if i % 2 else ENGLISH, 2.0) is None
    assert lock.locked is None and lock.seconds == pytest.approx(80.0)


def test_zero_lock_s_never_locks() -> None:
    lock = LanguageLock(lock_s=0.0, share=0.8)
    assert lock.observe(ENGLISH, 100.0) is None
    assert lock.locked is None and lock.seconds == 0.0


def test_empty_detection_and_zero_length_are_ignored() -> None:
    lock = LanguageLock(lock_s=1.0, share=0.8)
    assert lock.observe((), 5.0) is None
    assert lock.observe(ENGLISH, 0.0) is None
    assert lock.seconds == 0.0 and lock.weights == {}


def test_only_the_top_languages_count() -> None:
    lock = LanguageLock(lock_s=100.0, share=0.8)
    many = tuple((f"l{i}", 0.01) for i in range(20))
    lock.observe(many, 1.0)
    assert len(lock.weights) == TOP_LANGUAGES


# --- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("language_lock_s", -0.1),
        ("language_lock_s", float("inf")),
        ("language_lock_s", float("nan")),
        ("language_lock_share", 0.5),
        ("language_lock_share", 1.01),
        ("language", "EN"),
        ("language", "english"),
    ],
)
def test_config_refuses(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        Config(model="base", **{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("language_lock_s", 0.0),
        ("language_lock_share", 0.51),
        ("language_lock_share", 1.0),
        ("language", "auto"),
        ("language", "yue"),
    ],
)
def test_config_accepts(field: str, value: object) -> None:
    Config(model="base", **{field: value})  # type: ignore[arg-type]


def test_options_from_config() -> None:
    opt = StreamOptions.from_config(
        Config(language="auto", language_lock_s=5.0, language_lock_share=0.9)
    )
    assert (opt.language, opt.language_lock_s, opt.language_lock_share) == (None, 5.0, 0.9)
    assert StreamOptions.from_config(Config(language="de", model="base")).language == "de"


def test_config_refuses_another_language_on_an_english_only_model() -> None:
    with pytest.raises(ConfigError, match=r"'de' needs a multilingual model: tiny\.en is English"):
        Config(language="de")
    assert Config(language="auto").language == "auto"  # means English there: allowed


# --- the transcriber -------------------------------------------------------------------------

UTTERANCE_S = (50 * 512 + 3200) / SAMPLE_RATE  # speech(50) from the start, then its pad


def detecting(lock_s: float = 3.0, **options: float | bool) -> SessionTranscriber:
    options.setdefault("interim_results", False)
    options.setdefault("early_final_s", 0.0)
    opt = StreamOptions(language=None, language_lock_s=lock_s, **options)  # type: ignore[arg-type]
    return SessionTranscriber(opt, fake_vad)


def heard(text: str, languages: tuple[tuple[str, float], ...]) -> list[Segment]:
    words = tuple(Word(w, 0.1, 0.4, 0.9) for w in text.split())
    return [Segment(0.1, 0.4, text, words, languages)]


def utterance(t: SessionTranscriber) -> DecodeRequest:
    t.push_audio(np.concatenate([speech(50), silence(16)]))
    req = t.next_request()
    assert req is not None and req.kind == "final"
    return req


def test_requests_detect_until_the_lock_then_name_the_language() -> None:
    t = detecting(lock_s=3.0)
    first = utterance(t)
    assert first.language is None
    assert (first.end - first.start) / SAMPLE_RATE == pytest.approx(UTTERANCE_S)
    [out] = t.complete(first, heard("guten tag", GERMAN))
    assert isinstance(out, Final) and out.locked_language is None  # 1.8 s < 3 s
    second = utterance(t)
    assert second.language is None
    [out] = t.complete(second, heard("wie geht es", GERMAN))
    assert isinstance(out, Final) and out.locked_language == "de"
    assert t.language == "de"
    third = utterance(t)
    assert third.language == "de"
    [out] = t.complete(third, heard("gut", ()))  # told its language: no detection
    assert isinstance(out, Final) and out.locked_language is None


def test_interims_follow_the_lock() -> None:
    t = detecting(lock_s=1.0, interim_results=True, interim_interval_s=1.0)
    [out] = t.complete(utterance(t), heard("bonjour", (("fr", 0.99),)))
    assert isinstance(out, Final) and out.locked_language == "fr"
    t.push_audio(speech(40))  # 1.28 s of an open utterance: an interim is due
    req = t.next_request()
    assert req is not None and req.kind == "interim" and req.language == "fr"
    assert isinstance(t.complete(req, heard("merci", ()))[0], Interim)


def test_interims_do_not_count_towards_the_lock() -> None:
    """An interim's audio is decoded again as the final: counting it would count twice."""
    t = detecting(lock_s=2.5, interim_results=True, interim_interval_s=1.0)
    t.push_audio(speech(40))
    req = t.next_request()
    assert req is not None and req.kind == "interim" and req.language is None
    t.complete(req, heard("hola", (("es", 0.99),)))
    assert t.language_lock.seconds == 0.0


def test_an_early_final_counts_like_any_final() -> None:
    t = detecting(lock_s=1.0, early_final_s=0.2)
    t.push_audio(np.concatenate([speech(50), silence(7)]))
    req = t.next_request()
    assert req is not None and req.early and req.language is None
    t.complete(req, heard("ciao", (("it", 0.95),)))
    t.push_audio(silence(9))  # the silence reaches min_silence_s: the early decode is final
    [final] = t.take_ready()
    assert isinstance(final, Final) and final.early and final.locked_language == "it"
    assert t.language == "it"


def test_an_empty_final_observes_nothing() -> None:
    t = detecting(lock_s=1.0)
    [out] = t.complete(utterance(t), [])
    assert isinstance(out, Final) and out.transcript is None
    assert t.language_lock.seconds == 0.0 and t.language is None


def test_a_session_named_its_language_never_detects() -> None:
    opt = StreamOptions(language="de", language_lock_s=1.0, interim_results=False, early_final_s=0)
    t = SessionTranscriber(opt, fake_vad)
    req = utterance(t)
    assert req.language == "de"
    [out] = t.complete(req, heard("hallo", ENGLISH))  # ignored: the session is not auto
    assert isinstance(out, Final) and out.locked_language is None and t.language == "de"


def test_lock_off_keeps_detecting() -> None:
    t = detecting(lock_s=0.0)
    for _ in range(5):
        req = utterance(t)
        assert req.language is None
        t.complete(req, heard("hello", ENGLISH))
    assert t.language is None
