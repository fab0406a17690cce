"""`SessionTranscriber.has_work()`: the worker wakes a session's task after a feed only
when this says so, so it must never say False while `take_ready`, `next_request` or
`done` would give the task something to do (a session would stall), and it should not
say True when none would (every such wake-up is wasted CPU)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from shared.envelope import Word
from tests.vad_audio import fake_vad, silence, speech
from worker.engine import Segment
from worker.stream import DecodeRequest, SessionTranscriber, StreamOptions

OPTIONS = [
    StreamOptions(),  # interims and early finals, as the service runs
    StreamOptions(interim_results=False, early_final_s=0.0),
    StreamOptions(early_final_s=0.0, interim_pause_s=0.0),
    StreamOptions(max_utterance_s=3.0, interim_interval_s=0.5),
]


def said(req: DecodeRequest) -> list[Segment]:
    return [Segment(0.0, 0.4, "hello there", (Word("hello", 0.0, 0.2, 0.9),
                                               Word("there", 0.2, 0.4, 0.9)))]  # fmt: skip


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("options", OPTIONS, ids=["service", "finals", "no-pause", "short"])
def test_has_work_says_whether_the_task_would_find_anything(
    options: StreamOptions, seed: int
) -> None:
    rng = random.Random(seed)
    t = SessionTranscriber(options, fake_vad)
    outstanding: DecodeRequest | None = None
    aside: DecodeRequest | None = None  # an interim set aside, still decoding
    woken = idle = 0
    for step in range(400):
        # Feed: 1-4 windows of speech or silence, in runs, as a client would send them.
        if not t.closing:
            if step == 399 or rng.random() < 0.01:
                t.close(speech(rng.randint(0, 2)) if rng.random() < 0.5 else None)
            else:
                loud = (step // rng.randint(3, 40)) % 2 == 0
                n = rng.randint(1, 4)
                t.push_audio(speech(n) if loud else silence(n))
        predicted = t.has_work()
        # What the session task does when woken: publish ready finals, withdraw an
        # interim that holds up a final, start a decode.
        ready = t.take_ready()
        in_the_way = t.interim_in_the_way()
        if in_the_way:
            assert outstanding is not None and aside is None
            assert t.set_interim_aside() is outstanding and outstanding.kind == "interim"
            aside, outstanding = outstanding, None
            if rng.random() < 0.5:  # still queued: the scheduler answers it None
                t.abandon_request(aside)
                aside = None
        req = t.next_request() if outstanding is None else None
        found = bool(ready) or in_the_way or req is not None or t.done
        assert predicted == found, f"step {step}: has_work {predicted}, task found {found}"
        woken += found
        idle += not found
        if req is not None:
            outstanding = req
        # A decode finishes now or a few feeds later (the model is busy elsewhere).
        if outstanding is not None and rng.random() < 0.4:
            t.complete(outstanding, said(outstanding))
            outstanding = None
        if aside is not None and rng.random() < 0.4:
            t.complete(aside, said(aside))
            aside = None
        if t.done:
            break
    assert t.done or outstanding is not None or aside is not None or not t.closing
    assert woken and idle, "the random audio should give both outcomes"


def test_no_work_while_a_decode_is_outstanding() -> None:
    t = SessionTranscriber(StreamOptions(early_final_s=0.0), fake_vad)
    t.push_audio(np.concatenate([speech(40), silence(20)]))
    assert t.has_work()
    req = t.next_request()
    assert req is not None and req.kind == "final"
    t.push_audio(speech(40))  # an interim would be due, but one decode at a time
    assert not t.has_work()
    t.complete(req, said(req))
    assert t.has_work()


def test_an_interim_in_the_way_of_a_final_is_set_aside_and_the_final_asked_for() -> None:
    """Speech, an interim asked for and still out, then a pause: the early final is due
    behind it. The task is woken to set it aside; the final is asked for at once, and the
    interim's result, if it comes, is still sent while the utterance is open."""
    t = SessionTranscriber(StreamOptions(), fake_vad)
    t.push_audio(speech(40))  # 1.28 s: an interim is due
    interim = t.next_request()
    assert interim is not None and interim.kind == "interim"
    t.push_audio(speech(2))
    assert not t.interim_in_the_way() and not t.has_work()  # no final due yet
    t.push_audio(silence(8))  # 0.256 s of pause: the early final is due
    assert t.interim_in_the_way() and t.has_work()
    assert t.set_interim_aside() is interim
    assert not t.interim_in_the_way() and t.has_work()
    final = t.next_request()
    assert final is not None and final.kind == "final" and final.early
    assert not t.has_work()
    outs = t.complete(interim, said(interim))  # it was running: it comes back meanwhile
    assert [type(o).__name__ for o in outs] == ["Interim"]
    t.push_audio(silence(10))  # the utterance ends where the early decode did
    outs = [*t.complete(final, said(final)), *t.take_ready()]
    assert [type(o).__name__ for o in outs] == ["Final"]


def test_a_set_aside_interim_later_than_the_early_decode_is_not_sent() -> None:
    """The early decode came back first and was shown as an interim; the older interim
    set aside would put older text over it: dropped."""
    t = SessionTranscriber(StreamOptions(), fake_vad)
    t.push_audio(speech(40))
    interim = t.next_request()
    assert interim is not None
    t.push_audio(np.concatenate([speech(2), silence(8)]))
    t.set_interim_aside()
    early = t.next_request()
    assert early is not None and early.early
    t.push_audio(speech(2))  # speech resumes: the early decode comes back as an interim
    assert [type(o).__name__ for o in t.complete(early, said(early))] == ["Interim"]
    assert t.complete(interim, said(interim)) == []


def test_a_set_aside_interim_withdrawn_or_late_changes_nothing_and_holds_the_close() -> None:
    t = SessionTranscriber(StreamOptions(), fake_vad)
    t.push_audio(speech(40))
    interim = t.next_request()
    assert interim is not None
    t.push_audio(silence(20))  # the utterance ends: its final is due
    t.set_interim_aside()
    final = t.next_request()
    assert final is not None and final.kind == "final" and not final.early
    t.complete(final, said(final))
    t.close()
    assert not t.done  # the interim set aside is still out
    assert t.complete(interim, said(interim)) == []  # its utterance has its final: dropped
    assert t.done
    # Withdrawn before it ran: answered None, as a dropped interim is.
    t2 = SessionTranscriber(StreamOptions(), fake_vad)
    t2.push_audio(speech(40))
    interim2 = t2.next_request()
    assert interim2 is not None
    t2.push_audio(silence(20))
    t2.set_interim_aside()
    t2.abandon_request(interim2)
    final2 = t2.next_request()
    assert final2 is not None and final2.kind == "final"


def test_a_final_outstanding_is_never_in_the_way() -> None:
    """Only an interim is withdrawn: a final (or an early final) outstanding is never in
    the way, whatever is due after it."""
    t = SessionTranscriber(StreamOptions(), fake_vad)
    t.push_audio(np.concatenate([speech(40), silence(8)]))
    early = t.next_request()
    assert early is not None and early.kind == "final" and early.early
    t.push_audio(np.concatenate([speech(40), silence(20)]))  # another utterance ends
    assert not t.interim_in_the_way()
