"""File jobs on the worker (worker/filejobs.py) against a real Valkey: jobs made through
`JobStore` (upload, submit) are transcribed by in-process workers running the null engine
and the energy VAD, window by window, into segments in file time; across several runs
when a run's slice ends or its worker stops; fenced by the run's epoch; failed with the
reason after `job_max_tries` failed tries; and never by a worker with file jobs off.

Audio is a tone for speech and zeros for silence (the energy VAD tells them apart); the
null engine answers one segment per window, spanning it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import numpy as np
import pytest
import redis.asyncio as aioredis
from arq.constants import retry_key_prefix

from shared import keys
from shared.jobs import JobInfo, JobParams, JobSegment, JobStore, arq_job_id, new_job_id
from shared.keys import JobId
from tests.conftest import make_config
from tests.integration.test_takeover import until
from worker.engine import SAMPLE_RATE, Audio, Engine, NullEngine, Segment
from worker.service import Worker
from worker.stream import DecodeRequest

StartWorker = Callable[..., Awaitable[Worker]]


@pytest.fixture
async def workers(redis_url: str, redis: aioredis.Redis) -> AsyncIterator[StartWorker]:
    """Start in-process workers (null engine unless given, energy VAD, no maintenance:
    its pass over the jobs could queue runs of its own); all are shut down at the end."""
    started: list[Worker] = []

    async def start(worker_id: str, engine: Engine | None = None, **overrides: Any) -> Worker:
        overrides.setdefault("vad", "energy")
        overrides.setdefault("maintenance", "off")
        config = make_config(redis_url, worker_id=worker_id, **overrides)
        worker = Worker(config, engine=engine or NullEngine())
        await worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        with contextlib.suppress(Exception):
            await worker.shutdown()


def tone(seconds: float) -> Audio:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def quiet(seconds: float) -> Audio:
    return np.zeros(int(seconds * SAMPLE_RATE), np.float32)


def speech_file(*spans: tuple[float, float], end_s: float) -> Audio:
    """A tone over each (start, end) span, silence elsewhere, `end_s` long."""
    audio = quiet(end_s)
    for start, end in spans:
        a, b = int(start * SAMPLE_RATE), int(end * SAMPLE_RATE)
        audio[a:b] = tone((b - a) / SAMPLE_RATE)
    return audio


def pcm16(audio: Audio, rate: int = SAMPLE_RATE, channels: int = 1) -> bytes:
    """`audio` (16 kHz) as the client would send it at `rate`, in `channels` (equal)."""
    if rate != SAMPLE_RATE:
        at = np.arange(int(audio.size * rate / SAMPLE_RATE)) * SAMPLE_RATE / rate
        audio = np.interp(at, np.arange(audio.size), audio).astype(np.float32)
    ints = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    return np.repeat(ints, channels).tobytes()


async def submit(redis: aioredis.Redis, data: bytes, params: JobParams | None = None) -> JobId:
    """Upload and submit a job as the gateway does."""
    store = JobStore(redis)
    jid = new_job_id()
    await store.begin_upload(jid, params or JobParams(), key_id="", ttl_s=600)
    for at in range(0, len(data), 64000):
        assert await store.append(jid, data[at : at + 64000], max_bytes=10**9, ttl_s=600) > 0
    await store.submit(jid, max_queued=100)
    return jid


async def finished(redis: aioredis.Redis, jid: JobId) -> JobInfo:
    async def check() -> JobInfo | None:
        info = await JobStore(redis).load(jid)
        return info if info is not None and info.finished else None

    return cast(JobInfo, await until(check, f"job {jid} to finish"))


def assert_in_order(segments: list[JobSegment]) -> None:
    assert all(s.start < s.end for s in segments)
    assert all(a.end <= b.start for a, b in itertools.pairwise(segments))


SPANS = ((1.0, 3.0), (6.0, 10.0), (13.0, 14.0))
FILE_S = 15.0


def assert_covers(segments: list[JobSegment], spans: tuple[tuple[float, float], ...]) -> None:
    """One segment per span of speech, each around it (its padding aside), file time."""
    assert len(segments) == len(spans)
    for seg, (start, end) in zip(segments, spans, strict=True):
        assert seg.start <= start < end <= seg.end
        assert seg.start >= start - 0.5 and seg.end <= end + 0.5  # speech_pad_s 0.4
        assert seg.words and seg.words[0].start == seg.start and seg.words[-1].end == seg.end


async def test_a_job_is_transcribed_into_segments_in_file_time(
    workers: StartWorker, redis: aioredis.Redis
) -> None:
    """Three utterances in 15 s: done in one run, one segment per utterance in order, in
    file time; the audio is gone, the rest expires; the worker counts three file
    decodes (and no live ones)."""
    worker = await workers("w-files")
    jid = await submit(redis, pcm16(speech_file(*SPANS, end_s=FILE_S)))
    info = await finished(redis, jid)
    assert info.state == "done" and info.error == ""
    assert info.done_bytes == info.audio_bytes and info.runs == 1
    assert info.worker == "w-files"
    segments = await JobStore(redis).segments(jid)
    assert_in_order(segments)
    assert_covers(segments, SPANS)
    assert not await redis.exists(keys.job_audio(jid))
    assert 0 < await redis.ttl(keys.job(jid)) <= worker.config.job_ttl_s
    assert await redis.zcard(keys.JOBS) == 0
    stats = worker.stats()
    assert (stats["decodes_file"], stats["decodes_final"], stats["decodes_interim"]) == (3, 0, 0)
    assert worker.histograms()['engine_call_seconds{kind="file"}'].count == 3


async def test_resampled_stereo_audio_is_mapped_back_to_whole_frames(
    workers: StartWorker, redis: aioredis.Redis
) -> None:
    """8 kHz stereo: the same segments, and progress in whole 4-byte frames up to the
    last byte."""
    await workers("w-8k")
    params = JobParams(sample_rate=8000, channels=2)
    jid = await submit(redis, pcm16(speech_file(*SPANS, end_s=FILE_S), 8000, 2), params)
    info = await finished(redis, jid)
    assert info.state == "done" and info.done_bytes == info.audio_bytes
    assert info.audio_bytes % params.bytes_per_frame == 0
    segments = await JobStore(redis).segments(jid)
    assert_in_order(segments)
    assert_covers(segments, SPANS)


async def test_a_file_longer_than_a_read_is_cut_at_pauses_never_mid_word(
    workers: StartWorker, redis: aioredis.Redis
) -> None:
    """100 s, read 30 s at a time: speech across a read's end (28-33 s, 88-93 s) is in
    one window; 35 s of speech without a pause is cut into windows of at most 28 s that
    meet end to end; every stretch of speech is covered, nothing twice."""
    await workers("w-long")
    spans = ((2.0, 5.0), (28.0, 33.0), (36.0, 71.0), (88.0, 93.0), (98.0, 99.0))
    jid = await submit(redis, pcm16(speech_file(*spans, end_s=100.0)))
    info = await finished(redis, jid)
    assert info.state == "done" and info.runs == 1 and info.done_bytes == info.audio_bytes
    segments = await JobStore(redis).segments(jid)
    assert_in_order(segments)
    assert all(s.end - s.start <= 28.0 for s in segments)
    for start, end in spans:
        inside = [s for s in segments if s.end > start and s.start < end]
        assert inside and inside[0].start <= start and inside[-1].end >= end
        assert all(a.end == b.start for a, b in itertools.pairwise(inside)), "a gap in speech"
    [across] = [s for s in segments if s.end > 28.0 and s.start < 33.0]
    assert across.start <= 28.0 and across.end >= 33.0
    assert len([s for s in segments if s.end > 36.0 and s.start < 71.0]) == 2


class SlowEngine(NullEngine):
    """The null engine, each window taking `seconds` (as a real model would)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def transcribe(self, audio: Audio, **kwargs: Any) -> list[Segment]:
        time.sleep(self.seconds)  # in the engine thread: the decode's own duration
        return super().transcribe(audio, **kwargs)


