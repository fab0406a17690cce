"""A session's final never waits for its own interim. A session asked for one decode at a
time, so an interim waiting for an engine thread held its final back until a thread had
popped it (and, under load, dropped it), and one in the engine until it ended. Now the
worker sets the interim aside as soon as the final is due: withdrawn from the queue if
it has not started, left to finish if it has, and the final is asked for at once. Real
Valkey, gateway and WebSockets; the null engine held by the test, and the energy VAD on
tones."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import redis.asyncio as aioredis

from shared import keys
from shared.keys import WorkerId
from tests.conftest import ServiceFactory
from tests.helpers import drain, hgetall, open_ws, started
from tests.integration.test_admission import epoch
from tests.integration.test_claim_gate import HeldEngine as ClaimGateEngine
from tests.integration.test_takeover import until

RATE = 16000


class HeldEngine(ClaimGateEngine):
    """The claim gate test's held engine, holding every call this time (with
    `finals_pass`, every interim) until the test sets `go`; each call is recorded as a
    final (word timestamps) or an interim."""

    def __init__(self, finals_pass: bool = False) -> None:
        super().__init__()
        self.finals_pass = finals_pass

    def _wait(self, kw: dict[str, Any]) -> None:
        final = kw["word_timestamps"]
        self.kinds.append("final" if final else "interim")
        if not (final and self.finals_pass) and not self.go.wait(timeout=60):
            raise TimeoutError("the test never let the engine go")


def frames(loud: bool, seconds: float) -> list[bytes]:
    """100 ms frames of a 440 Hz tone (speech to the energy VAD) or of silence."""
    n = round(seconds * 10)
    t = np.arange(1600) / RATE
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 440 * t)).astype("<i2").tobytes()
    return [tone if loud else bytes(3200) for _ in range(n)]


async def test_a_queued_interim_is_withdrawn_when_its_sessions_final_is_due(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    engine = HeldEngine()
    svc = await service_factory(
        engine=engine, slots=2, decode_threads=1, batch_decodes=1, vad="energy"
    )
    worker = svc.worker
    assert worker is not None and worker.scheduler is not None
    sched = worker.scheduler
    try:
        # Session A's first decode takes the only engine thread and keeps it.
        ws_a = await open_ws(svc.url)
        sid_a = (await started(ws_a))["session_id"]
        for frame in frames(True, 0.6) + frames(False, 0.8):
            await ws_a.send(frame)

        async def engine_held() -> bool:
            return len(engine.kinds) == 1

        await until(engine_held, "session A's decode to hold the engine")

        # Session B speaks 1.5 s without a pause: its interim waits in the queue.
        ws_b = await open_ws(svc.url)
        sid_b = (await started(ws_b))["session_id"]
        await until(lambda: epoch(redis, sid_b), "session B to be claimed")
        for frame in frames(True, 1.5):
            await ws_b.send(frame)

        async def interim_queued() -> bool:
            return sched.queued == 1 and sched.queue.finals_waiting == 0

        await until(interim_queued, "session B's interim to wait in the queue")

        # B pauses: its final is due. It is queued in the interim's place at once, while
        # the engine is still held (before, it waited until a thread popped the interim).
        for frame in frames(False, 0.8):
            await ws_b.send(frame)

        async def final_queued() -> bool:
            return sched.queue.finals_waiting == 1

        await until(final_queued, "session B's final to be queued behind A's decode")
        assert sched.queued == 1  # the interim is gone from the queue
        assert sched.counters.interim_withdrawn == worker.interims_set_aside == 1
        assert engine.kinds == ["final"]  # nothing but A's decode has reached the engine
        await worker._heartbeat_once()
        info = await hgetall(redis, keys.worker_info(WorkerId(worker.worker_id)))
        assert info[b"interims_withdrawn"] == info[b"interims_set_aside"] == b"1"
    finally:
        engine.go.set()

    for ws in (ws_a, ws_b):
        await ws.send(json.dumps({"type": "close_stream"}))
    outcome_a, outcome_b = await drain(ws_a), await drain(ws_b)
    assert outcome_a.code == outcome_b.code == 1000
    assert len(outcome_a.finals) == len(outcome_b.finals) == 1
    assert outcome_a.finals[0]["start"] == outcome_b.finals[0]["start"] == 0.0
    assert sid_a != sid_b
    # The withdrawn interim never ran: B's only decode was its final.
    assert engine.kinds == ["final", "final"]
    assert sched.counters.interim == 0


async def test_a_final_goes_past_its_sessions_interim_that_is_in_the_engine(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """Two engine threads; the session's interim holds one (the test keeps it there). Its
    pause makes the early final due: it runs on the other thread and reaches the client
    while the interim is still in the engine; the interim's text follows when it ends."""
    engine = HeldEngine(finals_pass=True)
    svc = await service_factory(
        engine=engine, slots=1, decode_threads=2, batch_decodes=1, vad="energy"
    )
    worker = svc.worker
    assert worker is not None and worker.scheduler is not None
    try:
        ws = await open_ws(svc.url, "interim_results=true")
        sid = (await started(ws))["session_id"]
        await until(lambda: epoch(redis, sid), "the session to be claimed")
        for frame in frames(True, 1.5):
            await ws.send(frame)

        async def interim_running() -> bool:
            return engine.kinds == ["interim"]

        await until(interim_running, "the session's interim to hold an engine thread")
        for frame in frames(False, 0.8):
            await ws.send(frame)
        while True:  # acks (and nothing else) until the final
            msg = json.loads(await ws.recv())
            if msg["type"] == "transcript":
                break
            assert msg["type"] == "ack", msg
        assert msg["is_final"] and msg["start"] == 0.0
        assert engine.kinds == ["interim", "final"] and not engine.go.is_set()
        assert worker.interims_set_aside == 1 and worker.scheduler.counters.interim_withdrawn == 0
    finally:
        engine.go.set()
    await ws.send(json.dumps({"type": "close_stream"}))
    outcome = await drain(ws)
    assert outcome.code == 1000
    # The late interim belongs to an utterance that has its final: it is not sent.
    assert outcome.of_type("transcript") == []
    assert outcome.of_type("session.closed")[0]["final_results"] == 1
