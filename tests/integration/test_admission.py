"""Fleet-wide admission over real WebSockets and Valkey: `queued` positions, 1013 past the
queue limits, priority lanes served strictly first, priority allowed per API key."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Awaitable
from typing import Any, cast

import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection

from shared import keys
from shared.keys import SessionId
from tests.conftest import ServiceFactory
from tests.helpers import drain, fixture, hget, open_ws, started
from tests.integration.test_takeover import until


async def next_of(ws: ClientConnection, kind: str) -> dict[str, Any]:
    """The next message of type `kind` (others skipped)."""
    while True:
        msg = json.loads(await ws.recv())
        if msg["type"] == kind:
            return dict(msg)


async def epoch(redis: aioredis.Redis, sid: str) -> int:
    return int(await hget(redis, keys.meta(SessionId(sid)), "epoch") or 0)


async def finish(ws: ClientConnection) -> Any:
    for frame in fixture("s2.wav").frames(100)[:20]:
        await ws.send(frame)
    await ws.send(json.dumps({"type": "close_stream"}))
    return await drain(ws)


async def occupy(url: str, redis: aioredis.Redis) -> tuple[ClientConnection, str]:
    """A session that holds the only worker slot until it is finished."""
    ws = await open_ws(url)
    sid = (await started(ws))["session_id"]
    await until(lambda: epoch(redis, sid), "the running session to be claimed")
    return ws, sid


async def test_waiting_sessions_get_their_positions_and_are_admitted_in_order(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """With every slot taken, new sessions get `queued` with positions 1, 2; when the slot
    frees, the first is admitted and the second moves up to 1; both then complete."""
    svc = await service_factory(slots=1, queue_update_s=0.1)
    running, _ = await occupy(svc.url, redis)
    ws_b = await open_ws(svc.url)
    sid_b = (await started(ws_b))["session_id"]
    assert (await next_of(ws_b, "queued"))["position"] == 1
    ws_c = await open_ws(svc.url)
    sid_c = (await started(ws_c))["session_id"]
    assert (await next_of(ws_c, "queued"))["position"] == 2
    assert (await finish(running)).code == 1000
    await until(lambda: epoch(redis, sid_b), "B to be admitted")
    assert await epoch(redis, sid_c) == 0
    assert (await next_of(ws_c, "queued"))["position"] == 1
    out_b = await finish(ws_b)
    assert out_b.code == 1000 and not out_b.of_type("queued")
    out_c = await finish(ws_c)
    assert out_c.code == 1000
    claimed_c = await hget(redis, keys.meta(SessionId(sid_c)), "claimed_ms")
    claimed_b = await hget(redis, keys.meta(SessionId(sid_b)), "claimed_ms")
    assert claimed_c is not None and claimed_b is not None
    assert int(claimed_c) >= int(claimed_b)


async def test_queue_length_limit_refuses_with_1013(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """max_queue_length sessions waiting: the next connection gets `error` overloaded and
    close 1013 with the reason, before any session is created; one waiting fewer is fine."""
    svc = await service_factory(slots=1, max_queue_length=2, queue_update_s=0.1)
    running, _ = await occupy(svc.url, redis)
    waiting = []
    for position in (1, 2):
        ws = await open_ws(svc.url)
        await started(ws)
        assert (await next_of(ws, "queued"))["position"] == position
        waiting.append(ws)
    refused = await drain(await open_ws(svc.url))
    assert refused.code == 1013
    assert [m["type"] for m in refused.messages] == ["error"]
    assert refused.messages[0]["code"] == "overloaded"
    assert "2 sessions are waiting" in refused.reason
    assert await redis.xlen(keys.DISPATCH) == 3, "the refused connection created nothing"
    for ws in [running, *waiting]:
        assert (await finish(ws)).code == 1000


async def test_session_waiting_past_max_wait_is_closed_with_1013(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """A queued session that no worker takes within max_queue_wait_s is closed with 1013
    and deleted; a worker that reads its entry later just acknowledges it."""
    svc = await service_factory(slots=1, max_queue_wait_s=1.0, queue_update_s=0.1)
    running, _ = await occupy(svc.url, redis)
    ws = await open_ws(svc.url)
    sid = (await started(ws))["session_id"]
    for frame in fixture("s1.wav").frames(100)[:5]:
        await ws.send(frame)
    out = await drain(ws)
    assert out.code == 1013
    assert out.of_type("queued")[0]["position"] == 1
    assert out.of_type("error")[0]["code"] == "overloaded"
    assert "no worker became free" in out.reason
    assert not await redis.exists(keys.meta(SessionId(sid)), keys.audio(SessionId(sid)))
    assert (await finish(running)).code == 1000
    await until(
        lambda: _no_pending(redis), "the cancelled session's dispatch entry to be acknowledged"
    )


async def _no_pending(redis: aioredis.Redis) -> bool:
    summary = await redis.xpending(keys.DISPATCH, keys.DISPATCH_GROUP)
    return bool(summary["pending"] == 0 and await redis.xinfo_groups(keys.DISPATCH))


async def test_stalled_queue_refuses_new_connections(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """When the oldest waiting session has waited max_queue_wait_s (no worker takes any),
    a new connection is refused with 1013 naming the wait."""
    svc = await service_factory(with_worker=False, max_queue_wait_s=5.0)
    await redis.xadd(keys.DISPATCH, {"sid": "0" * 32, "m": b"x"}, id="1000-0")
    refused = await drain(await open_ws(svc.url))
    assert refused.code == 1013 and "oldest waiting session has waited" in refused.reason


async def test_high_priority_is_served_strictly_first(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """A high-priority session that arrives after a waiting normal one is queued ahead of
    it (position 1, the normal one moves to 2) and gets the next free slot."""
    svc = await service_factory(slots=1, queue_update_s=0.1)
    running, _ = await occupy(svc.url, redis)
    normal = await open_ws(svc.url)
    sid_n = (await started(normal))["session_id"]
    assert (await next_of(normal, "queued"))["position"] == 1
    high = await open_ws(svc.url, "priority=high")
    sid_h = (await started(high))["session_id"]
    assert (await next_of(high, "queued"))["position"] == 1
    assert (await next_of(normal, "queued"))["position"] == 2
    assert await redis.xlen(keys.DISPATCH_HIGH) == 1
    assert (await finish(running)).code == 1000
    await until(lambda: epoch(redis, sid_h), "the high-priority session to be admitted")
    assert await epoch(redis, sid_n) == 0, "the normal session still waits"
    assert (await finish(high)).code == 1000
    assert (await finish(normal)).code == 1000


async def test_high_priority_is_allowed_per_api_key(service_factory: ServiceFactory) -> None:
    """With API keys configured, priority=high needs a key in high_priority_keys (else
    4400); normal priority works with any valid key."""
    svc = await service_factory(api_keys=("k-basic", "k-vip"), high_priority_keys=("k-vip",))
    denied = await drain(await open_ws(svc.url, "priority=high&access_token=k-basic"))
    assert denied.code == 4400 and "priority=high is not allowed" in denied.reason
    ws = await open_ws(svc.url, "priority=high&access_token=k-vip")
    await started(ws)
    assert (await finish(ws)).code == 1000
    ws = await open_ws(svc.url, "access_token=k-basic")
    await started(ws)
    assert (await finish(ws)).code == 1000


async def test_session_a_free_worker_takes_at_once_is_never_told_it_is_queued(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """With free slots, a new session is claimed within milliseconds; it must not get a
    `queued` message on the way (it used to, when the gateway looked before the worker's
    claim had landed)."""
    svc = await service_factory(slots=8, queue_update_s=0.1)
    for _ in range(4):
        sockets = [await open_ws(svc.url) for _ in range(8)]
        sids = [(await started(ws))["session_id"] for ws in sockets]
        for sid in sids:
            await until(functools.partial(epoch, redis, sid), "the session to be claimed")
        for ws in sockets:
            out = await finish(ws)
            assert out.code == 1000
            assert not out.of_type("queued")


async def test_resuming_does_not_restart_the_queue_wait(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """max_queue_wait_s counts from when the session joined the queue: a client that
    resumes a session that is still waiting gets 1013 once that wait is over, not a new
    max_queue_wait_s from its new connection."""
    svc = await service_factory(with_worker=False, max_queue_wait_s=60.0, queue_update_s=0.1)
    ws = await open_ws(svc.url)
    first = await started(ws)
    sid = first["session_id"]
    await ws.close()
    # As if the session had joined the queue two minutes ago.
    created = await hget(redis, keys.meta(SessionId(sid)), "created_ms")
    assert created is not None
    await cast(
        Awaitable[int],
        redis.hset(keys.meta(SessionId(sid)), "created_ms", str(int(created) - 120_000)),
    )
    ws2 = await open_ws(svc.url, f"session_id={sid}")
    resume = {"session_id": sid, "resume_token": first["resume_token"], "last_result_id": -1}
    await ws2.send(json.dumps({"type": "resume", **resume}))
    out = await asyncio.wait_for(drain(ws2), timeout=30)  # the old behaviour: 60 s
    assert out.messages[0]["type"] == "session.resumed"
    assert out.code == 1013
    assert out.of_type("error")[-1]["code"] == "overloaded"
    assert not await redis.exists(keys.meta(SessionId(sid)))
