"""Worker ownership: takeover of a dead worker's sessions, hand-back on shutdown, contested
leases. In-process workers (NullEngine) on a real Valkey; the process-level faults
(SIGKILL, SIGSTOP) are in tests/faults/."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from shared import envelope, keys
from shared.keys import SessionId
from shared.store import Store
from tests.conftest import ServiceFactory, make_config
from tests.helpers import drain, fixture, hget, hgetall, open_ws, started
from worker.engine import NullEngine
from worker.service import Worker


async def until(check: Callable[[], Awaitable[Any]], what: str, timeout_s: float = 30.0) -> Any:
    """Poll Redis state until `check` returns something truthy (bounded)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        value = await check()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def crash(worker: Worker) -> None:
    """Stop a worker the way SIGKILL would: no release, no hand-back, no unregister."""
    if worker.maintenance is not None:
        await worker.maintenance.stop()
    if worker.filejobs is not None:
        await worker.filejobs.stop()
    tasks = list(worker._tasks) + [s.task for s in worker.owned.values() if s.task]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if worker.scheduler is not None:
        await worker.scheduler.close()
    worker._cpu.shutdown(wait=True, cancel_futures=True)
    await worker.redis.aclose()


@pytest.fixture
async def workers(redis_url: str) -> AsyncIterator[Callable[..., Awaitable[Worker]]]:
    started_workers: list[Worker] = []

    async def start(worker_id: str, **overrides: Any) -> Worker:
        config = make_config(redis_url, worker_id=worker_id, **overrides)
        worker = Worker(config, engine=NullEngine())
        await worker.start()
        started_workers.append(worker)
        return worker

    yield start
    for worker in started_workers:
        with contextlib.suppress(Exception):
            await worker.shutdown()


async def results_by(redis: aioredis.Redis, sid: str) -> list[tuple[int, str]]:
    """(result_id, lease token that wrote it) of every final in the results stream."""
    out = []
    for _id, fields in await redis.xrange(keys.results(SessionId(sid))):
        if fields[b"t"] == b"final":
            item = envelope.decode_entry(fields)
            assert isinstance(item, envelope.Transcript)
            token = fields[b"by"].decode()
            assert token.endswith(f":{item.epoch}"), "the envelope carries the owner's epoch"
            out.append((item.result_id, token))
    return out


async def first_final(ws: Any) -> dict[str, Any]:
    while True:
        msg = json.loads(await ws.recv())
        if msg["type"] == "transcript" and msg["is_final"]:
            return dict(msg)


