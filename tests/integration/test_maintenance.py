"""Maintenance (worker/maintenance.py, on arq) against a real Valkey: dispatch trimming
never drops what is pending or undelivered, failing sessions are dead-lettered with the
reason, a dead gateway's sessions get their resume grace, and the arq cron really runs."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, cast

import msgpack
import redis.asyncio as aioredis

from shared import keys
from shared.config import Config
from shared.fleet import Fleet, next_stream_id
from shared.keys import GatewayId, SessionId
from shared.protocol import SessionParams
from shared.store import Store
from tests.conftest import ServiceFactory, make_config
from tests.helpers import drain, fixture, hget, hgetall, open_ws, started
from tests.integration.test_takeover import until
from worker.maintenance import Maintenance, deserialize, run_maintenance, serialize


def sid_n(n: int) -> SessionId:
    return SessionId(f"{n:032x}")


async def test_trim_keeps_pending_and_undelivered_entries(redis: aioredis.Redis) -> None:
    """Acknowledged history is trimmed; the oldest pending entry and every undelivered
    entry stay, whatever their age."""
    store = Store(redis)
    await store.ensure_group()
    for n in range(6):
        await store.create_session(sid_n(n), SessionParams(), "h", "gw/c")
    reply = await redis.xreadgroup(keys.DISPATCH_GROUP, "w1", {keys.DISPATCH: ">"}, count=4)
    delivered = [entry_id for entry_id, _ in reply[0][1]]
    # Entry 1 stays pending (a session still running); 0, 2, 3 are done; 4, 5 undelivered.
    await redis.xack(keys.DISPATCH, keys.DISPATCH_GROUP, delivered[0], delivered[2], delivered[3])
    fleet = Fleet(redis)
    assert await fleet.dispatch_trim_point() == delivered[1].decode()
    assert await fleet.trim_dispatch() == 1
    remaining = [entry_id for entry_id, _ in await redis.xrange(keys.DISPATCH)]
    assert remaining[0] == delivered[1] and len(remaining) == 5
    # Once nothing is pending, everything delivered and acknowledged may go.
    await redis.xack(keys.DISPATCH, keys.DISPATCH_GROUP, delivered[1])
    assert await fleet.dispatch_trim_point() == next_stream_id(delivered[3].decode())
    assert await fleet.trim_dispatch() == 3
    undelivered = [entry_id for entry_id, _ in await redis.xrange(keys.DISPATCH)]
    assert len(undelivered) == 2
    fresh = await redis.xreadgroup(keys.DISPATCH_GROUP, "w2", {keys.DISPATCH: ">"}, count=10)
    assert [entry_id for entry_id, _ in fresh[0][1]] == undelivered


async def test_trim_without_group_or_stream_does_nothing(redis: aioredis.Redis) -> None:
    """No dispatch stream (fresh Redis): maintenance trims nothing and does not fail."""
    assert await Fleet(redis).trim_dispatch() == 0


async def test_failing_session_is_dead_lettered(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """A session handed to workers more than max_session_attempts times is closed as
    failed: its client gets `error` (internal) and close 1011 with the reason, a resume
    gets the same, and ss:deadletter records why (the worker's last error)."""
    svc = await service_factory(with_worker=False)
    store = Store(redis)
    await store.ensure_group()
    ws = await open_ws(svc.url)
    first = await started(ws)
    sid = SessionId(first["session_id"])
    for frame in fixture("s2.wav").frames(100)[:10]:
        await ws.send(frame)
    reply = await redis.xreadgroup(keys.DISPATCH_GROUP, "w1", {keys.DISPATCH: ">"}, count=1)
    entry_id = reply[0][1][0][0]
    for attempt in range(3):  # three takeovers that each failed
        await redis.xclaim(keys.DISPATCH, keys.DISPATCH_GROUP, f"w{attempt + 2}", 0, [entry_id])
    await store.record_failure(sid, "RuntimeError: final decode failed")
    config = make_config(svc.gateway.config.redis_url or "", max_session_attempts=3)
    summary = await run_maintenance(Fleet(redis), config)
    assert summary["dead_lettered"] == 1
    out = await drain(ws)
    assert out.code == 1011
    [error] = out.of_type("error")
    assert error["code"] == "internal" and "failed repeatedly" in error["message"]
    assert not out.of_type("session.closed")
    [dead] = await Fleet(redis).dead_letters()
    assert dead["sid"] == sid and dead["attempts"] == "4"
    assert "RuntimeError: final decode failed" in dead["reason"]
    assert await redis.xpending(keys.DISPATCH, keys.DISPATCH_GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }
    meta = await hgetall(redis, keys.meta(sid))
    assert meta[b"state"] == b"closed" and meta[b"closed_reason"] == b"failed"
    assert await redis.ttl(keys.meta(sid)) > 0, "a failed session's keys expire"
    ws2 = await open_ws(svc.url, f"session_id={sid}")
    await ws2.send(
        json.dumps(
            {
                "type": "resume",
                "session_id": sid,
                "resume_token": first["resume_token"],
                "last_result_id": -1,
            }
        )
    )
    again = await drain(ws2)
    assert again.messages[0]["type"] == "session.resumed"
    assert again.code == 1011 and again.of_type("error")[0]["code"] == "internal"


async def test_sessions_under_the_limit_are_left_alone(redis: aioredis.Redis) -> None:
    """Entries delivered max_session_attempts times or fewer are not dead-lettered."""
    store = Store(redis)
    await store.ensure_group()
    await store.create_session(sid_n(1), SessionParams(), "h", "gw/c")
    reply = await redis.xreadgroup(keys.DISPATCH_GROUP, "w1", {keys.DISPATCH: ">"}, count=1)
    await redis.xclaim(keys.DISPATCH, keys.DISPATCH_GROUP, "w2", 0, [reply[0][1][0][0]])
    assert await Fleet(redis).dead_letter_failing(max_attempts=2, ttl_s=60) == []
    assert (await hget(redis, keys.meta(sid_n(1)), "state")) == b"open"


async def test_dead_gateways_sessions_get_their_grace_then_are_reaped(
    redis: aioredis.Redis,
) -> None:
    """A gateway that stopped heartbeating is forgotten; the sessions its clients held
    are detached (resume grace starts) and, once it ends, closed as abandoned. A session
    already resumed on another gateway is left alone."""
    store, fleet = Store(redis), Fleet(redis)
    dead, alive = GatewayId("gw-dead"), GatewayId("gw-alive")
    for n, conn in ((1, "gw-dead/a"), (2, "gw-alive/b")):
        await store.create_session(sid_n(n), SessionParams(), "h", conn)
        await fleet.gateway_holds(dead, sid_n(n))  # session 2 moved on to gw-alive
    await fleet.gateway_heartbeat(dead)
    await fleet.gateway_heartbeat(alive)
    await redis.zadd(keys.GATEWAYS, {dead: 1})  # its last heartbeat: long ago
    gone = await fleet.reap_dead_gateways(alive_s=10, grace_s=0)
    assert gone == {dead: [sid_n(1)]}
    assert await fleet.alive_gateways(10) == [alive]
    assert not await redis.exists(keys.gateway_sessions(dead))
    assert (await hget(redis, keys.meta(sid_n(1)), "conn")) == b""
    assert (await hget(redis, keys.meta(sid_n(2)), "conn")) == b"gw-alive/b"
    assert await store.reap_detached() == [sid_n(1)]
    assert (await hget(redis, keys.meta(sid_n(1)), "state")) == b"closing"


async def test_arq_cron_runs_maintenance_with_msgpack(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """The worker's arq worker runs the cron job by itself (a dead gateway gets reaped
    without anybody calling run_maintenance), and jobs are msgpack, not pickle."""
    fleet = Fleet(redis)
    gid = GatewayId("gw-dead")
    await fleet.gateway_heartbeat(gid)
    await redis.zadd(keys.GATEWAYS, {gid: 1})
    config: Config = make_config(redis_url)
    maintenance = Maintenance(config, redis_url)
    maintenance.start()
    try:
        await until(
            lambda: _not(redis.zscore(keys.GATEWAYS, gid)), "the cron job to reap", timeout_s=20
        )
    finally:
        await maintenance.stop()
    job: dict[str, Any] = {"f": "streamscribe:maintain", "a": [], "k": {}, "t": 1, "et": 5}
    assert deserialize(serialize(job)) == job
    assert msgpack.unpackb(serialize(job), raw=False)["f"] == "streamscribe:maintain"


async def test_maintenance_runs_on_one_named_connection(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """With its pool at one connection, arq's polling and the job's commands take turns on
    it (waiting, not failing as a plain redis-py pool past its limit does): the cron job
    still reaps a dead gateway, and `CLIENT LIST` shows the one connection by its name."""
    fleet = Fleet(redis)
    gid = GatewayId("gw-dead-1conn")
    await fleet.gateway_heartbeat(gid)
    await redis.zadd(keys.GATEWAYS, {gid: 1})
    name = keys.client_name("maintenance", "w-1conn")
    maintenance = Maintenance(make_config(redis_url), redis_url, name, max_connections=1)
    maintenance.start()
    try:
        await until(
            lambda: _not(redis.zscore(keys.GATEWAYS, gid)), "the cron job to reap", timeout_s=20
        )
        clients = await redis.client_list()
        assert sum(1 for c in clients if c.get("name") == name) == 1
    finally:
        await maintenance.stop()
    clients = await redis.client_list()
    assert not [c for c in clients if c.get("name") == name]  # stopping closed the pool


async def _not(value: Any) -> bool:
    return (await value) is None


async def test_session_left_while_redis_was_unreachable_is_still_detached(
    service_factory: ServiceFactory, redis: aioredis.Redis, monkeypatch: Any
) -> None:
    """A connection that ends while its gateway cannot reach Redis is released later by
    the gateway's heartbeat: the session still gets its resume grace (and its reaping)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    svc = await service_factory()
    store = svc.gateway.ctx.store
    real_detach = store.detach
    calls = {"n": 0}

    async def failing_once(sid: SessionId, conn: str, grace_s: float) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RedisConnectionError("injected: redis unreachable")
        return await real_detach(sid, conn, grace_s)

    monkeypatch.setattr(store, "detach", failing_once)
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    await ws.close()
    await until(lambda: redis.zscore(keys.DETACHED, sid), "the heartbeat to detach it")
    assert calls["n"] == 2
    assert svc.gateway.ctx.unreleased == []
    gid = svc.gateway.gateway_id
    assert not await cast(Awaitable[int], redis.sismember(keys.gateway_sessions(gid), sid))
