"""Unit tests for worker/stream.py (SessionTranscriber) with a fake VAD and synthetic audio.

Audio is built from whole 512-sample VAD windows at 16 kHz: "speech" is a constant 0.5,
"silence" is zeros, and the fake VAD says 1.0 for a window whose mean absolute amplitude
is over 0.1, else 0.0. With the default options (0.5 s silence = 8000 samples, 0.2 s pad
= 3200 samples, 1 s interim interval = 16000 samples) the sample positions below follow
directly from the window counts. Early finals are off in this file (`early_final_s=0`):
they are tested in tests/unit/test_early_final.py.
"""

from __future__ import annotations

import itertools
from typing import Any, cast

import numpy as np
import pytest

from shared.envelope import Transcript, Word
from tests.vad_audio import fake_vad, silence, speech
from worker.engine import SAMPLE_RATE, VAD_WINDOW, Audio, Segment
from worker.stream import (
    DecodeRequest,
    Final,
    Interim,
    Output,
    SessionTranscriber,
    StreamOptions,
)

W = VAD_WINDOW
PAD = 3200  # default speech_pad_s * SAMPLE_RATE
NO_INTERIMS = StreamOptions(interim_results=False, early_final_s=0.0)


def transcriber(options: StreamOptions = NO_INTERIMS, **kwargs: Any) -> SessionTranscriber:
    return SessionTranscriber(options, fake_vad, **kwargs)


def push(t: SessionTranscriber, *parts: Audio) -> None:
    t.push_audio(np.concatenate(parts))


def said(text: str, start: float = 0.0, end: float = 0.5) -> list[Segment]:
    """A one-segment decode result whose words share the segment's span."""
    words = tuple(Word(w, start, end, 0.9) for w in text.split())
    return [Segment(start, end, text, words)]


def decode_all(t: SessionTranscriber, text: str = "hello") -> list[tuple[DecodeRequest, Output]]:
    """Run every decode the transcriber asks for, answering each with `text`."""
    done = []
    while (req := t.next_request()) is not None:
        for out in t.complete(req, said(text) if text else []):
            done.append((req, out))
    return done


def finals_of(t: SessionTranscriber) -> list[DecodeRequest]:
    """Ranges of every final the transcriber asks for (answered with text) until none is left."""
    return [req for req, _ in decode_all(t) if req.kind == "final"]


# --- utterance boundaries ------------------------------------------------------------------


def test_silence_alone_requests_nothing() -> None:
    """Pure silence opens no utterance and asks for no decode."""
    t = transcriber(StreamOptions(early_final_s=0.0))
    push(t, silence(200))
    assert t.next_request() is None
    t.close()
    assert t.done


def test_utterance_ends_after_exactly_min_silence() -> None:
    """15 silent windows (7680 samples) keep the utterance open; the 16th (8192) ends it."""
    t = transcriber()
    push(t, silence(10), speech(50), silence(15))
    assert t.next_request() is None
    push(t, silence(1))
    req = t.next_request()
    assert req is not None and req.kind == "final"


def test_final_covers_the_speech_plus_padding() -> None:
    """The one final request spans speech_pad_s before the first and after the last speech."""
    t = transcriber()
    audio = np.concatenate([silence(10), speech(50), silence(16)])
    t.push_audio(audio)
    req = t.next_request()
    assert req is not None
    speech_start, speech_end = 10 * W, 60 * W
    assert (req.kind, req.result_id) == ("final", 0)
    assert (req.start, req.end) == (speech_start - PAD, speech_end + PAD)
    np.testing.assert_array_equal(req.audio, audio[req.start : req.end])


def test_exactly_one_final_per_utterance() -> None:
    """An ended utterance yields one final request and nothing after it is completed."""
    t = transcriber()
    push(t, silence(10), speech(50), silence(40))
    req = t.next_request()
    assert req is not None
    assert t.complete(req, said("hi"))[0] == Final(
        Transcript(
            0,
            True,
            round(req.start / SAMPLE_RATE, 3),
            round(req.start / SAMPLE_RATE + 0.5, 3),
            "hi",
            (
                Word(
                    "hi",
                    round(req.start / SAMPLE_RATE, 3),
                    round(req.start / SAMPLE_RATE + 0.5, 3),
                    0.9,
                ),
            ),
        ),
        commit_sample=req.end,
    )
    assert t.next_request() is None


