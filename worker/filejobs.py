"""File jobs on arq: whole files transcribed behind every live session.

A worker with `--file-jobs on` runs a second arq worker beside its streaming loops, on
`keys.JOBS_ARQ_QUEUE`, one job at a time (shared/jobs.py has the job's record and its
Redis operations). One arq job is one *run* of a file job:

1. `JobStore.start_run` takes the job with a new epoch (fencing token);
2. its audio is read from the job's progress (`done_bytes`) on, block by block, converted
   to 16 kHz mono (`AudioConverter`), judged by the VAD (`make_vad(config.vad)`) and cut
   into windows of at most 28 s at pauses (worker/filechunks.py);
3. each window is decoded through the worker's `Scheduler` as a `file` decode: after
   every final and interim, one at a time, and only while live sessions keep the engine
   under `job_max_busy`; with the text of the windows before it as Whisper's prompt;
4. its segments, in file time, are recorded with the byte offset they cover
   (`JobStore.progress`); False there means that another run holds the job: this one
   stops without a word;
5. after `job_slice_s`, or when the worker stops, the run queues its continuation from
   its progress (`enqueue_run`) and returns, so long files take turns and a worker that
   dies costs at most one slice; at the end of the audio, `JobStore.finish`.

Failures. arq runs a job again after an exception (`Retry`, with a growing delay) and
after a crash (its in-progress mark expires: about `job_slice_s` + 30 s); arq's
`job_try` counts the tries of one run (one arq job ID:
`file:<job_id>:<done_bytes>:<epoch>`). The try after the `job_max_tries`-th marks the job
failed without running it, so a job whose last try crashed the worker is failed too; the
last try's own exception fails it with its reason at once. A run that could make no
progress at all (the live load never let a window start within the slice, or the worker
stopped first) queues its continuation from the same place, under an arq job ID of its
own (its epoch), a moment later: it did not fail, so no try is counted.

Byte offsets. Progress is recorded in bytes of the client's audio, whole sample frames.
Without resampling a sample is a frame. With it (audio not at 16 kHz), a 16 kHz sample
index `s` counted from the run's first byte maps to frame `round(s * rate / 16000)` after
it: libswresample's filter delay (a few output samples) makes that up to a few
milliseconds early or late. Windows end in silence or at their least speech-like VAD
window, and the next run's first window starts at the next speech less `speech_pad_s`,
so a few milliseconds read twice or skipped there lose no word; segment times carry the
same small error.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
from arq.connections import ArqRedis
from arq.worker import Retry, func
from arq.worker import Worker as ArqWorker
from redis.exceptions import RedisError

from shared import keys
from shared.config import Config
from shared.envelope import Word
from shared.jobs import (
    ARQ_FUNCTION,
    JobParams,
    JobSegment,
    JobStore,
    Run,
    arq_deserialize,
    arq_serialize,
    decode_segment,
    enqueue_run,
)
from shared.keys import JobId
from worker.arqservice import ArqService
from worker.audio import AudioConverter
from worker.engine import SAMPLE_RATE, VAD_WINDOW, Audio, Segment, make_vad
from worker.filechunks import ChunkPolicy, plan
from worker.scheduler import Scheduler
from worker.stream import VadFn, prompt_of

log = logging.getLogger(__name__)

#: Connections the file jobs' pool opens at most when `redis_max_connections` is set:
#: arq's polling and the run's commands, one at a time each; a command beyond them waits.
FILE_JOBS_CONNECTIONS = 2
#: arq's limit on one run is `job_slice_s` plus this: no window starts after the slice,
#: and the one that started just before it must end in this margin.
WINDOW_MARGIN_S = 20.0
#: The run gives up this long before arq's limit, so that it ends as a failed try that
#: arq runs again rather than a timeout that arq drops.
GIVE_UP_BEFORE_S = 2.0
#: A run that has made no progress yet may wait this long for a window to start even
#: after its slice ended (reading up to it took it), so that a run always gets a window
#: done on a worker with room for one.
FIRST_WINDOW_WAIT_S = 1.0
#: Audio read from Redis at once, seconds.
READ_S = 30.0
#: Characters of the text before a window given to its decode as Whisper's prompt. A
#: session's decodes go without one by default (`prompt_chars` 0: it lengthens each
#: decode, and a session's lag counts); a file's decode does not race the clock, and
#: Whisper transcribes a whole file that way itself (conditioned on the text before).
FILE_PROMPT_CHARS = 200
#: Segments read back from a job's result to prompt a run's first window.
PROMPT_SEGMENTS = 8
#: A failed run is tried again after RETRY_BASE_S, then twice that, ... at most RETRY_MAX_S.
RETRY_BASE_S = 0.5
RETRY_MAX_S = 30.0
#: A run that made no progress waits this long before it is taken again (by any worker).
YIELD_DEFER_S = 0.1
#: How long the worker's stop waits for a running run to reach a window's end.
STOP_WAIT_S = 10.0
#: How long it then waits for arq to finish with a run it had to cancel.
CANCEL_WAIT_S = 5.0


class Outcome(enum.Enum):
    DONE = "done"  # the job is finished
    CONTINUED = "continued"  # progress made; its continuation is queued
    NO_PROGRESS = "no progress"  # the slice ended (or the worker stopped) before a window
    LOST = "lost"  # another run holds the job


@dataclass
class _Buffer:
    """A run's audio so far: samples (16 kHz) from `start` (counted from the run's first
    byte) on, and the VAD's speech probability of each whole window of them."""

    samples: Audio
    probs: Audio
    start: int = 0
    eof: bool = False

    @property
    def windows(self) -> int:
        return self.probs.size

    @property
    def planned(self) -> int:
        """The samples to plan: those the VAD judged (at the file's end, all of them)."""
        return self.samples.size if self.eof else self.windows * VAD_WINDOW

    def drop_before(self, sample: int) -> None:
        """Forget the samples before `sample` (a whole number of VAD windows in)."""
        assert sample % VAD_WINDOW == 0
        self.samples = self.samples[sample:]
        self.probs = self.probs[sample // VAD_WINDOW :]
        self.start += sample


@dataclass
class _Progress:
    """What a run has recorded of its job: audio up to `done` bytes; `prompt` is the end
    of the text so far, for the next window."""

    store: JobStore
    jid: JobId
    epoch: int
    done: int
    prompt: str

    async def record(self, to_bytes: int, segments: list[JobSegment]) -> bool:
        """Record audio up to `to_bytes` with its segments; False: the run lost the job."""
        if not await self.store.progress(
            self.jid, self.epoch, from_bytes=self.done, to_bytes=to_bytes, segments=segments
        ):
            return False
        self.done = to_bytes
        text = " ".join(s.text for s in segments)
        if text:
            self.prompt = prompt_of(f"{self.prompt} {text}".strip(), FILE_PROMPT_CHARS)
        return True


class FileJobs(ArqService):
    """The file jobs' arq worker (worker/arqservice.py: its pool, restarts and stop),
    connections named `ss-filejobs:<worker_id>`, one run at a time. On `stop` a running
    run ends at its next window's end (waited for at most STOP_WAIT_S: `end_runs`) and
    queues its continuation."""

    label = "file jobs"

    def __init__(
        self,
        config: Config,
        redis_url: str,
        scheduler: Scheduler,
        worker_id: str,
        name: str | None = None,
        max_connections: int = 0,
    ) -> None:
        super().__init__(config, redis_url, keys.JOBS_ARQ_QUEUE, name, max_connections)
        self.scheduler = scheduler
        self.worker_id = worker_id
        self.policy = ChunkPolicy.from_config(config)

    @property
    def arq_timeout_s(self) -> float:
        return self.config.job_slice_s + WINDOW_MARGIN_S

    def build(self, pool: ArqRedis) -> ArqWorker:
        return ArqWorker(
            functions=[
                func(
                    file_job,
                    name=ARQ_FUNCTION,
                    # One more than the tries: that one marks the job failed.
                    max_tries=self.config.job_max_tries + 1,
                    timeout=self.arq_timeout_s,
                    keep_result=0,
                )
            ],
            redis_pool=pool,
            queue_name=keys.JOBS_ARQ_QUEUE,
            handle_signals=False,
            job_serializer=arq_serialize,
            job_deserializer=arq_deserialize,
            ctx={"filejobs": self, "store": JobStore(pool)},
            max_jobs=1,
            poll_delay=0.25,
            keep_result=0,
            log_results=False,
            health_check_key=f"{keys.JOBS_ARQ_QUEUE}:health-check",
        )

    async def end_runs(self, arq: ArqWorker) -> None:
        """Let arq finish with the runs it started (its bookkeeping needs the pool):
        those still running after STOP_WAIT_S are cancelled (arq runs them again)."""
        running = list(arq.tasks.values())
        if not running:
            return
        _, pending = await asyncio.wait(running, timeout=STOP_WAIT_S)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=CANCEL_WAIT_S)

    # --- one run -------------------------------------------------------------------------

    async def run(self, ctx: dict[str, Any], jid: JobId) -> None:
        """One arq job: one run of file job `jid` (see the module docstring). Only `Retry`
        may leave it: arq drops a job that raises anything else, and the job would stay
        `running` for ever."""
        store: JobStore = ctx["store"]
        cfg = self.config
        job_try = int(ctx["job_try"])
        if job_try > cfg.job_max_tries:
            error = (
                f"transcription failed {cfg.job_max_tries} times (the worker running it "
                f"crashed, was stopped or lost Redis)"
            )
            if await store.finish(jid, None, error=error, ttl_s=cfg.job_ttl_s):
                log.warning("file job %s failed: %s", jid, error)
            return
        run: Run | None = None
        limit = asyncio.timeout(self.arq_timeout_s - GIVE_UP_BEFORE_S)
        try:
            async with limit:
                run = await store.start_run(jid, self.worker_id)
                if run is None:
                    log.info("file job %s: nothing to run (finished, expired or not queued)", jid)
                    return
                log.info(
                    "file job %s: run %d (epoch %d) from %.1f s of %.1f s%s",
                    jid,
                    run.info.runs,
                    run.epoch,
                    run.info.params.seconds(run.done_bytes),
                    run.info.audio_seconds,
                    f", try {job_try}" if job_try > 1 else "",
                )
                if self._stopping.is_set():  # taken as the worker stops: leave it to another
                    outcome = await self._continue(store, jid, run, run.done_bytes)
                else:
                    outcome = await self._transcribe(store, jid, run)
        except Exception as exc:
            reason: object = exc
            if limit.expired():
                reason = (
                    f"the run went past its limit of {self.arq_timeout_s - GIVE_UP_BEFORE_S:g} s "
                    f"(job_slice_s, then one window's decode)"
                )
            await self._failed(store, jid, None if run is None else run.epoch, job_try, exc, reason)
            return
        log.info("file job %s: run %d ended: %s", jid, run.info.runs, outcome.value)

    async def _failed(
        self,
        store: JobStore,
        jid: JobId,
        epoch: int | None,
        job_try: int,
        exc: Exception,
        reason: object,
    ) -> None:
        """A try failed (`reason`: `exc`, or what it means): arq runs it again after a
        delay; the last one fails the job."""
        cfg = self.config
        defer_s = min(RETRY_BASE_S * 2 ** (job_try - 1), RETRY_MAX_S)
        if job_try >= cfg.job_max_tries:
            error = f"transcription failed {job_try} times; the last time: {_describe(reason)}"
            log.error("file job %s failed: %s", jid, error, exc_info=exc)
            try:
                await store.finish(jid, epoch, error=error, ttl_s=cfg.job_ttl_s)
            except (RedisError, OSError):  # the try after the last marks it failed
                raise Retry(defer=defer_s) from exc
            return
        log.warning(
            "file job %s: run failed (%s); try %d of %d in %.1f s",
            jid,
            _describe(reason),
            job_try + 1,
            cfg.job_max_tries,
            defer_s,
        )
        log.debug("file job %s: the failure", jid, exc_info=exc)
        raise Retry(defer=defer_s) from exc

    async def _transcribe(self, store: JobStore, jid: JobId, run: Run) -> Outcome:
        """Decode the job's windows from its progress on, until the end of its audio, the
        slice's end or the worker's stop."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.job_slice_s
        job = _JobAudio(run, READ_S)
        audio = _Buffer(np.zeros(0, np.float32), np.zeros(0, np.float32))
        converter = AudioConverter(run.info.params.audio_params())
        vad = make_vad(self.config.vad)
        # As a session's: the job's own, else the worker's (`auto`: detected per window).
        language = run.info.params.language or self.config.language
        rec = _Progress(store, jid, run.epoch, run.done_bytes, await self._prompt(store, jid))
        while True:
            await self._fill(store, jid, job, audio, converter, vad)
            chunks = plan(audio.probs, audio.planned, self.policy, final=audio.eof)
            for a, b in chunks.windows:
                left_s = deadline - loop.time()
                progressed = rec.done > run.done_bytes
                if self._stopping.is_set() or (left_s <= 0 and progressed):
                    return await self._continue(store, jid, run, rec.done)
                segments = await self.scheduler.decode_file(
                    audio.samples[a:b],
                    language=None if language == "auto" else language,
                    prompt=rec.prompt,
                    timeout_s=left_s if progressed else max(left_s, FIRST_WINDOW_WAIT_S),
                    give_up=self._stopping,
                )
                if segments is None:  # not started within the slice, or the worker stops
                    return await self._continue(store, jid, run, rec.done)
                start_s, end_s = job.seconds(audio.start + a), job.seconds(audio.start + b)
                found = file_segments(segments, start_s, end_s)
                if not await rec.record(job.bytes_at(audio.start + b), found):
                    return Outcome.LOST
            if audio.eof:
                break
            audio.drop_before(chunks.handled)
            # Silence decided on: a later run need not read it again.
            handled = job.bytes_at(audio.start)
            if handled > rec.done and not await rec.record(handled, []):
                return Outcome.LOST
            if self._stopping.is_set() or loop.time() >= deadline:
                return await self._continue(store, jid, run, rec.done)
        if rec.done < job.audio_bytes and not await rec.record(job.audio_bytes, []):
            return Outcome.LOST
        if not await store.finish(jid, run.epoch, ttl_s=self.config.job_ttl_s):
            return Outcome.LOST
        log.info("file job %s done: %.1f s of audio", jid, run.info.audio_seconds)
        return Outcome.DONE

    async def _continue(self, store: JobStore, jid: JobId, run: Run, done: int) -> Outcome:
        """End the run at its progress: queue the run from there (under this run's epoch:
        an arq job ID of its own), behind the jobs waiting; one that made no progress
        after a moment (YIELD_DEFER_S), so that it does not spin on a busy worker."""
        moved = done > run.done_bytes
        await enqueue_run(
            store.redis, jid, done, epoch=run.epoch, defer_s=0.0 if moved else YIELD_DEFER_S
        )
        return Outcome.CONTINUED if moved else Outcome.NO_PROGRESS

    async def _prompt(self, store: JobStore, jid: JobId) -> str:
        """The prompt of the run's first window: the end of the text recorded so far."""
        raw = await cast(
            Awaitable[list[bytes]],
            store.redis.lrange(keys.job_segments(jid), -PROMPT_SEGMENTS, -1),
        )
        text = " ".join(decode_segment(r).text.strip() for r in raw).strip()
        return prompt_of(text, FILE_PROMPT_CHARS)

    async def _fill(
        self,
        store: JobStore,
        jid: JobId,
        job: _JobAudio,
        audio: _Buffer,
        converter: AudioConverter,
        vad: VadFn,
    ) -> None:
        """Read, convert and judge audio until `audio` holds enough to decide a window
        (or the rest of the file)."""
        need = self.policy.max_w + self.policy.max_gap_w + self.policy.min_speech_w + 1
        while not audio.eof and audio.windows < need:
            data = await job.read(store, jid)
            eof = job.pos >= job.audio_bytes
            samples, probs = await asyncio.to_thread(
                _convert, converter, vad, audio.samples, audio.windows, data, eof
            )
            audio.probs = np.concatenate([audio.probs, probs])
            audio.samples, audio.eof = samples, eof


