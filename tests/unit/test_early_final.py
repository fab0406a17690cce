"""Unit tests for early finals (worker/stream.py): an open utterance's final is decoded
once it has been silent for `early_final_s`; if the silence reaches `min_silence_s` that
decode is the final, and if speech resumes it is an interim.

Audio is whole 512-sample VAD windows ("speech" loud, "silence" zeros, a fake VAD says 1.0
or 0.0). Defaults: 0.2 s pad (3200 samples), 0.5 s silence ends an utterance (the 16th
silent window), early final after 0.2 s of silence (the 7th silent window: 6 are 3072
samples, 7 are 3584). Timed interims are pushed out of the way (100 s interval); the
early decode's own interim is still sent when interim results are on.
"""

from __future__ import annotations

import numpy as np
import pytest

from shared.config import Config
from shared.envelope import Word
from shared.errors import ConfigError
from tests.vad_audio import fake_vad, silence, speech
from worker.engine import VAD_WINDOW, Segment
from worker.stream import DecodeRequest, Final, Interim, SessionTranscriber, StreamOptions

W = VAD_WINDOW
PAD = 3200
SPEECH_START, SPEECH_END = 10 * W, 60 * W  # silence(10) + speech(50)


def transcriber(**options: float | bool) -> SessionTranscriber:
    options.setdefault("interim_interval_s", 100.0)  # no timed interims in the way
    return SessionTranscriber(StreamOptions(**options), fake_vad)  # type: ignore[arg-type]


def said(text: str) -> list[Segment]:
    words = tuple(Word(w, 0.1, 0.4, 0.9) for w in text.split())
    return [Segment(0.1, 0.4, text, words)]


def early_request(t: SessionTranscriber) -> DecodeRequest:
    """Speech of 50 windows, then 7 silent ones: the early final is asked for."""
    t.push_audio(np.concatenate([silence(10), speech(50), silence(6)]))
    assert t.next_request() is None  # 0.192 s of silence: not yet
    t.push_audio(silence(1))
    req = t.next_request()
    assert req is not None
    assert (req.kind, req.early, req.result_id) == ("final", True, 0)
    assert (req.start, req.end) == (SPEECH_START - PAD, SPEECH_END + PAD)
    return req


def test_early_final_becomes_the_final_when_the_silence_goes_on() -> None:
    """Decoded while the pause is still short; once the silence reaches min_silence_s
    the same decode is published as the final, with no second decode."""
    t = transcriber()
    req = early_request(t)
    out = t.complete(req, said("hello there"))
    assert [type(o) for o in out] == [Interim]  # meanwhile: an interim of the utterance
    assert out[0].transcript is not None
    assert out[0].transcript.text == "hello there" and not out[0].transcript.is_final
    t.push_audio(silence(8))  # 15 silent windows: still open
    assert t.take_ready() == [] and t.next_request() is None
    t.push_audio(silence(1))  # the 16th ends the utterance
    ready = t.take_ready()
    assert len(ready) == 1 and isinstance(ready[0], Final)
    final = ready[0]
    assert final.early and final.commit_sample == req.end
    assert final.transcript is not None
    assert (final.transcript.result_id, final.transcript.is_final) == (0, True)
    assert final.transcript.text == "hello there"
    assert t.next_request() is None  # nothing decoded twice
    assert t.take_ready() == []
    assert t.finals == 1 and t.committed == req.end


def test_early_final_still_decoding_when_the_utterance_ends_is_the_final() -> None:
    t = transcriber()
    req = early_request(t)
    t.push_audio(silence(9))  # the utterance ends while the decode runs
    assert t.take_ready() == [] and t.next_request() is None
    out = t.complete(req, said("hello"))
    assert len(out) == 1 and isinstance(out[0], Final) and out[0].early
    assert out[0].transcript is not None and out[0].transcript.result_id == 0
    assert t.next_request() is None


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_an_early_final_is_due_when_its_utterance_ended_not_when_it_was_asked_for() -> None:
    """The worker times finals from `due_at` (final_seconds): an early final counts from
    the feed that ended its utterance, whether its decode was done by then (`take_ready`)
    or still running (`complete`), not from the earlier moment its decode was asked for."""
    for decoded_first in (True, False):
        clock = Clock()
        options = StreamOptions(interim_interval_s=100.0)
        t = SessionTranscriber(options, fake_vad, clock=clock)
        clock.now = 1.0
        req = early_request(t)
        if decoded_first:
            t.complete(req, said("hello"))
        clock.now = 2.0
        t.push_audio(silence(9))  # the 16th silent window ends the utterance
        clock.now = 3.0
        out = t.take_ready() if decoded_first else t.complete(req, said("hello"))
        assert len(out) == 1 and isinstance(out[0], Final) and out[0].early
        assert out[0].due_at == 2.0, decoded_first


