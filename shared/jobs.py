"""File jobs: whole files transcribed on arq at a lower priority than live sessions.

A client uploads a file's audio over `GET /v1/jobs` (a WebSocket: binary frames, then
`submit`); the gateway stores it in the job's audio key and queues an arq job on
`keys.JOBS_ARQ_QUEUE`. A worker's arq runner (worker/filejobs.py) decodes it window by
window through the worker's scheduler, behind every live final and interim, and records
each window's segments with the byte offset they cover (`done_bytes`). A run stops after
`job_slice_s` and queues its continuation behind the other waiting jobs, so long files
take turns and a worker that dies mid-file costs at most one slice: the next run starts
from the last recorded window. Each run takes a new `epoch` (fencing token); a run whose
epoch is no longer the job's cannot record anything.

The client reads the result with `GET /v1/jobs/<job_id>` (plain HTTP, JSON) or stays
connected after submitting and is sent `job.progress` and then `job.done` or
`job.failed` (docs/protocol.md, *File jobs*).

This module is the part both sides share: parameters, the job's record, its segments'
encoding, the arq job codec, and `JobStore`, the job's Redis operations (keys in
`shared.keys`, scripts in `shared.scripts`).
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import msgpack
import redis.asyncio as aioredis

from shared import keys, scripts
from shared.envelope import Word
from shared.errors import BadRequest
from shared.keys import JobId
from shared.protocol import SessionParams, parse_query, read_query

JobState = Literal["uploading", "queued", "running", "done", "failed"]
JOB_STATES: tuple[JobState, ...] = ("uploading", "queued", "running", "done", "failed")
FINISHED: frozenset[str] = frozenset({"done", "failed"})

#: The arq function every file job runs (worker/filejobs.py registers it under this name).
ARQ_FUNCTION = "streamscribe:file_job"

#: Query parameters of `GET /v1/jobs`: the audio format and language of the listen
#: endpoint, the API key, and a name for the job (echoed back, at most MAX_NAME_CHARS).
JOB_QUERY_PARAMS = frozenset(
    {"sample_rate", "encoding", "channels", "language", "access_token", "name"}
)
MAX_NAME_CHARS = 200


def new_job_id() -> JobId:
    """32 lowercase hex characters (128 random bits): unguessable, like a session's ID."""
    return JobId(secrets.token_hex(16))


def is_job_id(value: str) -> bool:
    return keys.is_session_id(value)  # the same shape


@dataclass(frozen=True, slots=True)
class JobParams:
    """What the client declared in the query string of `GET /v1/jobs`."""

    sample_rate: int = 16000
    encoding: str = "pcm_s16le"
    channels: int = 1
    language: str | None = None
    name: str = ""
    access_token: str | None = None

    @property
    def bytes_per_frame(self) -> int:
        return self.audio_params().bytes_per_frame

    @property
    def bytes_per_second(self) -> int:
        return self.audio_params().bytes_per_second

    def audio_params(self) -> SessionParams:
        """The same format as a session's, for `worker.audio.AudioConverter`."""
        return SessionParams(
            sample_rate=self.sample_rate,
            encoding=self.encoding,
            channels=self.channels,
            language=self.language,
        )

    def seconds(self, size: int) -> float:
        """Seconds of audio in `size` bytes."""
        return size / self.bytes_per_second


def parse_job_query(query: str | Mapping[str, Sequence[str]]) -> JobParams:
    """Validate the query string of `GET /v1/jobs`; every problem raises `BadRequest`."""
    parsed = read_query(query)
    unknown = sorted(set(parsed) - JOB_QUERY_PARAMS)
    if unknown:
        raise BadRequest(f"unknown query parameter(s) for /v1/jobs: {', '.join(unknown)}")
    names = parsed.get("name") or [""]
    if len(names) > 1:
        raise BadRequest(f"query parameter 'name' given {len(names)} times")
    name = names[0]
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise BadRequest(f"name must be printable and at most {MAX_NAME_CHARS} characters")
    # The audio parameters are validated exactly as the listen endpoint's.
    audio = parse_query({k: v for k, v in parsed.items() if k != "name"})
    return JobParams(
        sample_rate=audio.sample_rate,
        encoding=audio.encoding,
        channels=audio.channels,
        language=audio.language,
        name=name,
        access_token=audio.access_token,
    )


# --- segments ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobSegment:
    """A piece of the transcript; times in seconds from the start of the file."""

    start: float
    end: float
    text: str
    words: tuple[Word, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "start": round(self.start, 3),
            "end": round(self.end, 3),
            "text": self.text,
            "words": [
                {
                    "word": w.word,
                    "start": round(w.start, 3),
                    "end": round(w.end, 3),
                    "probability": round(w.probability, 4),
                }
                for w in self.words
            ],
        }


