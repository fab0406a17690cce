"""`Worker._feed` converts and pushes a read's consecutive audio frames together
(`AudioConverter.samples_in`). That must leave a session exactly as feeding the frames
one at a time does: the same samples, VAD decisions, utterances and decode requests, and
each entry recorded at the sample where its audio starts (the checkpoints depend on it)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from shared.envelope import AudioChunk, Control, Envelope
from shared.protocol import SessionParams
from worker.audio import AudioConverter
from worker.engine import EnergyVad
from worker.service import Worker
from worker.stream import SessionTranscriber, StreamOptions


def _pcm(params: SessionParams, seconds: float, level: float) -> bytes:
    """`seconds` of a 440 Hz tone at `level` (0: silence) in the session's format."""
    n = int(seconds * params.sample_rate)
    tone = level * np.sin(2 * np.pi * 440 * np.arange(n) / params.sample_rate)
    if params.channels == 2:
        tone = np.repeat(tone, 2)
    if params.encoding == "pcm_s16le":
        return (tone * 32767).astype("<i2").tobytes()
    return tone.astype("<f4").tobytes()


def _entries(params: SessionParams) -> list[tuple[bytes, Envelope]]:
    """Speech and pauses in 100 ms frames, a repeated frame, a finalize, then a close."""
    levels = [0.5] * 12 + [0.0] * 8 + [0.5] * 15 + [0.0] * 3 + [0.4] * 6 + [0.0] * 9
    out: list[tuple[bytes, Envelope]] = []
    seq = 0
    for i, level in enumerate(levels):
        out.append((b"%d-0" % len(out), AudioChunk(seq, _pcm(params, 0.1, level))))
        seq += 1
        if i == 5:  # re-sent after a Redis restart: must be skipped, not fed twice
            out.append((b"%d-0" % len(out), AudioChunk(seq - 1, _pcm(params, 0.1, 0.9))))
        if i == 40:
            out.append((b"%d-0" % len(out), Control(kind="finalize")))
    out.append((b"%d-0" % len(out), Control(kind="close", reason=None)))
    return out


def _owned(params: SessionParams) -> Any:
    options = StreamOptions(interim_interval_s=0.5, early_final_s=0.2)
    return SimpleNamespace(
        sid="s",
        transcriber=SessionTranscriber(options, EnergyVad()),
        converter=AudioConverter(params),
        entries=[],
        next_seq=None,
        close_reason=None,
    )


def _state(s: Any) -> tuple[Any, ...]:
    tr = s.transcriber
    return (
        tr.total_samples,
        tr.closing,
        list(s.entries),
        s.next_seq,
        s.close_reason,
        tr._vad_pos,
        tr._utt_start,
        tr._last_speech_end,
        list(tr._pending),
        tr.has_work(),
        [(type(o).__name__, o.commit_sample) for o in tr.take_ready()],
    )


@pytest.mark.parametrize(
    "params",
    [
        SessionParams(),
        SessionParams(encoding="pcm_f32le", channels=2),
        SessionParams(sample_rate=48000),  # resampled: no batching, one frame at a time
    ],
    ids=["s16-mono-16k", "f32-stereo-16k", "s16-mono-48k"],
)
@pytest.mark.parametrize("per_read", [2, 3, 7, 100])
def test_frames_fed_together_leave_the_session_as_one_at_a_time(
    params: SessionParams, per_read: int
) -> None:
    entries = _entries(params)
    alone, together = _owned(params), _owned(params)
    for start in range(0, len(entries), per_read):
        read = entries[start : start + per_read]
        for entry in read:
            Worker._feed(None, alone, [entry])  # type: ignore[arg-type]
        Worker._feed(None, together, read)  # type: ignore[arg-type]
        assert _state(together) == _state(alone), f"after the read at entry {start}"
    assert alone.transcriber.closing and alone.close_reason == "client_closed"
    assert len(alone.entries) == len(entries) - 1  # all but the repeated frame
    # Three utterances (the last ended by the finalize), waiting for their decodes.
    assert len(alone.transcriber._pending) == 3


def test_samples_in_is_known_only_without_a_resampler_and_for_whole_instants() -> None:
    assert AudioConverter(SessionParams()).samples_in(3200) == 1600
    assert AudioConverter(SessionParams()).samples_in(3201) is None
    stereo = AudioConverter(SessionParams(encoding="pcm_f32le", channels=2))
    assert stereo.samples_in(8 * 100) == 100
    assert stereo.samples_in(8 * 100 + 4) is None
    assert AudioConverter(SessionParams(sample_rate=48000)).samples_in(9600) is None
    for params in (SessionParams(), SessionParams(encoding="pcm_f32le", channels=2)):
        pcm = _pcm(params, 0.1, 0.5)
        assert AudioConverter(params).convert(pcm).size == AudioConverter(params).samples_in(
            len(pcm)
        )