def test_padding_follows_the_option() -> None:
    """With speech_pad_s=0 the final covers exactly the speech windows."""
    t = transcriber(StreamOptions(early_final_s=0.0, interim_results=False, speech_pad_s=0.0))
    push(t, silence(10), speech(50), silence(16))
    req = t.next_request()
    assert req is not None
    assert (req.start, req.end) == (10 * W, 60 * W)


def test_padding_never_reaches_before_the_session_start() -> None:
    """Speech at sample 0 gives a final that starts at 0, not at -pad."""
    t = transcriber()
    push(t, speech(20), silence(16))
    req = t.next_request()
    assert req is not None
    assert req.start == 0


def test_chunking_does_not_change_the_result() -> None:
    """Feeding the same audio in ragged pieces gives the same finals as one push."""
    audio = np.concatenate([silence(10), speech(50), silence(20), speech(30), silence(20)])
    whole = transcriber()
    whole.push_audio(audio)
    pieces = transcriber()
    for i in range(0, audio.size, 700):
        pieces.push_audio(audio[i : i + 700])
    assert [(r.start, r.end) for r in finals_of(whole)] == [
        (r.start, r.end) for r in finals_of(pieces)
    ]


def test_empty_push_is_ignored() -> None:
    """Pushing zero samples changes nothing."""
    t = transcriber()
    t.push_audio(np.zeros(0, np.float32))
    assert t.total_samples == 0


# --- scheduling ------------------------------------------------------------------------


def test_one_request_at_a_time() -> None:
    """While a decode is outstanding next_request returns None, even with finals pending."""
    t = transcriber()
    push(t, silence(10), speech(20), silence(20), speech(20), silence(20))
    first = t.next_request()
    assert first is not None
    assert t.next_request() is None
    t.complete(first, said("one"))
    second = t.next_request()
    assert second is not None and second.start >= first.end


def test_finals_are_requested_before_interims() -> None:
    """With an ended utterance pending and an open one due an interim, the final comes first."""
    t = transcriber(StreamOptions(early_final_s=0.0))
    push(t, silence(10), speech(20), silence(20), speech(40))
    first = t.next_request()
    assert first is not None and first.kind == "final"
    t.complete(first, said("one"))
    second = t.next_request()
    assert second is not None and second.kind == "interim"
    assert second.result_id == 1


def test_finals_come_in_utterance_order() -> None:
    """Several ended utterances are finalized oldest first with rising result_ids."""
    t = transcriber()
    push(t, *(p for _ in range(3) for p in (silence(10), speech(20), silence(20))))
    reqs = finals_of(t)
    assert [r.result_id for r in reqs] == [0, 1, 2]
    assert [r.start for r in reqs] == sorted(r.start for r in reqs)


# --- interims ----------------------------------------------------------------------------


def test_interim_after_each_interval_of_new_speech() -> None:
    """An interim is due once 1 s (16000 samples) of audio follows the utterance start."""
    t = transcriber(StreamOptions(early_final_s=0.0))
    push(t, silence(10), speech(31))  # 31 windows = 15872 samples of speech
    assert t.next_request() is None
    push(t, speech(1))  # 16384
    req = t.next_request()
    assert req is not None
    assert (req.kind, req.result_id, req.start, req.end) == ("interim", 0, 10 * W - PAD, 42 * W)
    out = t.complete(req, said("hel"))
    assert out == [
        Interim(Transcript(0, False, 0.12, 0.62, "hel", (Word("hel", 0.12, 0.62, 0.9),)))
    ]
    push(t, speech(31))  # 15872 new samples since the last interim: not yet
    assert t.next_request() is None
    push(t, speech(1))
    again = t.next_request()
    assert again is not None and again.kind == "interim" and again.end == 74 * W