def test_speech_resuming_turns_the_early_final_into_an_interim() -> None:
    """Speech after the pause: the early decode is an interim, and the utterance's final,
    decoded when it really ends, covers all of it."""
    t = transcriber()
    req = early_request(t)
    assert [type(o) for o in t.complete(req, said("hello"))] == [Interim]
    t.push_audio(np.concatenate([speech(20), silence(16)]))
    assert t.take_ready() == []
    final_req = t.next_request()
    assert final_req is not None and final_req.kind == "final"
    speech_end = SPEECH_END + 7 * W + 20 * W
    assert (final_req.start, final_req.end) == (SPEECH_START - PAD, speech_end + PAD)
    # The second pause had its own early request, which was never asked for (the early
    # one is only due when the session has no decode running; here the utterance ended
    # in one push): the final is an ordinary one.
    assert not final_req.early
    out = t.complete(final_req, said("hello again"))
    assert len(out) == 1 and isinstance(out[0], Final) and not out[0].early
    assert out[0].transcript is not None and out[0].transcript.result_id == 0


def test_speech_resuming_while_the_early_final_decodes() -> None:
    t = transcriber()
    req = early_request(t)
    t.push_audio(speech(10))  # speech again before the decode returns
    out = t.complete(req, said("hello"))
    assert [type(o) for o in out] == [Interim]
    assert out[0].transcript is not None
    assert out[0].transcript.result_id == 0
    t.push_audio(silence(7))  # a second pause: a second early request, for more audio
    second = t.next_request()
    assert second is not None and second.early
    assert second.end == SPEECH_END + 7 * W + 10 * W + PAD
    t.push_audio(silence(9))
    out = t.complete(second, said("hello again"))
    assert len(out) == 1 and isinstance(out[0], Final) and out[0].early


def test_one_early_request_per_pause() -> None:
    t = transcriber()
    req = early_request(t)
    t.complete(req, said("hello"))
    t.push_audio(silence(3))
    assert t.next_request() is None  # same pause: not asked again


def test_without_interim_results_the_early_decode_sends_nothing_until_final() -> None:
    t = transcriber(interim_results=False)
    req = early_request(t)
    assert t.complete(req, said("hello")) == []
    t.push_audio(silence(9))
    ready = t.take_ready()
    assert len(ready) == 1 and isinstance(ready[0], Final) and ready[0].early


def test_a_pad_longer_than_the_early_silence_ends_the_final_at_the_early_audio() -> None:
    """With a 0.4 s pad, 7 silent windows hold only 3584 samples after the speech: the
    early final covers those, and the utterance's final is that same range."""
    t = transcriber(speech_pad_s=0.4)
    t.push_audio(np.concatenate([silence(20), speech(50), silence(7)]))
    req = t.next_request()
    assert req is not None and req.early
    speech_end = 70 * W
    assert (req.start, req.end) == (20 * W - 6400, speech_end + 7 * W)
    t.complete(req, said("hello"))
    t.push_audio(silence(9))
    ready = t.take_ready()
    assert len(ready) == 1 and isinstance(ready[0], Final)
    assert ready[0].commit_sample == speech_end + 7 * W


def test_an_utterance_ended_in_one_push_ends_where_an_early_final_would() -> None:
    """Whether or not the early decode was made in time (here: never, the whole pause
    arrives at once), a 0.4 s pad keeps only the early decode's 7 windows of silence:
    a final's audio does not depend on timing."""
    t = transcriber(speech_pad_s=0.4)
    t.push_audio(np.concatenate([silence(20), speech(50), silence(16)]))
    req = t.next_request()
    assert req is not None and req.kind == "final" and not req.early
    assert (req.start, req.end) == (20 * W - 6400, 70 * W + 7 * W)
    off = transcriber(speech_pad_s=0.4, early_final_s=0.0)
    off.push_audio(np.concatenate([silence(20), speech(50), silence(16)]))
    req = off.next_request()
    assert req is not None and req.end == 70 * W + 6400  # without early finals: the pad


