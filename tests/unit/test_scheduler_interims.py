"""Unit tests for when a session asks for interims (worker/stream.py, the session side of
the interim policy): not during a pause, where a final may be about to follow.

Audio is whole 512-sample VAD windows; "speech" is loud, "silence" zeros, and the fake VAD
says 1.0 or 0.0. Defaults: 1 s interim interval, 0.5 s silence ends an utterance, no
interim after 0.2 s (7 windows) of pause. Early finals (tests/unit/test_early_final.py)
are off here unless a test turns them on: these tests are about interims alone.
"""

from __future__ import annotations

import numpy as np
import pytest

from shared.config import Config
from shared.errors import ConfigError
from tests.vad_audio import fake_vad, silence, speech
from worker.engine import VAD_WINDOW
from worker.stream import SessionTranscriber, StreamOptions

W = VAD_WINDOW


def transcriber(**options: float) -> SessionTranscriber:
    options.setdefault("early_final_s", 0.0)
    return SessionTranscriber(StreamOptions(**options), fake_vad)  # type: ignore[arg-type]


def test_no_interim_during_a_pause_then_one_when_speech_resumes() -> None:
    """A pause of 0.2 s or more holds the due interim back; the next speech brings it."""
    t = transcriber()
    t.push_audio(np.concatenate([silence(5), speech(25), silence(7)]))  # 32 windows > 1 s
    assert t.next_request() is None  # due by audio, but 7 windows (0.22 s) of pause
    t.push_audio(speech(1))
    req = t.next_request()
    assert req is not None and req.kind == "interim"


def test_a_pause_that_ends_the_utterance_gives_the_final_no_interim_before_it() -> None:
    """Speech, then silence until the utterance ends: the only request is its final."""
    t = transcriber()
    t.push_audio(np.concatenate([silence(5), speech(25)]))
    assert t.next_request() is None  # not yet 1 s of audio
    kinds = []
    for _ in range(20):  # 20 windows of silence, one at a time, as a stream brings them
        t.push_audio(silence(1))
        req = t.next_request()
        if req is not None:
            kinds.append(req.kind)
            break
    assert kinds == ["final"]


def test_a_short_gap_between_words_does_not_hold_an_interim_back() -> None:
    """Under 0.2 s of pause (6 windows) the interim is asked for as usual."""
    t = transcriber()
    t.push_audio(np.concatenate([silence(5), speech(26), silence(6)]))
    req = t.next_request()
    assert req is not None and req.kind == "interim"


def test_pause_rule_can_be_widened() -> None:
    """interim_pause_s is a parameter: with 0.5 s, a 0.22 s pause no longer holds it back."""
    t = transcriber(interim_pause_s=0.5)
    t.push_audio(np.concatenate([silence(5), speech(25), silence(7)]))
    req = t.next_request()
    assert req is not None and req.kind == "interim"


def test_zero_turns_the_pause_rule_off() -> None:
    """interim_pause_s = 0: the due interim is asked for even in a pause (the old rule)."""
    t = transcriber(interim_pause_s=0.0)
    t.push_audio(np.concatenate([silence(5), speech(25), silence(7)]))
    req = t.next_request()
    assert req is not None and req.kind == "interim"


def test_config_refuses_a_negative_pause() -> None:
    """The worker setting must be >= 0, and its error names the flag."""
    with pytest.raises(ConfigError) as info:
        Config(interim_pause_s=-0.1)
    assert "--interim-pause-s" in str(info.value)