def encode_segment(seg: JobSegment) -> bytes:
    body = {
        "s": seg.start,
        "e": seg.end,
        "t": seg.text,
        "w": [[w.word, w.start, w.end, w.probability] for w in seg.words],
    }
    return cast(bytes, msgpack.packb(body, use_bin_type=True))


def decode_segment(data: bytes) -> JobSegment:
    body = msgpack.unpackb(data, raw=False)
    return JobSegment(
        float(body["s"]),
        float(body["e"]),
        str(body["t"]),
        tuple(Word(str(w[0]), float(w[1]), float(w[2]), float(w[3])) for w in body["w"]),
    )


def transcript_text(segments: Sequence[JobSegment]) -> str:
    return " ".join(s.text.strip() for s in segments if s.text.strip())


# --- the job's record -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class JobInfo:
    """A job's hash, read back (`JobStore.load`)."""

    job_id: JobId
    state: JobState
    params: JobParams
    audio_bytes: int
    done_bytes: int
    epoch: int
    runs: int
    created_ms: int
    submitted_ms: int
    started_ms: int
    finished_ms: int
    worker: str
    key_id: str
    error: str

    @property
    def audio_seconds(self) -> float:
        return self.params.seconds(self.audio_bytes)

    @property
    def done_seconds(self) -> float:
        return self.params.seconds(self.done_bytes)

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @classmethod
    def from_hash(cls, jid: JobId, h: Mapping[str, str]) -> JobInfo:
        def num(name: str) -> int:
            return int(h.get(name) or 0)

        state = h.get("state", "")
        if state not in JOB_STATES:
            raise ValueError(f"job {jid} has no valid state: {state!r}")
        return cls(
            job_id=jid,
            state=state,
            params=JobParams(
                sample_rate=num("sample_rate"),
                encoding=h.get("encoding", "pcm_s16le"),
                channels=num("channels"),
                language=h.get("language") or None,
                name=h.get("name", ""),
            ),
            audio_bytes=num("audio_bytes"),
            done_bytes=num("done_bytes"),
            epoch=num("epoch"),
            runs=num("runs"),
            created_ms=num("created_ms"),
            submitted_ms=num("submitted_ms"),
            started_ms=num("started_ms"),
            finished_ms=num("finished_ms"),
            worker=h.get("worker", ""),
            key_id=h.get("key_id", ""),
            error=h.get("error", ""),
        )

    def to_json(
        self, *, position: int | None = None, segments: Sequence[JobSegment] | None = None
    ) -> dict[str, Any]:
        """The public view (GET /v1/jobs/<id>, `job.done`); docs/protocol.md."""
        out: dict[str, Any] = {
            "job_id": self.job_id,
            "state": self.state,
            "name": self.params.name,
            "audio_seconds": round(self.audio_seconds, 3),
            "done_seconds": round(self.done_seconds, 3),
            "submitted_ms": self.submitted_ms or None,
            "started_ms": self.started_ms or None,
            "finished_ms": self.finished_ms or None,
            "runs": self.runs,
        }
        if position is not None:
            out["position"] = position
        if self.state == "failed":
            out["error"] = self.error
        if segments is not None:
            out["text"] = transcript_text(segments)
            out["segments"] = [s.to_json() for s in segments]
        return out


# --- arq --------------------------------------------------------------------------------


def arq_serialize(job: dict[str, Any]) -> bytes:
    """arq's job codec for streamscribe's queues: msgpack, never pickle."""
    return cast(bytes, msgpack.packb(job, use_bin_type=True, datetime=True))


def arq_deserialize(data: bytes) -> dict[str, Any]:
    return cast(dict[str, Any], msgpack.unpackb(data, raw=False, timestamp=3))


#: A queued run that no worker started within this long is dropped by arq; the
#: maintenance job's `JobStore.reconcile` queues it again.
ARQ_EXPIRES_S = 7 * 86400


def arq_job_id(jid: JobId, done_bytes: int, epoch: int = 0) -> str:
    """The arq job ID of the run that starts at `done_bytes`, queued by the run of
    `epoch` (0: the submit): each run queues its continuation once (arq refuses a job ID
    it holds), and a run that made no progress queues one with an ID of its own."""
    return f"file:{jid}:{done_bytes}:{epoch}"