def test_an_interim_says_how_much_of_its_utterance_the_client_has_not_seen() -> None:
    """`unseen_s`: audio since the utterance's start, or since the end of the last
    interim that produced text; an interim that produced nothing leaves it growing."""
    t = transcriber(StreamOptions(early_final_s=0.0))
    push(t, silence(10), speech(32))
    first = t.next_request()
    assert first is not None and first.kind == "interim"
    assert first.unseen_s == pytest.approx((first.end - first.start) / SAMPLE_RATE)
    assert t.complete(first, said("")) == []  # no text: nothing shown
    push(t, speech(32))
    second = t.next_request()
    assert second is not None and second.kind == "interim"
    assert second.unseen_s == pytest.approx((second.end - second.start) / SAMPLE_RATE)
    assert t.complete(second, said("hel"))  # shown up to second.end
    push(t, speech(32))
    third = t.next_request()
    assert third is not None and third.kind == "interim"
    assert third.unseen_s == pytest.approx((third.end - second.end) / SAMPLE_RATE)


def test_no_interims_when_interim_results_is_false() -> None:
    """With interim_results=False, long open speech asks for no decode at all."""
    t = transcriber(NO_INTERIMS)
    push(t, silence(10), speech(300))
    assert t.next_request() is None


def test_interim_with_empty_text_yields_nothing() -> None:
    """An interim decode that found no words produces no output."""
    t = transcriber(StreamOptions(early_final_s=0.0))
    push(t, silence(10), speech(40))
    req = t.next_request()
    assert req is not None and req.kind == "interim"
    assert t.complete(req, []) == []


def test_interim_of_an_utterance_that_ended_meanwhile_is_dropped() -> None:
    """An interim completed after its utterance has ended (and nothing is open) is not sent."""
    t = transcriber(StreamOptions(early_final_s=0.0))
    push(t, silence(10), speech(40))
    req = t.next_request()
    assert req is not None and req.kind == "interim"
    push(t, silence(20))
    assert t.complete(req, said("late")) == []
    final = t.next_request()
    assert final is not None and final.kind == "final" and final.result_id == 0


def test_interims_carry_the_result_id_of_the_next_final() -> None:
    """After two finals, the open utterance's interim has result_id 2."""
    t = transcriber(StreamOptions(early_final_s=0.0))
    push(t, *(p for _ in range(2) for p in (silence(10), speech(20), silence(20))))
    push(t, speech(40))
    kinds = [(req.kind, req.result_id) for req, _ in decode_all(t)]
    assert kinds == [("final", 0), ("final", 1), ("interim", 2)]


# --- finals and result ids ------------------------------------------------------------------


def test_empty_final_yields_final_none_and_uses_no_result_id() -> None:
    """A final decode with no text gives Final(None) and the next final still gets id 0."""
    t = transcriber()
    push(t, silence(10), speech(20), silence(20), speech(20), silence(20))
    first = t.next_request()
    assert first is not None
    assert t.complete(first, []) == [Final(None, first.end)]
    assert t.finals == 0
    second = t.next_request()
    assert second is not None and second.result_id == 0
    (out,) = t.complete(second, said("words"))
    assert isinstance(out, Final) and out.transcript is not None
    assert out.transcript.result_id == 0


def test_whitespace_only_final_counts_as_empty() -> None:
    """Segments whose text is only whitespace count as no words."""
    t = transcriber()
    push(t, silence(10), speech(20), silence(20))
    req = t.next_request()
    assert req is not None
    assert t.complete(req, [Segment(0.0, 0.5, "  ", ())]) == [Final(None, req.end)]


def test_result_ids_count_up_across_utterances() -> None:
    """Three utterances with words give finals 0, 1, 2; the counter ends at 3."""
    t = transcriber()
    push(t, *(p for _ in range(3) for p in (silence(10), speech(20), silence(20))))
    ids = [
        out.transcript.result_id
        for _, out in decode_all(t)
        if isinstance(out, Final) and out.transcript
    ]
    assert ids == [0, 1, 2]
    assert t.finals == 3


