"""Results that pub/sub never delivered reach the client through the relay's RECONCILE:
one gateway-wide timer tells every connection that heard nothing for a whole
`reconcile_interval_s` to re-read its session's results stream."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aioredis

from gateway.relay import RECONCILE, TICK_SLICES, Relay
from shared import envelope, keys
from shared.embedded import EmbeddedValkey
from shared.envelope import Closed, Transcript
from shared.keys import SessionId
from tests.conftest import ServiceFactory
from tests.helpers import drain, open_ws, started
from tests.integration.test_takeover import until


async def test_tick_reaches_only_the_subscribers_that_heard_nothing(
    redis: aioredis.Redis,
) -> None:
    relay = Relay(redis, reconcile_interval_s=3600)  # ticks by hand below
    await relay.start()
    try:
        a, b = SessionId("a" * 32), SessionId("b" * 32)
        qa, qb = await relay.subscribe(a), await relay.subscribe(b)
        relay.tick()  # both just subscribed: a whole interval has not passed for either
        assert qa.empty() and qb.empty()
        await redis.publish(keys.events_channel(a), b"x")
        assert await qa.get() == b"x"
        relay.tick()
        assert qa.empty()  # it heard something during the interval
        assert qb.get_nowait() == RECONCILE
        relay.tick()
        assert qa.get_nowait() == RECONCILE  # nothing since the last tick
        relay.reconcile_all()  # what the relay does after it subscribed again
        assert qa.get_nowait() == RECONCILE and qb.get_nowait() == RECONCILE
        await relay.unsubscribe(a, qa)
        relay.tick()
        relay.tick()
        assert qa.empty()  # gone: no longer told anything
    finally:
        await relay.close()


async def test_reconciles_are_spread_over_the_interval(redis: aioredis.Redis) -> None:
    """Each timer step looks at one slice of the subscribers: every silent subscriber is
    told once per interval, never all of them at the same moment."""
    relay = Relay(redis, reconcile_interval_s=3600)
    await relay.start()
    try:
        n = 3 * TICK_SLICES
        queues = [await relay.subscribe(SessionId(f"{i:032x}")) for i in range(n)]
        relay.tick()  # all just subscribed: nothing yet
        assert all(q.empty() for q in queues)
        told: list[int] = []
        for _ in range(TICK_SLICES):
            relay.tick_slice()
            told.append(sum(q.qsize() for q in queues) - sum(told))
        assert told == [3] * TICK_SLICES
        assert all(q.qsize() == 1 and q.get_nowait() == RECONCILE for q in queues)
    finally:
        await relay.close()


async def test_results_never_published_still_reach_the_client(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    svc = await service_factory(with_worker=False)
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    # What a worker's publish does, minus the PUBLISH: only the results stream has them.
    final = Transcript(result_id=0, is_final=True, start=0.0, end=1.0, text="only stored")
    closed = Closed(reason="client_closed", audio_seconds=1.0, final_results=1)
    await redis.xadd(keys.results(sid), {"t": "final", "rid": "0", "m": envelope.encode(final)})
    await redis.xadd(keys.results(sid), {"t": "closed", "m": envelope.encode(closed)})
    out = await asyncio.wait_for(drain(ws), timeout=30)
    assert [m["text"] for m in out.finals] == ["only stored"]
    assert out.messages[-1]["type"] == "session.closed"
    assert out.code == 1000


async def test_relay_subscribes_again_after_an_outage_longer_than_one_retry(
    tmp_path: Path,
) -> None:
    """Redis goes away for several reconnect attempts and comes back on the same port: the
    relay keeps trying, subscribes again, tells its subscribers to reconcile, and then
    delivers published messages again. (A pub/sub object whose subscribe failed has no
    connection; reading it raised RuntimeError and ended the relay's task for good.)"""
    server = EmbeddedValkey(tmp_path / "valkey")
    server.start()
    redis = aioredis.Redis.from_url(server.url)
    relay = Relay(redis, reconcile_interval_s=3600)  # no timer ticks in the queue
    await relay.start()
    sid = SessionId("c" * 32)
    queue = await relay.subscribe(sid)
    again: EmbeddedValkey | None = None
    try:
        server.stop()

        async def refused_twice() -> bool:
            return relay.resubscribe_failures >= 2

        await until(refused_twice, "two refused attempts to subscribe again")
        assert not relay.subscribed and relay.reconnects == 1
        again = EmbeddedValkey(tmp_path / "valkey", port=server.port)
        again.start()

        async def delivered() -> bool:
            return bool(await redis.publish(keys.events_channel(sid), b"x"))

        await until(delivered, "a publish to reach the relay again")
        got = [await queue.get()]
        while got[-1] != b"x":
            got.append(await queue.get())
        assert RECONCILE in got[:-1], "subscribers must re-read what they may have missed"
        assert relay._task is not None and not relay._task.done()
        assert relay.subscribed and relay.reconnects == 1
    finally:
        await relay.close()  # raises whatever ended the relay's task
        await redis.aclose()
        if again is not None:
            again.stop()