async def test_a_job_longer_than_a_slice_takes_several_runs_with_no_segment_twice(
    workers: StartWorker, redis: aioredis.Redis
) -> None:
    """Each window's decode outlasts the slice: every run decodes one window and queues
    the next run from its progress; the segments still come once each, in order."""
    await workers("w-slices", engine=SlowEngine(0.1), job_slice_s=0.05)
    jid = await submit(redis, pcm16(speech_file(*SPANS, end_s=FILE_S)))
    info = await finished(redis, jid)
    assert info.state == "done" and info.done_bytes == info.audio_bytes
    assert info.runs == len(SPANS)
    segments = await JobStore(redis).segments(jid)
    assert_in_order(segments)
    assert_covers(segments, SPANS)
    assert await redis.zcard(keys.JOBS_ARQ_QUEUE) == 0


class GateEngine(NullEngine):
    """The null engine, holding each decode until the test releases it (no sleeps)."""

    def __init__(self) -> None:
        self.calls: queue.Queue[int] = queue.Queue()
        self.release = threading.Semaphore(0)

    def transcribe(self, audio: Audio, **kwargs: Any) -> list[Segment]:
        self.calls.put(audio.size)
        if not self.release.acquire(timeout=20):
            raise TimeoutError("the test never released the decode")
        return super().transcribe(audio, **kwargs)

    async def next_call(self) -> int:
        return await asyncio.to_thread(self.calls.get, True, 20)


