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
        # What the session task does when woken: publish ready finals, start a decode.
        ready = t.take_ready()
        req = t.next_request() if outstanding is None else None
        found = bool(ready) or req is not None or t.done
        assert predicted == found, f"step {step}: has_work {predicted}, task found {found}"
        woken += found
        idle += not found
        if req is not None:
            outstanding = req
        # A decode finishes now or a few feeds later (the model is busy elsewhere).
        if outstanding is not None and rng.random() < 0.4:
            t.complete(outstanding, said(outstanding))
            outstanding = None
        if t.done:
            break
    assert t.done or outstanding is not None or not t.closing
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