class _JobAudio:
    """Where a run reads its job's audio, and how its samples map to the file."""

    def __init__(self, run: Run, read_s: float) -> None:
        params: JobParams = run.info.params
        self.params = params
        self.bpf = params.bytes_per_frame
        if run.done_bytes % self.bpf or run.info.audio_bytes % self.bpf:
            raise ValueError(
                f"job progress {run.done_bytes} or size {run.info.audio_bytes} is not in "
                f"whole sample frames of {self.bpf} bytes"
            )
        self.audio_bytes = run.info.audio_bytes
        self.first_frame = run.done_bytes // self.bpf
        self.pos = run.done_bytes  # the next byte to read
        self.read_bytes = max(1, int(read_s * params.sample_rate)) * self.bpf

    async def read(self, store: JobStore, jid: JobId) -> bytes:
        end = min(self.pos + self.read_bytes, self.audio_bytes)
        data = await store.read_audio(jid, self.pos, end)
        if len(data) != end - self.pos:
            raise RuntimeError(
                f"the job's audio is gone or short: {len(data)} bytes at {self.pos} where "
                f"{end - self.pos} were stored"
            )
        self.pos = end
        return data

    def bytes_at(self, sample: int) -> int:
        """The byte offset of 16 kHz `sample` (counted from the run's first byte): whole
        frames, never past the audio (see the module docstring on resampling)."""
        frames = self.first_frame + round(sample * self.params.sample_rate / SAMPLE_RATE)
        return min(frames * self.bpf, self.audio_bytes)

    def seconds(self, sample: int) -> float:
        """File time of 16 kHz `sample` (counted from the run's first byte)."""
        return self.first_frame / self.params.sample_rate + sample / SAMPLE_RATE