async def test_a_run_whose_epoch_is_stale_records_nothing(
    workers: StartWorker, redis: aioredis.Redis
) -> None:
    """While the worker's run decodes its first window, another run takes the job (a new
    epoch): the first run's progress is refused and it stops without a word, leaving
    the job to the newer run; a stale epoch cannot finish the job either."""
    engine = GateEngine()
    await workers("w-fenced", engine=engine)
    jid = await submit(redis, pcm16(speech_file(*SPANS, end_s=FILE_S)))
    await engine.next_call()
    store = JobStore(redis)
    taken = await store.start_run(jid, "intruder")
    assert taken is not None and taken.epoch == 2
    engine.release.release()
    await until(lambda: _no_arq_job(redis), "the worker's run to end")
    info = await store.load(jid)
    assert info is not None and info.state == "running" and info.worker == "intruder"
    assert info.done_bytes == 0 and await store.segments(jid) == []
    assert not await store.progress(jid, 1, from_bytes=0, to_bytes=3200, segments=())
    assert not await store.finish(jid, 1, ttl_s=60)
    assert await store.progress(jid, 2, from_bytes=0, to_bytes=3200, segments=())
    assert await store.finish(jid, 2, ttl_s=60)


async def _no_arq_job(redis: aioredis.Redis) -> bool:
    """No file job run queued or running."""
    running = await redis.keys("arq:in-progress:file:*")
    return not running and await redis.zcard(keys.JOBS_ARQ_QUEUE) == 0


class FailingEngine(NullEngine):
    def transcribe(self, audio: Audio, **kwargs: Any) -> list[Segment]:
        raise RuntimeError("the model fell over")


async def test_a_job_whose_engine_fails_every_try_ends_failed_with_the_reason(
    workers: StartWorker, redis: aioredis.Redis
) -> None:
    """Each try's decode raises: arq tries again, and the last try fails the job, saying
    how many tries there were and why the last one failed."""
    await workers("w-failing", engine=FailingEngine(), job_max_tries=2)
    jid = await submit(redis, pcm16(speech_file(*SPANS, end_s=FILE_S)))
    info = await finished(redis, jid)
    assert info.state == "failed" and info.runs == 2
    assert "failed 2 times" in info.error and "RuntimeError: the model fell over" in info.error
    assert not await redis.exists(keys.job_audio(jid))
    assert await redis.zcard(keys.JOBS) == 0
    assert info.to_json()["error"] == info.error


async def test_a_job_whose_audio_is_gone_ends_failed(
    workers: StartWorker, redis: aioredis.Redis
) -> None:
    """The audio key was deleted under a queued job: every try fails, then the job."""
    jid = await submit(redis, pcm16(speech_file(*SPANS, end_s=FILE_S)))
    await redis.delete(keys.job_audio(jid))
    await workers("w-no-audio", job_max_tries=2)
    info = await finished(redis, jid)
    assert info.state == "failed" and "audio is gone" in info.error
    assert await JobStore(redis).segments(jid) == []


async def test_a_try_after_the_last_fails_the_job_without_running_it(
    workers: StartWorker, redis: aioredis.Redis
) -> None:
    """arq's count of tries already at job_max_tries (the workers that ran them
    crashed): the next try marks the job failed, naming the count, and decodes
    nothing."""
    jid = await submit(redis, pcm16(speech_file(*SPANS, end_s=FILE_S)))
    await redis.set(retry_key_prefix + arq_job_id(jid, 0, 0), 2)
    worker = await workers("w-last", job_max_tries=2)
    info = await finished(redis, jid)
    assert info.state == "failed" and "failed 2 times" in info.error and info.runs == 0
    assert worker.stats()["decodes_file"] == 0