def test_commit_sample_advances_to_the_end_of_each_final() -> None:
    """Each Final reports that everything before its request's end is handled."""
    t = transcriber()
    push(t, *(p for _ in range(2) for p in (silence(10), speech(20), silence(20))))
    results = decode_all(t)
    assert [out.commit_sample for _, out in results if isinstance(out, Final)] == [
        req.end for req, _ in results
    ]
    assert t.committed == results[-1][0].end


def test_abandoned_final_is_asked_for_again() -> None:
    """A final whose decode failed is requested again with the same range and id."""
    t = transcriber()
    push(t, silence(10), speech(20), silence(20))
    req = t.next_request()
    assert req is not None
    t.abandon_request(req)
    again = t.next_request()
    assert again is not None
    assert (again.kind, again.start, again.end, again.result_id) == (
        "final",
        req.start,
        req.end,
        req.result_id,
    )


def test_resumed_transcriber_continues_ids_and_positions() -> None:
    """start_sample and finals carry on a resumed session's numbering and timeline."""
    t = transcriber(start_sample=160000, finals=3)
    push(t, silence(10), speech(50), silence(16))
    req = t.next_request()
    assert req is not None
    assert (req.start, req.result_id) == (160000 + 10 * W - PAD, 3)
    (out,) = t.complete(req, said("again", 0.2, 0.7))
    assert isinstance(out, Final) and out.transcript is not None
    assert out.transcript.result_id == 3
    assert out.transcript.start == pytest.approx(10.0 + 0.12 + 0.2)


# --- when a final fell due (Final.due_at, the worker's final_seconds) --------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_final_is_timed_from_the_feed_that_ended_its_utterance() -> None:
    """`due_at` is the clock when the VAD ended the utterance, not when its final was
    asked for or decoded; a final asked for again (its decode abandoned) keeps it; and
    without a clock every final is due at 0."""
    clock = Clock()
    t = SessionTranscriber(NO_INTERIMS, fake_vad, clock=clock)
    clock.now = 10.0
    push(t, silence(10), speech(20), silence(10))  # open: 10 silent windows of 16
    clock.now = 20.0
    push(t, silence(10), speech(20), silence(20))  # ends the first, then the second
    clock.now = 30.0
    first = t.next_request()
    assert first is not None
    clock.now = 40.0
    (out,) = t.complete(first, said("one"))
    assert isinstance(out, Final) and out.due_at == 20.0
    second = t.next_request()
    assert second is not None
    t.abandon_request(second)
    clock.now = 50.0
    again = t.next_request()
    assert again is not None
    (out,) = t.complete(again, said("two"))
    assert isinstance(out, Final) and out.due_at == 20.0
    untimed = transcriber()
    push(untimed, silence(10), speech(20), silence(20))
    assert [cast(Final, out).due_at for _, out in decode_all(untimed)] == [0.0]  # no interims


def test_each_piece_of_a_cut_utterance_is_due_when_it_was_cut() -> None:
    clock = Clock()
    opts = StreamOptions(early_final_s=0.0, interim_results=False, max_utterance_s=3.0)
    t = SessionTranscriber(opts, fake_vad, clock=clock)
    clock.now = 1.0
    push(t, silence(10), speech(100))  # 3.2 s of speech: cut once
    clock.now = 2.0
    push(t, speech(100), silence(20))  # cut again, then ended by the silence
    clock.now = 3.0
    finals = [out for _, out in decode_all(t) if isinstance(out, Final)]
    assert [f.due_at for f in finals] == [1.0, 2.0, 2.0]


# --- finalize and close ------------------------------------------------------------------


def test_finalize_ends_the_open_utterance_at_once() -> None:
    """finalize() turns the open utterance into a final ending at the last sample received."""
    t = transcriber()
    push(t, silence(10), speech(20))
    assert t.next_request() is None
    t.finalize()
    req = t.next_request()
    assert req is not None
    assert (req.kind, req.start, req.end) == ("final", 10 * W - PAD, 30 * W)


