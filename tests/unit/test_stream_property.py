"""`SessionTranscriber` (worker/stream.py) on any audio, pushed in any pieces, with
`finalize` at any moment and decodes answered whenever (hypothesis): no speech is lost,
none is transcribed twice, and finals come in order.

Audio is runs of speech and silence in whole VAD windows (tests/vad_audio.py), pushed in
pieces of any length (not window-aligned); between pieces the test answers any number of
the decodes the transcriber asks for, or calls `finalize`. At the end it closes the
stream and answers everything. Then:

- the finals' ranges are in order and never overlap: no audio is in two finals;
- every window of speech lies in some final's range, but for noise blips (less than
  `MIN_SPEECH_S` of speech, never decoded by design): none is lost;
- no final is longer than `max_utterance_s` plus the padding around it;
- finals are numbered 0, 1, 2, ... and the commit point only moves forward;
- the transcriber is done.

Early finals are off here (tests/unit/test_early_final.py has their rules).
"""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from shared.envelope import Word
from tests.vad_audio import fake_vad, silence, speech
from worker.engine import SAMPLE_RATE, VAD_WINDOW, Audio, Segment
from worker.stream import (
    MIN_SPEECH_S,
    DecodeRequest,
    Final,
    SessionTranscriber,
    StreamOptions,
)

W = VAD_WINDOW


def answer(req: DecodeRequest) -> list[Segment]:
    text = f"r{req.start}"
    return [Segment(0.0, 0.5, text, (Word(text, 0.0, 0.5, 0.9),))]


@st.composite
def streams(draw: st.DrawFn) -> tuple[StreamOptions, list[bool], list[tuple[int, int, bool]]]:
    """(options, speech per VAD window, steps: (samples to push, decodes to answer,
    finalize))."""
    options = StreamOptions(
        interim_results=draw(st.booleans()),
        early_final_s=0.0,
        max_utterance_s=draw(st.sampled_from([3.0, 5.0, 20.0])),
        min_silence_s=draw(st.sampled_from([0.2, 0.5, 1.0])),
        speech_pad_s=draw(st.sampled_from([0.0, 0.2])),
    )
    runs = draw(st.lists(st.tuples(st.booleans(), st.integers(1, 200)), max_size=12))
    windows = [loud for loud, n in runs for _ in range(n)]
    steps = draw(
        st.lists(
            st.tuples(st.integers(1, 20_000), st.integers(0, 3), st.booleans()),
            max_size=60,
        )
    )
    return options, windows, steps


@given(streams())
@example(  # found by this test: a finalize 64 ms into a 192 ms word lost the word
    (StreamOptions(interim_results=False, early_final_s=0.0), [True] * 6, [(1024, 0, True)])
)
def test_speech_is_in_exactly_one_final_and_finals_come_in_order(
    case: tuple[StreamOptions, list[bool], list[tuple[int, int, bool]]],
) -> None:
    options, windows, steps = case
    audio: Audio = (
        np.concatenate([speech(1) if loud else silence(1) for loud in windows])
        if windows
        else np.zeros(0, np.float32)
    )
    t = SessionTranscriber(options, fake_vad)
    finals: list[tuple[int, int]] = []
    ids: list[int] = []
    commits: list[int] = []

    def run(decodes: int | None) -> None:
        n = 0
        while (decodes is None or n < decodes) and (req := t.next_request()) is not None:
            n += 1
            for out in t.complete(req, answer(req)):
                if isinstance(out, Final):
                    commits.append(out.commit_sample)
                    if out.transcript is not None:
                        assert req.kind == "final"
                        finals.append((req.start, req.end))
                        ids.append(out.transcript.result_id)

    pos = 0
    for size, decodes, finalize in steps:
        if pos < audio.size:
            t.push_audio(audio[pos : pos + size])
            pos += size
        run(decodes)
        if finalize:
            t.finalize()
    if pos < audio.size:
        t.push_audio(audio[pos:])
    t.close()
    run(None)

    assert t.done
    assert ids == list(range(len(ids)))
    assert commits == sorted(commits)
    for (_, end), (start, _) in itertools.pairwise(finals):
        assert end <= start, f"two finals share audio: {finals}"
    longest = int((options.max_utterance_s + 2 * options.speech_pad_s) * SAMPLE_RATE) + 2 * W
    assert all(end - start <= longest for start, end in finals), (finals, longest)

    # Speech in no final: only noise blips may be (an utterance with less than
    # MIN_SPEECH_S of speech is never decoded: a cough, or the sliver a `finalize` or a
    # cut at max_utterance_s leaves).
    def covered(lo: int, hi: int) -> int:  # samples of [lo, hi) in some final
        return sum(max(0, min(hi, e) - max(lo, s)) for s, e in finals)

    lost = [i for i, loud in enumerate(windows) if loud and covered(i * W, (i + 1) * W) < W]
    gap = int(options.min_silence_s * SAMPLE_RATE) // W
    groups: list[list[int]] = []
    for i in lost:
        if groups and i - groups[-1][-1] <= gap:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        span = (group[-1] + 1 - group[0]) * W
        assert span <= MIN_SPEECH_S * SAMPLE_RATE + W, f"speech at {group[0] * W} lost: {finals}"
