"""A worker whose finals wait too long for its engine takes no new session, even with free
slots (`claim_max_final_wait_s`), and takes them again once it has caught up. Real Valkey,
gateway and WebSockets; the engine is the null engine held by the test, so finals queue
behind a decode that does not end until the test lets it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection

from shared import keys
from shared.keys import WorkerId
from tests.conftest import Service, ServiceFactory
from tests.helpers import fixture, hgetall, open_ws, started
from tests.integration.test_admission import epoch, finish, next_of, occupy
from tests.integration.test_takeover import until
from worker.engine import Audio, NullEngine, Segment


class HeldEngine(NullEngine):
    """The null engine; every final (a call with word timestamps) waits until the test
    sets `go`. Interims pass, so whichever request comes first, a final holds the only
    engine thread and the next final waits behind it."""

    def __init__(self) -> None:
        self.go = threading.Event()
        self.kinds: list[str] = []  # of each call: final (word timestamps) or interim

    def _wait(self, kw: dict[str, Any]) -> None:
        self.kinds.append("final" if kw["word_timestamps"] else "interim")
        if kw["word_timestamps"] and not self.go.wait(timeout=60):
            raise TimeoutError("the test never let the engine go")

    def transcribe(self, audio: Audio, **kw: Any) -> list[Segment]:
        self._wait(kw)
        return super().transcribe(audio, **kw)

    def transcribe_batch(self, audios: Sequence[Audio], **kw: Any) -> list[list[Segment]]:
        self._wait(kw)
        return super().transcribe_batch(audios, **kw)


async def held_worker(
    service_factory: ServiceFactory, engine: HeldEngine, **gate: float
) -> Service:
    """A gateway and a worker with one engine thread, no batching and four slots, so that
    a held final keeps every other final waiting; `gate` sets the claim gate."""
    return await service_factory(
        engine=engine,
        slots=4,
        decode_threads=1,
        batch_decodes=1,
        vad="energy",
        queue_update_s=0.1,
        **gate,
    )


async def two_speaking(url: str, redis: aioredis.Redis) -> list[tuple[ClientConnection, str]]:
    """Two claimed sessions that have each sent two sentences with a pause between."""
    running = [await occupy(url, redis) for _ in range(2)]
    for ws, _ in running:
        for frame in fixture("s2.wav").frames(100):
            await ws.send(frame)
    return running


async def test_no_new_session_while_finals_wait_then_claimed_after_catching_up(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    engine = HeldEngine()
    # The wait alone closes it here (no finals' share reaches 1.0 before the wait 0.3 s).
    svc = await held_worker(
        service_factory, engine, claim_max_final_wait_s=0.3, claim_probe_busy=1.0
    )
    worker = svc.worker
    assert worker is not None and worker.scheduler is not None
    try:
        running = await two_speaking(svc.url, redis)

        async def gate_closed() -> bool:
            return worker.gate.state == "closed"

        # One decode holds the only engine thread; the next final waits behind it.
        await until(gate_closed, "the worker to stop taking sessions")
        assert worker.scheduler.final_wait_s() > 0.3
        await worker._heartbeat_once()
        info = await hgetall(redis, keys.worker_info(WorkerId(worker.worker_id)))
        assert info[b"claiming"] == b"closed" and float(info[b"final_wait_s"]) > 0.3
        assert len(worker.owned) == 2 < worker.slots  # free slots, yet:

        ws_c = await open_ws(svc.url)
        sid_c = (await started(ws_c))["session_id"]
        assert (await next_of(ws_c, "queued"))["position"] == 1
        assert await epoch(redis, sid_c) == 0
    finally:
        engine.go.set()

    async def claimed() -> int:
        return await epoch(redis, sid_c)

    # Caught up: once no final has waited too long within the last window, it claims.
    await until(claimed, "the waiting session to be taken after the backlog")
    assert worker.gate.state != "closed"
    for ws in [ws_c, *(ws for ws, _ in running)]:
        assert (await finish(ws)).code == 1000


async def test_near_capacity_new_sessions_come_one_per_probe_interval(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """Finals using more than `claim_probe_busy` of the engine: a session taken within the
    probing spacing holds the next one back (here the two taken first, a spacing of at
    least an hour: a ramp of 10^6 s x a share of the engine of at least 1% / 2 sessions,
    and a threshold any running final passes); once finals stop, it is taken."""
    engine = HeldEngine()
    svc = await held_worker(
        service_factory,
        engine,
        claim_max_final_wait_s=3600.0,  # never closed: probing alone
        claim_probe_busy=0.01,
        claim_probe_ramp_s=1e6,
    )
    worker = svc.worker
    assert worker is not None
    try:
        running = await two_speaking(svc.url, redis)

        async def probing() -> bool:
            return worker.gate.state == "probing"

        await until(probing, "finals to hold the engine past claim_probe_busy")
        assert "final" in engine.kinds
        ws_c = await open_ws(svc.url)
        sid_c = (await started(ws_c))["session_id"]
        assert (await next_of(ws_c, "queued"))["position"] == 1
        assert await epoch(redis, sid_c) == 0
        await worker._heartbeat_once()
        info = await hgetall(redis, keys.worker_info(WorkerId(worker.worker_id)))
        assert info[b"claiming"] == b"probing" and float(info[b"engine_busy_finals"]) > 0
        assert float(info[b"claim_spacing_s"]) >= 3600
    finally:
        engine.go.set()
    for ws, _ in running:
        assert (await finish(ws)).code == 1000

    async def claimed() -> int:
        return await epoch(redis, sid_c)

    # No finals for a whole load window: the gate opens and the waiting session is taken.
    await until(claimed, "the waiting session to be taken once finals stopped")
    assert (await finish(ws_c)).code == 1000