async def test_dead_workers_session_is_taken_over(
    service_factory: ServiceFactory, workers: Any, redis: aioredis.Redis
) -> None:
    """A worker dies after publishing a final; another takes the session over after the
    lease, continues from the checkpoint (next result_id, new epoch) and finishes it:
    finals 0..n-1 once each, the first by the dead owner, the rest by the new one."""
    svc = await service_factory(with_worker=False)
    worker_a = await workers("wa")
    frames = fixture("s1.wav").frames(100) + fixture("s2.wav").frames(100)
    ws = await open_ws(svc.url)
    first = await started(ws)
    sid = first["session_id"]
    for frame in frames[: len(frames) // 2]:
        await ws.send(frame)
    final0 = await first_final(ws)
    assert final0["result_id"] == 0
    await crash(worker_a)
    worker_b = await workers("wb")
    for frame in frames[len(frames) // 2 :]:
        await ws.send(frame)
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.code == 1000
    finals = [final0, *out.finals]
    assert [f["result_id"] for f in finals] == list(range(len(finals)))
    assert out.messages[-1]["type"] == "session.closed"
    assert out.messages[-1]["final_results"] == len(finals) >= 3
    assert worker_b.takeovers == 1
    by = await results_by(redis, sid)
    assert [rid for rid, _ in by] == list(range(len(finals))), "no duplicate, no gap"
    tokens = [token for _, token in by]
    cut = tokens.index("wb:2")
    assert cut >= 1 and set(tokens[:cut]) == {"wa:1"} and set(tokens[cut:]) == {"wb:2"}
    meta = await hgetall(redis, keys.meta(SessionId(sid)))
    assert meta[b"owner"] == b"wb" and meta[b"epoch"] == b"2"
    assert meta[b"state"] == b"closed"
    assert await redis.xpending(keys.DISPATCH, keys.DISPATCH_GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_stopping_worker_hands_its_sessions_back(
    service_factory: ServiceFactory, workers: Any, redis: aioredis.Redis
) -> None:
    """On shutdown a worker releases its leases and marks their dispatch entries idle, so
    another worker's next takeover round claims them; the session then completes."""
    svc = await service_factory(with_worker=False)
    worker_a = await workers("wa", lease_s=30.0)
    frames = fixture("s1.wav").frames(100)
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    for frame in frames[:20]:
        await ws.send(frame)
    await until(lambda: redis.exists(keys.lease(sid)), "worker A to own the session")
    await worker_a.shutdown()
    assert not await redis.exists(keys.lease(sid)), "lease released"
    [entry] = await redis.xpending_range(keys.DISPATCH, keys.DISPATCH_GROUP, "-", "+", 10)
    assert entry["time_since_delivered"] >= 300_000, "marked idle for at once takeover"
    assert entry["times_delivered"] == 0, "a hand-back does not count as a failed attempt"
    await workers("wb", lease_s=30.0)
    for frame in frames[20:]:
        await ws.send(frame)
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.code == 1000
    assert [f["result_id"] for f in out.finals] == list(range(len(out.finals)))
    assert (await hget(redis, keys.meta(sid), "owner")) == b"wb"
    assert await hget(redis, keys.meta(sid), "epoch") == b"2"


async def test_contested_lease_is_retried_when_it_runs_out(
    service_factory: ServiceFactory, workers: Any, redis: aioredis.Redis
) -> None:
    """A dispatch entry looks idle but its old owner's lease is still live: the new worker
    does not take the session then, retries when the lease runs out, and takes it."""
    svc = await service_factory(with_worker=False)
    await Store(redis).ensure_group()
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    # A silent owner: it read the entry and holds a lease, but never renews or touches.
    reply = await redis.xreadgroup(keys.DISPATCH_GROUP, "ghost", {keys.DISPATCH: ">"}, count=1)
    [(_stream, [(entry_id, _fields)])] = reply
    await cast(Awaitable[int], redis.hincrby(keys.meta(sid), "epoch", 1))
    await redis.set(keys.lease(sid), "ghost:1", px=1500)
    await redis.xclaim(
        keys.DISPATCH, keys.DISPATCH_GROUP, "ghost", 0, [entry_id], idle=60_000, justid=True
    )
    worker_b = await workers("wb")
    for frame in fixture("s2.wav").frames(100):
        await ws.send(frame)
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.code == 1000
    assert out.messages[-1]["final_results"] == len(out.finals) >= 1
    assert worker_b.takeovers == 1
    meta = await hgetall(redis, keys.meta(sid))
    assert meta[b"owner"] == b"wb" and meta[b"epoch"] == b"2"


async def test_live_owner_keeps_its_session(
    service_factory: ServiceFactory, workers: Any, redis: aioredis.Redis
) -> None:
    """While its owner renews the lease and touches the entry, no other worker takes a
    session over, however many takeover rounds run."""
    svc = await service_factory(with_worker=False)
    worker_a = await workers("wa", lease_s=1.5, heartbeat_s=0.5)
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    await until(lambda: redis.exists(keys.lease(sid)), "worker A to own the session")
    worker_b = await workers("wb", lease_s=1.5, heartbeat_s=0.5)
    # Stream for several lease periods, with silence, while B's takeover loop runs.
    silence = bytes(3200)
    for _ in range(60):
        await ws.send(silence)
        await asyncio.sleep(0.05)  # pacing the audio, not synchronisation
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.code == 1000
    assert worker_b.takeovers == 0 and worker_a.takeovers == 0
    meta = await hgetall(redis, keys.meta(sid))
    assert meta[b"owner"] == b"wa" and meta[b"epoch"] == b"1"


async def test_audio_seen_already_is_never_fed_twice(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """After a Redis rollback the client re-sends frames the worker already read; they
    come back under new entry IDs. The worker skips seqs it has seen: its transcriber's
    audio grows by the new frame only."""
    svc = await service_factory()
    assert svc.worker is not None
    frames = fixture("s1.wav").frames(100)
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    for frame in frames[:10]:
        await ws.send(frame)

    def fed() -> int:
        owned = svc.worker.owned.get(sid) if svc.worker else None
        return owned.transcriber.total_samples if owned else -1

    async def fed_is(n: int) -> bool:
        return fed() == n

    await until(lambda: fed_is(16000), "ten frames fed")
    again = envelope.encode(envelope.AudioChunk(5, frames[5]))
    await redis.xadd(keys.audio(sid), {"seq": 5, "m": again})
    await ws.send(frames[10])
    await until(lambda: fed_is(17600), "the eleventh frame fed")
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.code == 1000


async def test_worker_recreates_lost_dispatch_groups(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """Redis lost the dispatch streams and their group (restart without persistence): the
    worker recreates the group and still claims and finishes new sessions."""
    svc = await service_factory()
    await redis.delete(*keys.DISPATCH_LANES)
    ws = await open_ws(svc.url)
    await started(ws)
    for frame in fixture("s2.wav").frames(100):
        await ws.send(frame)
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.code == 1000 and out.messages[-1]["type"] == "session.closed"
    assert [g["name"] for g in await redis.xinfo_groups(keys.DISPATCH)] == [b"workers"]
