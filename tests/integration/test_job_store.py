"""File jobs' Redis operations (shared/jobs.py) against a real Valkey: the upload's limit
and expiry, the queue's limit and order, fencing of runs, and what finishing keeps."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis

from shared import keys
from shared.envelope import Word
from shared.jobs import (
    ARQ_FUNCTION,
    JobParams,
    JobSegment,
    JobStore,
    QueueFull,
    arq_deserialize,
    arq_job_id,
    new_job_id,
)
from shared.keys import JobId
from shared.status import Query, collect, render, to_json
from shared.status_model import JobsInfo
from tests.helpers import hget

PARAMS = JobParams(name="meeting.wav")


async def _uploaded(store: JobStore, data: bytes = b"\x01\x00" * 800) -> JobId:
    jid = new_job_id()
    await store.begin_upload(jid, PARAMS, key_id="k1", ttl_s=60)
    assert await store.append(jid, data, max_bytes=10**6, ttl_s=60) == len(data)
    return jid


async def test_upload_appends_in_order_up_to_its_limit(redis: aioredis.Redis) -> None:
    store = JobStore(redis)
    jid = new_job_id()
    await store.begin_upload(jid, PARAMS, key_id="", ttl_s=60)
    assert await store.append(jid, b"ab", max_bytes=6, ttl_s=60) == 2
    assert await store.append(jid, b"cd", max_bytes=6, ttl_s=60) == 4
    # Reaching the limit exactly is allowed; one byte past it appends nothing.
    assert await store.append(jid, b"ef", max_bytes=6, ttl_s=60) == 6
    assert await store.append(jid, b"g", max_bytes=6, ttl_s=60) == -1
    assert await redis.get(keys.job_audio(jid)) == b"abcdef"
    info = await store.load(jid)
    assert info is not None and info.state == "uploading" and info.audio_bytes == 6
    # An upload that is never submitted expires, audio and hash alike.
    assert 0 < await redis.pttl(keys.job(jid)) <= 60_000
    assert 0 < await redis.pttl(keys.job_audio(jid)) <= 60_000
    # No appending to an unknown job.
    assert await store.append(new_job_id(), b"x", max_bytes=6, ttl_s=60) == -2


async def test_submit_queues_the_job_and_its_first_arq_run(redis: aioredis.Redis) -> None:
    store = JobStore(redis)
    jid = await _uploaded(store)
    assert await store.submit(jid, max_queued=5) == 0
    info = await store.load(jid)
    assert info is not None and info.state == "queued" and info.submitted_ms > 0
    assert info.params == JobParams(name="meeting.wav") and info.key_id == "k1"
    assert info.audio_seconds == pytest.approx(0.05)  # 1,600 bytes of 16 kHz s16le
    # Submitted: no expiry while the job waits or runs.
    assert await redis.pttl(keys.job(jid)) == -1
    assert await redis.pttl(keys.job_audio(jid)) == -1
    assert await store.position(jid) == 0 and await store.unfinished() == 1
    # arq's own record of the run from byte 0, on the file jobs' queue, msgpack-encoded.
    arq_id = arq_job_id(jid, 0)
    assert await redis.zscore(keys.JOBS_ARQ_QUEUE, arq_id) is not None
    job = arq_deserialize(await redis.get(f"arq:job:{arq_id}"))
    assert job["f"] == ARQ_FUNCTION and job["a"] == [jid]
    # A second submit of the same upload is refused.
    with pytest.raises(LookupError):
        await store.submit(jid, max_queued=5)


async def test_queue_limit_is_exact_and_refused_jobs_leave_nothing(
    redis: aioredis.Redis,
) -> None:
    store = JobStore(redis)
    first = [await _uploaded(store) for _ in range(3)]
    for i, jid in enumerate(first):
        assert await store.submit(jid, max_queued=3) == i
    extra = await _uploaded(store)
    with pytest.raises(QueueFull) as refused:
        await store.submit(extra, max_queued=3)
    assert refused.value.unfinished == 3
    assert await store.position(extra) is None
    info = await store.load(extra)
    assert info is not None and info.state == "uploading"  # left to expire
    # Once one finishes, there is room again, and positions move up.
    run = await store.start_run(first[0], "w1")
    assert run is not None
    assert await store.finish(first[0], run.epoch, ttl_s=60)
    assert await store.position(first[1]) == 0
    assert await store.submit(extra, max_queued=3) == 2


async def test_runs_are_fenced_and_progress_is_recorded_once(redis: aioredis.Redis) -> None:
    store = JobStore(redis)
    jid = await _uploaded(store)
    await store.submit(jid, max_queued=5)
    seg = JobSegment(0.0, 0.05, " hello", (Word(" hello", 0.0, 0.05, 0.9),))
    old = await store.start_run(jid, "w1")
    new = await store.start_run(jid, "w2")
    assert old is not None and new is not None and new.epoch == old.epoch + 1
    assert new.info.worker == "w2" and new.info.runs == 2 and new.info.state == "running"
    # The run that lost the job records nothing.
    assert not await store.progress(jid, old.epoch, from_bytes=0, to_bytes=800, segments=[seg])
    assert await store.progress(jid, new.epoch, from_bytes=0, to_bytes=800, segments=[seg])
    # The same window again (a retried write) is not recorded twice.
    assert not await store.progress(jid, new.epoch, from_bytes=0, to_bytes=800, segments=[seg])
    assert await store.segments(jid) == [seg]
    info = await store.load(jid)
    assert info is not None and info.done_bytes == 800 and info.done_seconds == 0.025
    # A new run starts where the last recorded window ended.
    again = await store.start_run(jid, "w3")
    assert again is not None and again.done_bytes == 800
    assert not await store.finish(jid, new.epoch, ttl_s=60)  # no longer its run


async def test_finish_drops_the_audio_and_keeps_the_result_for_its_ttl(
    redis: aioredis.Redis,
) -> None:
    store = JobStore(redis)
    jid = await _uploaded(store)
    await store.submit(jid, max_queued=5)
    run = await store.start_run(jid, "w1")
    assert run is not None
    seg = JobSegment(0.0, 0.05, " hi")
    assert await store.progress(jid, run.epoch, from_bytes=0, to_bytes=1600, segments=[seg])
    assert await store.finish(jid, run.epoch, ttl_s=30)
    assert not await redis.exists(keys.job_audio(jid))
    assert 0 < await redis.pttl(keys.job(jid)) <= 30_000
    assert 0 < await redis.pttl(keys.job_segments(jid)) <= 30_000
    assert await store.unfinished() == 0
    info = await store.load(jid)
    assert info is not None and info.state == "done" and info.finished_ms >= info.started_ms
    view = info.to_json(segments=await store.segments(jid))
    assert view["text"] == "hi" and view["state"] == "done" and "error" not in view
    # Finished is final: neither a run nor a verdict changes it again.
    assert not await store.finish(jid, None, error="late", ttl_s=30)
    assert await store.start_run(jid, "w2") is None


async def test_a_failed_job_says_why(redis: aioredis.Redis) -> None:
    store = JobStore(redis)
    jid = await _uploaded(store)
    await store.submit(jid, max_queued=5)
    assert await store.finish(jid, None, error="the engine failed 3 times: boom", ttl_s=30)
    info = await store.load(jid)
    assert info is not None and info.state == "failed"
    assert info.to_json()["error"] == "the engine failed 3 times: boom"
    assert await store.unfinished() == 0


async def test_status_lists_unfinished_jobs_oldest_first(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """`streamscribe status` shows each waiting or running job with its progress, and the
    arq runs queued; `--limit` cuts the list; a finished job leaves it."""
    store = JobStore(redis)
    empty = await collect(redis, Query(url=redis_url))
    assert empty.sections["jobs"] == JobsInfo(0, 0, ())
    assert "jobs      no file job waiting or running (0 arq run(s) queued)" in render(empty)
    first = await _uploaded(store, b"\x00\x00" * 32_000)  # 2 s
    second = await _uploaded(store)
    third = await _uploaded(store)
    for jid in (first, second, third):
        await store.submit(jid, max_queued=5)
    run = await store.start_run(first, "worker-a")
    assert run is not None
    await store.progress(first, run.epoch, from_bytes=0, to_bytes=32_000, segments=[])
    await store.finish(third, None, error="gone", ttl_s=30)
    report = await collect(redis, Query(url=redis_url))
    info = report.sections["jobs"]
    assert isinstance(info, JobsInfo)
    assert (info.unfinished, info.arq_queued) == (2, 3)
    assert [(r.job_id, r.state, r.worker, r.runs) for r in info.rows] == [
        (first, "running", "worker-a", 1),
        (second, "queued", "", 0),
    ]
    assert (info.rows[0].audio_s, info.rows[0].done_s, info.rows[0].name) == (
        2.0,
        1.0,
        "meeting.wav",
    )
    text = render(report)
    assert "jobs      2 file job(s) waiting or running, oldest first (3 arq run(s) queued)" in text
    assert f"{first}  running  meeting.wav  1/2" in text
    assert json.loads(json.dumps(to_json(report)))["jobs"]["unfinished"] == 2
    cut = await collect(redis, Query(url=redis_url, limit=1))
    assert "  ... and 1 more" in render(cut)


async def test_reconcile_repairs_what_a_failure_between_writes_leaves(
    redis: aioredis.Redis,
) -> None:
    """The maintenance job's repair: finished, vanished or never-submitted members leave
    `ss:jobs`; a waiting job whose arq run is gone gets a new one from where it stands;
    a healthy job is left alone."""
    store = JobStore(redis)
    healthy = await _uploaded(store)
    await store.submit(healthy, max_queued=10)
    lost_run = await _uploaded(store)
    await store.submit(lost_run, max_queued=10)
    run = await store.start_run(lost_run, "w1")
    assert run is not None
    await store.progress(lost_run, run.epoch, from_bytes=0, to_bytes=400, segments=[])
    # The run's arq job vanished (say, Redis failed between the submit and the enqueue).
    await redis.delete(f"arq:job:{arq_job_id(lost_run, 0)}")
    await redis.zrem(keys.JOBS_ARQ_QUEUE, arq_job_id(lost_run, 0))
    finished = await _uploaded(store)
    await store.submit(finished, max_queued=10)
    assert await store.finish(finished, None, ttl_s=60)
    await redis.zadd(keys.JOBS, {finished: 1})  # as if the ZREM after JOB_FINISH failed
    half_submitted = await _uploaded(store)
    sec, _ = await redis.time()
    await redis.zadd(keys.JOBS, {half_submitted: sec * 1000})  # ZADD done, JOB_SUBMIT not
    await redis.zadd(keys.JOBS, {new_job_id(): 1})  # a member whose hash is gone
    # Within the grace nothing young is touched; the old, obviously dead members go.
    assert await store.reconcile(grace_ms=3_600_000) == {"removed": 2, "requeued": 0}
    assert await store.position(half_submitted) is not None
    assert await store.reconcile(grace_ms=0) == {"removed": 1, "requeued": 1}
    assert await store.position(half_submitted) is None
    requeued = arq_job_id(lost_run, 400, run.epoch)
    assert await redis.exists(f"arq:job:{requeued}")
    assert await hget(redis, keys.job(lost_run), "queued_run") == requeued.encode()
    assert await redis.exists(f"arq:job:{arq_job_id(healthy, 0)}")
    assert await store.unfinished() == 2  # healthy and lost_run
    # Repaired: a second pass finds nothing to do.
    assert await store.reconcile(grace_ms=0) == {"removed": 0, "requeued": 0}