async def test_a_worker_with_file_jobs_off_never_takes_one(
    workers: StartWorker, redis: aioredis.Redis
) -> None:
    """With file_jobs off a worker runs no arq worker for them (no pool, no run); the
    job waits for a worker with them on, which does it in one run."""
    off = await workers("w-off", file_jobs="off")
    assert off.filejobs is None
    jid = await submit(redis, pcm16(speech_file(*SPANS, end_s=FILE_S)))
    names = {c["name"] for c in await redis.client_list()}
    assert keys.client_name("filejobs", "w-off") not in names
    await workers("w-on")
    info = await finished(redis, jid)
    assert info.state == "done" and info.worker == "w-on" and info.runs == 1
    assert off.stats()["decodes_file"] == 0


async def test_a_stopping_worker_ends_its_run_at_a_window_and_queues_the_rest(
    workers: StartWorker, redis: aioredis.Redis
) -> None:
    """The worker stops while its run decodes the first window: that window is recorded,
    the run from there is queued (a new arq job: no try counted) and another worker
    does the rest, each segment once."""
    engine = GateEngine()
    first = await workers("w-stops", engine=engine)
    jid = await submit(redis, pcm16(speech_file(*SPANS, end_s=FILE_S)))
    await engine.next_call()
    stopping = asyncio.create_task(first.shutdown())
    await until(lambda: _stop_seen(first), "the stop to reach the file jobs")
    engine.release.release()
    await asyncio.wait_for(stopping, 30)
    info = await JobStore(redis).load(jid)
    assert info is not None and info.state == "running" and info.runs == 1
    assert 0 < info.done_bytes < info.audio_bytes
    queued = await redis.zrange(keys.JOBS_ARQ_QUEUE, 0, -1)
    assert queued == [arq_job_id(jid, info.done_bytes, epoch=1).encode()]
    await workers("w-rest")
    done = await finished(redis, jid)
    assert done.state == "done" and done.runs == 2 and done.worker == "w-rest"
    segments = await JobStore(redis).segments(jid)
    assert_in_order(segments)
    assert_covers(segments, SPANS)


async def _stop_seen(worker: Worker) -> bool:
    return worker.filejobs is not None and worker.filejobs._stopping.is_set()


async def test_a_run_stopped_before_its_first_window_is_queued_again_untried(
    workers: StartWorker, redis: aioredis.Redis
) -> None:
    """The engine's one thread is busy with a live final, so the run's first window
    waits in the queue; the worker stops: the window is withdrawn and the run from the
    same place is queued under an arq job ID of its own (no try counted); another
    worker then does the whole job in its run."""
    engine = GateEngine()
    first = await workers("w-busy", engine=engine, decode_threads=1)
    assert first.scheduler is not None
    final = DecodeRequest("final", 0, 16000, tone(1.0), 0)
    live = asyncio.create_task(first.scheduler.decode(final, "en", session="live"))
    await engine.next_call()
    jid = await submit(redis, pcm16(speech_file(*SPANS, end_s=FILE_S)))
    scheduler = first.scheduler
    await until(lambda: _true(scheduler.queue.files_waiting == 1), "the window to wait")
    stopping = asyncio.create_task(first.shutdown())
    again = arq_job_id(jid, 0, epoch=1)
    await until(lambda: _queued(redis, again), "the run to be queued again")
    engine.release.release()
    await asyncio.wait_for(stopping, 30)
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await live
    info = await JobStore(redis).load(jid)
    assert info is not None and info.done_bytes == 0 and info.runs == 1
    await workers("w-then")
    done = await finished(redis, jid)
    assert done.state == "done" and done.runs == 2 and done.worker == "w-then"
    assert len(await JobStore(redis).segments(jid)) == len(SPANS)


async def _true(value: bool) -> bool:
    return value


async def _queued(redis: aioredis.Redis, arq_id: str) -> bool:
    return await redis.zscore(keys.JOBS_ARQ_QUEUE, arq_id) is not None


async def _equals(value: Awaitable[Any], expected: Any) -> bool:
    return bool(await value == expected)