def test_finalize_without_open_utterance_does_nothing() -> None:
    """finalize() in silence asks for no decode."""
    t = transcriber()
    push(t, silence(10), speech(20), silence(20))
    finals_of(t)
    t.finalize()
    assert t.next_request() is None


def test_close_is_done_only_after_all_decodes_complete() -> None:
    """close() finalizes what is open; done turns true only after the last final completes."""
    t = transcriber()
    push(t, silence(10), speech(20), silence(20), speech(20))
    t.close()
    assert t.closing and not t.done
    first = t.next_request()
    assert first is not None
    t.complete(first, said("one"))
    assert not t.done
    second = t.next_request()
    assert second is not None and second.kind == "final"
    assert not t.done
    t.complete(second, said("two"))
    assert t.done
    assert t.next_request() is None


def test_close_with_nothing_pending_is_done_at_once() -> None:
    """A session that never heard speech is done as soon as it is closed."""
    t = transcriber()
    push(t, silence(20))
    t.close()
    assert t.done


def test_close_takes_a_last_tail_of_audio() -> None:
    """close(tail) pushes the tail before finalizing, so its speech is decoded."""
    t = transcriber()
    push(t, silence(10))
    t.close(speech(20))
    req = t.next_request()
    assert req is not None
    assert (req.start, req.end) == (10 * W - PAD, 30 * W)


def test_audio_after_close_is_refused() -> None:
    """push_audio after close() raises instead of silently extending a closed session."""
    t = transcriber()
    t.close()
    with pytest.raises(RuntimeError, match="after close"):
        t.push_audio(speech(1))


def test_not_done_before_close() -> None:
    """A transcriber with nothing to do is still not done until it is closed."""
    t = transcriber()
    push(t, silence(10))
    assert not t.done


# --- long utterances and blips ------------------------------------------------------------


def test_long_utterance_is_cut_into_several_contiguous_finals() -> None:
    """9.6 s of unbroken speech with max_utterance_s=3 becomes several finals that tile it."""
    opts = StreamOptions(early_final_s=0.0, interim_results=False, max_utterance_s=3.0)
    t = transcriber(opts)
    push(t, silence(10), speech(300), silence(20))
    reqs = finals_of(t)
    assert len(reqs) >= 4
    assert [r.result_id for r in reqs] == list(range(len(reqs)))
    assert reqs[0].start == 10 * W - PAD
    assert reqs[-1].end == 310 * W + PAD
    assert all(a.end == b.start for a, b in itertools.pairwise(reqs))
    limit = int(opts.max_utterance_s * SAMPLE_RATE) + 2 * PAD
    assert all(0 < r.end - r.start <= limit for r in reqs)


def test_long_utterance_with_short_max_is_not_lost() -> None:
    """With max_utterance_s=1 (a valid config) every second of long speech is still decoded."""
    t = transcriber(StreamOptions(early_final_s=0.0, interim_results=False, max_utterance_s=1.0))
    push(t, silence(10), speech(300))
    t.close()
    reqs = finals_of(t)
    assert reqs[0].start == 10 * W - PAD
    assert all(a.end == b.start for a, b in itertools.pairwise(reqs))


def test_blip_shorter_than_min_speech_is_never_decoded() -> None:
    """4 windows (0.128 s) of speech are a blip: no interim, no final, done on close."""
    t = transcriber(StreamOptions(early_final_s=0.0))
    push(t, silence(10), speech(4), silence(40))
    assert t.next_request() is None
    t.close()
    assert t.done


def test_blip_at_end_of_stream_is_never_decoded() -> None:
    """A blip cut short by close() is not decoded either."""
    t = transcriber()
    push(t, silence(10), speech(4))
    t.close()
    assert t.next_request() is None
    assert t.done


def test_speech_just_over_min_speech_is_decoded() -> None:
    """5 windows (0.16 s) of speech are long enough for a final."""
    t = transcriber()
    push(t, silence(10), speech(5), silence(40))
    req = t.next_request()
    assert req is not None and req.kind == "final"


