"""File jobs end to end with the real model (tiny.en): upload over a real WebSocket,
transcription on arq in the worker, the result over HTTP, beside live sessions."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest

from shared.jobs_client import get_job, submit_job
from shared.scoring import wer
from shared.wavfile import read_wav
from tests.conftest import FIXTURES, ServiceFactory
from tests.e2e.test_model_pipeline import _words, offline_text, stream
from tests.helpers import reference
from worker.engine import WhisperEngine

pytestmark = pytest.mark.model
CLIPS = ["s1", "s2", "s3", "s4", "s5", "s6"]
GAP_S = 1.0  # silence between the clips of a joined file


def joined(names: list[str]) -> tuple[bytes, list[float]]:
    """The 16 kHz mono clips one after another with GAP_S of silence between them, and
    where each clip starts in the file (seconds)."""
    parts: list[bytes] = []
    starts: list[float] = []
    at = 0.0
    gap = np.zeros(int(16000 * GAP_S), dtype="<i2").tobytes()
    for name in names:
        audio = read_wav(FIXTURES / f"{name}.wav")
        assert (audio.sample_rate, audio.channels, audio.encoding) == (16000, 1, "pcm_s16le")
        starts.append(at)
        parts += [audio.data, gap]
        at += audio.duration_s + GAP_S
    return b"".join(parts), starts


async def test_a_long_file_job_is_as_accurate_as_the_offline_model(
    service_factory: ServiceFactory, whisper: WhisperEngine
) -> None:
    """Six clips joined into one 46 s file, more than one Whisper window: the job's
    transcript is within 0.05 (absolute) of the model's own WER on the clips, its
    segments are in order, inside the file and each near its clip, and the result read
    over HTTP is the one `job.done` carried."""
    svc = await service_factory(engine=whisper)
    pcm, starts = joined(CLIPS)
    receipt, done = await submit_job(svc.url, pcm, name="six clips", wait=True)
    assert done is not None and done["state"] == "done" and done["name"] == "six clips"
    audio_s = len(pcm) / 32000
    assert done["audio_seconds"] == done["done_seconds"] == pytest.approx(audio_s, abs=0.001)
    refs = [reference(n) for n in CLIPS]
    offline_wer = wer(
        [" ".join(refs)], [" ".join(offline_text(whisper, f"{n}.wav") for n in CLIPS)]
    )
    job_wer = wer([" ".join(refs)], [done["text"]])
    print(f"\nWER offline {offline_wer:.3f} file job {job_wer:.3f}")
    assert job_wer <= offline_wer + 0.05, done["text"]
    segments = done["segments"]
    assert all(a["start"] <= b["start"] for a, b in itertools.pairwise(segments))
    assert 0 <= segments[0]["start"] and segments[-1]["end"] <= audio_s + 0.05
    # File times: most of each clip's words are timed within its own stretch of the file.
    words = [w for s in segments for w in s["words"]]
    for name, start in zip(CLIPS, starts, strict=True):
        end = start + read_wav(FIXTURES / f"{name}.wav").duration_s
        timed = " ".join(w["word"] for w in words if start - 0.5 <= w["start"] <= end + 0.5)
        assert len(_words(reference(name)) & _words(timed)) >= 5, (name, timed)
    assert svc.worker is not None and svc.worker.stats()["decodes_file"] >= 2  # windows
    view = await get_job(receipt.url, receipt.job_id)
    assert view["text"] == done["text"] and view["segments"] == segments


async def test_live_sessions_and_a_file_job_each_get_only_their_own_words(
    service_factory: ServiceFactory, whisper: WhisperEngine
) -> None:
    """A file job of s5 and s6 runs while two live sessions stream s1 and s2 at real-time
    pace: every transcript matches its own audio and holds no word only another has."""
    svc = await service_factory(engine=whisper, slots=8)
    pcm, _ = joined(["s5", "s6"])
    job = asyncio.create_task(submit_job(svc.url, pcm, wait=True))
    live = await asyncio.gather(*(stream(svc.url, f"{n}.wav", realtime=True) for n in ("s1", "s2")))
    _, done = await job
    assert done is not None
    texts = {
        "s1": " ".join(f.text for f in live[0][0]),
        "s2": " ".join(f.text for f in live[1][0]),
        "file": done["text"],
    }
    refs = {"s1": reference("s1"), "s2": reference("s2")}
    refs["file"] = reference("s5") + " " + reference("s6")
    for name, text in texts.items():
        assert wer([refs[name]], [text]) <= 0.3, (name, text)
        own = _words(refs[name])
        foreign = set().union(*(_words(refs[o]) for o in refs if o != name)) - own
        leaked = {w for w in _words(text) & foreign if len(w) >= 5}
        assert not leaked, f"{name} got words of others: {leaked}"


async def test_a_44k_stereo_file_job_is_resampled_like_a_session(
    service_factory: ServiceFactory, whisper: WhisperEngine
) -> None:
    svc = await service_factory(engine=whisper)
    audio = read_wav(FIXTURES / "s1_44k_stereo.wav")
    _, done = await submit_job(
        svc.url, audio.data, sample_rate=audio.sample_rate, channels=audio.channels, wait=True
    )
    assert done is not None
    assert done["audio_seconds"] == pytest.approx(audio.duration_s, abs=0.001)
    base = wer([reference("s1")], [offline_text(whisper, "s1.wav")])
    assert wer([reference("s1")], [done["text"]]) <= base + 0.1, done["text"]