def _convert(
    converter: AudioConverter,
    vad: VadFn,
    samples: Audio,
    judged: int,
    data: bytes,
    eof: bool,
) -> tuple[Audio, Audio]:
    """`samples` with `data` converted after them, and the VAD's probabilities of the
    whole windows after the `judged` ones (at the end of the file, of a last partial
    window too, zero-padded). Runs in a thread."""
    parts = [samples, converter.convert(data)]
    if eof:
        parts.append(converter.flush())
    out = np.concatenate(parts).astype(np.float32, copy=False)
    lo = judged * VAD_WINDOW
    whole = (out.size - lo) // VAD_WINDOW * VAD_WINDOW
    chunk = out[lo : lo + whole]
    if eof and out.size > lo + whole:
        tail = np.zeros(VAD_WINDOW, np.float32)
        tail[: out.size - lo - whole] = out[lo + whole :]
        chunk = np.concatenate([chunk, tail])
    probs = np.asarray(vad(chunk), dtype=np.float32) if chunk.size else np.zeros(0, np.float32)
    return out, probs


def file_segments(segments: list[Segment], start_s: float, end_s: float) -> list[JobSegment]:
    """A window's segments in file time: the window starts at `start_s`, and nothing of
    it is later than `end_s`."""

    def t(value: float) -> float:
        return min(start_s + value, end_s)

    return [
        JobSegment(
            t(seg.start),
            t(seg.end),
            seg.text.strip(),
            tuple(Word(w.word, t(w.start), t(w.end), w.probability) for w in seg.words),
        )
        for seg in segments
        if seg.text.strip()
    ]


def _describe(reason: object) -> str:
    if isinstance(reason, BaseException):
        return f"{type(reason).__name__}: {reason}"
    return str(reason)


async def file_job(ctx: dict[str, Any], jid: str) -> None:
    """The arq function (`shared.jobs.ARQ_FUNCTION`)."""
    runner: FileJobs = ctx["filejobs"]
    await runner.run(ctx, JobId(jid))