# --- complete() and times -----------------------------------------------------------------


def test_complete_twice_raises() -> None:
    """complete() for a request already completed raises RuntimeError."""
    t = transcriber()
    push(t, silence(10), speech(20), silence(20))
    req = t.next_request()
    assert req is not None
    t.complete(req, said("x"))
    with pytest.raises(RuntimeError, match="not waiting"):
        t.complete(req, said("x"))


def test_complete_with_a_foreign_request_raises() -> None:
    """complete() for a request this transcriber did not hand out raises RuntimeError."""
    t = transcriber()
    push(t, silence(10), speech(20), silence(20))
    req = t.next_request()
    assert req is not None
    twin = DecodeRequest(req.kind, req.start, req.end, req.audio, req.result_id)
    with pytest.raises(RuntimeError):
        t.complete(twin, said("x"))
    assert t.complete(req, said("x"))  # the real one still works


def test_complete_with_nothing_outstanding_raises() -> None:
    """complete() when no decode was requested raises RuntimeError."""
    t = transcriber()
    fake = DecodeRequest("final", 0, W, silence(1), 0)
    with pytest.raises(RuntimeError):
        t.complete(fake, [])


def test_transcript_times_are_offset_by_the_request_start() -> None:
    """Segment and word times (relative to the decoded audio) become session times."""
    t = transcriber()
    push(t, silence(10), speech(50), silence(16))
    req = t.next_request()
    assert req is not None and req.start == 1920  # 0.12 s into the session
    segments = [
        Segment(0.2, 0.7, "hello", (Word("hello", 0.2, 0.7, 0.9),)),
        Segment(0.8, 1.5, "there", (Word("there", 0.8, 1.5, 0.8),)),
    ]
    (out,) = t.complete(req, segments)
    assert out == Final(
        Transcript(
            0,
            True,
            0.32,
            1.62,
            "hello there",
            (Word("hello", 0.32, 0.82, 0.9), Word("there", 0.92, 1.62, 0.8)),
        ),
        commit_sample=req.end,
    )


def test_transcript_times_are_clamped_to_the_request_end() -> None:
    """Times a decoder reports past the end of the decoded audio are clamped to its end."""
    t = transcriber()
    push(t, silence(10), speech(50), silence(16))
    req = t.next_request()
    assert req is not None
    end_s = req.end / SAMPLE_RATE  # 2.12
    (out,) = t.complete(req, [Segment(0.2, 9.0, "long", (Word("long", 0.2, 9.0, 0.5),))])
    assert isinstance(out, Final) and out.transcript is not None
    assert out.transcript.end == pytest.approx(end_s)
    assert out.transcript.words[0].end == pytest.approx(end_s)


def test_vad_only_sees_whole_windows() -> None:
    """Audio pushed in sizes that are not multiples of 512 reaches the VAD in whole windows."""
    sizes: list[int] = []

    def recording_vad(audio: Audio) -> np.ndarray:
        sizes.append(audio.size)
        return fake_vad(audio)

    t = SessionTranscriber(NO_INTERIMS, recording_vad)
    for _ in range(10):
        t.push_audio(np.full(300, 0.5, np.float32))
    assert all(s % W == 0 and s > 0 for s in sizes)
    assert sum(sizes) == 3000 // W * W
    assert t.total_samples == 3000


def test_finalize_early_in_a_word_keeps_its_start_for_the_rest() -> None:
    """A `finalize` 64 ms into a 192 ms word: ended there, both halves would be blips and
    the word lost (tests/unit/test_stream_property.py found it); the start stays open and
    the word is one final. At the end of the stream a blip is still dropped."""
    t = transcriber()
    push(t, speech(2))
    t.finalize()
    assert t.next_request() is None
    push(t, speech(4), silence(40))
    finals = finals_of(t)
    assert [(r.start, r.end) for r in finals] == [(0, 6 * W + PAD)]
    t2 = transcriber()
    push(t2, speech(2))
    t2.close()
    assert finals_of(t2) == [] and t2.done