def test_the_next_utterance_gets_the_early_final_as_prompt() -> None:
    t = transcriber(prompt_chars=200)
    req = early_request(t)
    t.complete(req, said("hello there"))
    t.push_audio(np.concatenate([silence(9), speech(20), silence(16)]))
    assert len(t.take_ready()) == 1
    nxt = t.next_request()
    assert nxt is not None and nxt.kind == "final"
    assert (nxt.result_id, nxt.prompt) == (1, "hello there")
    assert nxt.start >= req.end  # never overlaps the early final's audio


@pytest.mark.parametrize(("chars", "prompt"), [(0, ""), (5, "there"), (200, "hello there")])
def test_prompt_chars_is_how_much_of_the_previous_final_the_next_decode_gets(
    chars: int, prompt: str
) -> None:
    t = transcriber(prompt_chars=chars)
    req = early_request(t)
    assert req.prompt == ""  # the session's first utterance has no previous final
    t.complete(req, said("hello there"))
    t.push_audio(np.concatenate([silence(9), speech(20), silence(16)]))
    assert len(t.take_ready()) == 1
    nxt = t.next_request()
    assert nxt is not None and nxt.prompt == prompt


def test_finalize_in_a_pause_makes_the_early_decode_the_final() -> None:
    """A client `finalize` (or the end of the stream) in a pause long enough for an early
    final ends the utterance where the silence would have: the early decode is the final."""
    t = transcriber()
    req = early_request(t)
    t.complete(req, said("hello"))
    t.push_audio(silence(2))
    t.finalize()
    ready = t.take_ready()
    assert len(ready) == 1 and isinstance(ready[0], Final) and ready[0].early
    assert ready[0].commit_sample == req.end
    assert t.next_request() is None


def test_finalize_in_a_pause_ends_at_the_same_place_without_an_early_decode() -> None:
    """The same audio and mark without the early decode having run (the session was
    busy): the final covers the same samples, so its text cannot depend on timing."""
    t = transcriber()
    t.push_audio(np.concatenate([silence(10), speech(50), silence(9)]))
    t.finalize()
    req = t.next_request()
    assert req is not None and not req.early
    assert (req.start, req.end) == (SPEECH_START - PAD, SPEECH_END + PAD)


def test_finalize_before_the_pause_is_long_enough_takes_all_the_audio() -> None:
    t = transcriber()
    t.push_audio(np.concatenate([silence(10), speech(50), silence(6)]))
    t.finalize()
    req = t.next_request()
    assert req is not None and req.kind == "final" and not req.early
    assert req.end == t.total_samples


def test_close_after_speech_resumed_takes_all_the_audio() -> None:
    """The early decode was for an earlier pause: the stream's end cuts the utterance at
    its last sample, and that decode is not used."""
    t = transcriber()
    req = early_request(t)
    t.complete(req, said("hello"))
    t.close(speech(5))
    assert t.take_ready() == []
    final_req = t.next_request()
    assert final_req is not None and not final_req.early
    assert final_req.end == t.total_samples


def test_blip_gets_no_early_final() -> None:
    """Speech shorter than MIN_SPEECH_S (4 windows: 0.128 s) is never decoded."""
    t = transcriber()
    t.push_audio(np.concatenate([silence(10), speech(4), silence(10)]))
    assert t.next_request() is None


@pytest.mark.parametrize("early", [0.0, 0.5, 0.6])
def test_off_at_zero_or_at_min_silence(early: float) -> None:
    t = transcriber(early_final_s=early)
    t.push_audio(np.concatenate([silence(10), speech(50), silence(15)]))
    assert t.next_request() is None
    t.push_audio(silence(1))
    req = t.next_request()
    assert req is not None and req.kind == "final" and not req.early


def test_done_waits_for_a_ready_final_to_be_taken() -> None:
    t = transcriber(interim_results=False)
    req = early_request(t)
    t.complete(req, said("hello"))
    t.close(silence(9))
    assert not t.done
    assert len(t.take_ready()) == 1
    assert t.done


def test_config_edges() -> None:
    assert Config(early_final_s=0.0).early_final_s == 0.0
    assert Config().early_final_s == 0.2
    with pytest.raises(ConfigError, match="early-final-s"):
        Config(early_final_s=-0.01)
    assert StreamOptions.from_config(Config(early_final_s=0.3)).early_final_s == 0.3