async def enqueue_run(
    redis: aioredis.Redis, jid: JobId, done_bytes: int, *, epoch: int = 0, defer_s: float = 0.0
) -> bool:
    """Queue the arq run of `jid` from `done_bytes` (for `epoch`, see `arq_job_id`), on
    the redis client's own pool; False when that run is queued already."""
    from arq.connections import ArqRedis

    arq = ArqRedis(
        connection_pool=redis.connection_pool,
        job_serializer=arq_serialize,
        job_deserializer=arq_deserialize,
        default_queue_name=keys.JOBS_ARQ_QUEUE,
    )
    run_id = arq_job_id(jid, done_bytes, epoch)
    job = await arq.enqueue_job(
        ARQ_FUNCTION,
        jid,
        _job_id=run_id,
        _queue_name=keys.JOBS_ARQ_QUEUE,
        _defer_by=defer_s if defer_s > 0 else None,
        _expires=ARQ_EXPIRES_S,
    )
    # The job's latest queued run, which `JobStore.reconcile` looks for (not on a job
    # that is gone: that would leave a stray hash without expiry).
    await cast(Awaitable[int], redis.eval(scripts.JOB_QUEUED_RUN, 1, keys.job(jid), run_id))
    return job is not None


# --- Redis operations -------------------------------------------------------------------


class QueueFull(Exception):
    """`job_max_queued` jobs are waiting or running already."""

    def __init__(self, unfinished: int) -> None:
        super().__init__(f"{unfinished} file jobs are waiting or running")
        self.unfinished = unfinished


@dataclass(frozen=True, slots=True)
class Run:
    """A run that `JobStore.start_run` let start: its fencing epoch, and where it starts."""

    epoch: int
    done_bytes: int
    info: JobInfo


class JobStore:
    """A file job's Redis operations. Every write to a job's keys is one script on that
    job's keys only; the fleet-wide `JOBS` set is written by separate commands."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._scripts = {
            name: redis.register_script(getattr(scripts, name))
            for name in (
                "JOB_APPEND",
                "JOB_SUBMIT",
                "JOB_START",
                "JOB_PROGRESS",
                "JOB_FINISH",
            )
        }

    async def begin_upload(
        self, jid: JobId, params: JobParams, *, key_id: str, ttl_s: float
    ) -> None:
        """Create the job's hash in state `uploading`; it expires after `ttl_s` unless
        submitted."""
        fields: dict[str, str | int] = {
            "state": "uploading",
            "sample_rate": params.sample_rate,
            "encoding": params.encoding,
            "channels": params.channels,
            "language": params.language or "",
            "name": params.name,
            "key_id": key_id,
            "audio_bytes": 0,
            "done_bytes": 0,
            "epoch": 0,
            "runs": 0,
        }
        h = keys.job(jid)
        async with self.redis.pipeline(transaction=True) as pipe:
            fields["created_ms"] = await self._now_ms()
            pipe.hset(h, mapping=cast(Any, fields))
            pipe.pexpire(h, _ms(ttl_s))
            await pipe.execute()

    async def append(self, jid: JobId, data: bytes, *, max_bytes: int, ttl_s: float) -> int:
        """Append uploaded audio; returns the audio's new size in bytes, -1 when it would
        pass `max_bytes` (nothing appended), -2 when the job is not being uploaded."""
        result = await self._scripts["JOB_APPEND"](
            keys=list(keys.job_keys(jid)), args=[data, max_bytes, _ms(ttl_s)]
        )
        return int(result)

    async def submit(self, jid: JobId, *, max_queued: int) -> int:
        """Close the upload and queue the job; returns its position (0: next). Raises
        QueueFull past `max_queued` unfinished jobs (then the upload stays, to expire)."""
        now = await self._now_ms()
        # Add first, then look at the rank: concurrent submits on several gateways cannot
        # all slip under the limit (at worst both of two racing ones are refused).
        await self.redis.zadd(keys.JOBS, {jid: now}, nx=True)
        rank = await self.redis.zrank(keys.JOBS, jid)
        if rank is None or rank >= max_queued:
            await self.redis.zrem(keys.JOBS, jid)
            raise QueueFull(await self.redis.zcard(keys.JOBS))
        result = int(await self._scripts["JOB_SUBMIT"](keys=list(keys.job_keys(jid)), args=[now]))
        if result < 0:
            await self.redis.zrem(keys.JOBS, jid)
            raise LookupError(f"job {jid} is not being uploaded")
        await enqueue_run(self.redis, jid, 0)
        return int(rank)

    async def load(self, jid: JobId) -> JobInfo | None:
        h = await cast(Awaitable[dict[bytes, bytes]], self.redis.hgetall(keys.job(jid)))
        if not h:
            return None
        return JobInfo.from_hash(jid, {_s(k): _s(v) for k, v in h.items()})

    async def position(self, jid: JobId) -> int | None:
        """Unfinished jobs submitted before this one (None: not waiting or running)."""
        rank = await self.redis.zrank(keys.JOBS, jid)
        return None if rank is None else int(rank)

    async def unfinished(self) -> int:
        return int(await self.redis.zcard(keys.JOBS))

    async def segments(self, jid: JobId) -> list[JobSegment]:
        raw = await cast(Awaitable[list[bytes]], self.redis.lrange(keys.job_segments(jid), 0, -1))
        return [decode_segment(r) for r in raw]

    async def start_run(self, jid: JobId, worker: str) -> Run | None:
        """Take the job for a run: a new epoch, one more run; None when the job is
        gone, finished, or not submitted."""
        result = await self._scripts["JOB_START"](
            keys=list(keys.job_keys(jid)), args=[worker, await self._now_ms()]
        )
        if not result or int(result[0]) <= 0:
            return None
        info = await self.load(jid)
        if info is None:
            return None
        return Run(epoch=int(result[0]), done_bytes=int(result[1]), info=info)

    async def read_audio(self, jid: JobId, start: int, end: int) -> bytes:
        """Bytes [start, end) of the job's audio (fewer at its end)."""
        if end <= start:
            return b""
        data = await self.redis.getrange(keys.job_audio(jid), start, end - 1)
        return bytes(data)

    async def progress(
        self,
        jid: JobId,
        epoch: int,
        *,
        from_bytes: int,
        to_bytes: int,
        segments: Sequence[JobSegment],
    ) -> bool:
        """Record the segments of audio [from_bytes, to_bytes); False (nothing written)
        when the run lost the job (another epoch) or the job is not at `from_bytes`."""
        result = await self._scripts["JOB_PROGRESS"](
            keys=list(keys.job_keys(jid)),
            args=[epoch, from_bytes, to_bytes, *(encode_segment(s) for s in segments)],
        )
        return int(result) == 1

    async def finish(self, jid: JobId, epoch: int | None, *, error: str = "", ttl_s: float) -> bool:
        """Mark the job done (no error) or failed, drop its audio and let the rest expire
        after `ttl_s`. `epoch` None: whatever run holds it (an operator's or the last
        try's verdict). False when another run holds the job or it is finished already."""
        result = await self._scripts["JOB_FINISH"](
            keys=list(keys.job_keys(jid)),
            args=[
                -1 if epoch is None else epoch,
                "failed" if error else "done",
                error,
                await self._now_ms(),
                _ms(ttl_s),
            ],
        )
        if int(result) != 1:
            return False
        await self.redis.zrem(keys.JOBS, jid)
        return True

    async def reconcile(self, *, grace_ms: int, limit: int = 100) -> dict[str, int]:
        """Repair what a failure between two separate writes can leave (the maintenance
        job runs this), for the `limit` oldest members of `ss:jobs`:

        - a job whose hash is gone, or that is finished, leaves `ss:jobs` (a failure
          between JOB_FINISH and its ZREM);
        - a job still `uploading` more than `grace_ms` after it was added leaves it (its
          submit failed after the ZADD; the upload expires by itself);
        - a job waiting or running whose latest queued run (`queued_run`) no longer
          exists in arq, more than `grace_ms` after it was submitted, gets a new run from
          its `done_bytes` (a failure between JOB_SUBMIT and the enqueue, or a run arq
          dropped). A run that is queued or running keeps its `arq:job:` key until it
          returns, and queues its continuation before returning, so a healthy job is
          never given a second run.

        Returns counts: `removed`, `requeued`."""
        now = await self._now_ms()
        members = await self.redis.zrange(keys.JOBS, 0, limit - 1, withscores=True)
        if not members:
            return {"removed": 0, "requeued": 0}
        pipe = self.redis.pipeline(transaction=False)
        for jid, _ in members:
            pipe.hmget(keys.job(JobId(_s(jid))), ["state", "queued_run", "done_bytes", "epoch"])
        states = await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for _, queued_run, _, _ in states:
            pipe.exists(f"arq:job:{_s(queued_run)}" if queued_run else "arq:job:")
        alive = await pipe.execute()
        removed = requeued = 0
        for (raw_jid, score), (state, _, done, epoch), run_alive in zip(
            members, states, alive, strict=True
        ):
            jid = JobId(_s(raw_jid))
            now_state = None if state is None else _s(state)
            late = now - int(score) > grace_ms
            if now_state is None or now_state in FINISHED or (now_state == "uploading" and late):
                removed += await self.redis.zrem(keys.JOBS, jid)
            elif now_state in ("queued", "running") and late and not run_alive:
                await enqueue_run(self.redis, jid, int(_s(done) or 0), epoch=int(_s(epoch) or 0))
                requeued += 1
        return {"removed": removed, "requeued": requeued}

    async def _now_ms(self) -> int:
        sec, usec = await self.redis.time()
        return int(sec) * 1000 + int(usec) // 1000


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
