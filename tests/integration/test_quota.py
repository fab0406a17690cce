"""`max_sessions_per_key`: an API key holds at most that many sessions open across the
fleet (connected or waiting to be resumed); one more is refused with `rate_limited` and
4429, a resume never is, and a session that ends frees its place."""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection

from gateway.connection import key_id
from shared import keys
from shared.config import Config
from shared.errors import ConfigError
from shared.keys import SessionId
from shared.status import Query, collect, render, to_json
from shared.status_model import QuotaRow, QuotasInfo
from shared.status_render import render_quotas
from shared.store import Store
from tests.conftest import ServiceFactory
from tests.helpers import drain, open_ws, started
from tests.integration.test_takeover import until

KEYS = ("k-one", "k-two")


async def open_as(url: str, api_key: str, query: str = "") -> ClientConnection:
    return await open_ws(url, query, headers={"Authorization": f"Bearer {api_key}"})


async def refused(url: str, api_key: str) -> tuple[int | None, str, dict[str, Any]]:
    """A new session that the quota refuses: its close code and reason, and its error."""
    out = await drain(await open_as(url, api_key))
    (error,) = out.of_type("error")
    return out.code, out.reason, error


async def counted(redis: aioredis.Redis, api_key: str) -> set[str]:
    members = await redis.zrange(keys.quota(key_id(api_key)), 0, -1)
    return {m.decode() for m in members}


async def test_the_limit_is_per_key_and_a_closed_session_frees_its_place(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """At the limit (2) a third session of the same key gets `rate_limited` and 4429 with
    the reason; another key is not affected; once one of the two closes, the key may
    open a session again. Redis holds the key's ID, never the key."""
    svc = await service_factory(api_keys=KEYS, max_sessions_per_key=2)
    first = await open_as(svc.url, "k-one")
    second = await open_as(svc.url, "k-one")
    sids = {(await started(ws))["session_id"] for ws in (first, second)}
    assert await counted(redis, "k-one") == sids
    code, reason, error = await refused(svc.url, "k-one")
    assert (code, error["code"]) == (4429, "rate_limited")
    assert "2 sessions open" in reason and "max_sessions_per_key" in reason
    assert await counted(redis, "k-one") == sids  # the refused one was never counted
    other = await open_as(svc.url, "k-two")
    await started(other)
    await first.send(json.dumps({"type": "close_stream"}))
    assert (await drain(first)).code == 1000
    await until(lambda: _count_is(redis, "k-one", 1), "the closed session to stop counting")
    third = await open_as(svc.url, "k-one")
    await started(third)
    assert not [k for k in await redis.keys(f"{keys.PREFIX}:quota:*") if b"k-one" in k]
    for ws in (second, other, third):
        await ws.close()


async def _count_is(redis: aioredis.Redis, api_key: str, n: int) -> bool:
    return len(await counted(redis, api_key)) == n


async def test_a_detached_session_keeps_its_place_and_its_resume_is_never_refused(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """A session whose client dropped still counts while it can be resumed (so a client
    cannot get round the limit by reconnecting as new sessions); its resume is accepted
    with the key at its limit."""
    svc = await service_factory(api_keys=KEYS, max_sessions_per_key=1)
    ws = await open_as(svc.url, "k-one")
    first = await started(ws)
    await ws.close()  # dropped, not closed: resumable for resume_grace_s
    await until(lambda: redis.zscore(keys.DETACHED, first["session_id"]), "the detach")
    code, _, error = await refused(svc.url, "k-one")
    assert (code, error["code"]) == (4429, "rate_limited")
    back = await open_as(svc.url, "k-one", f"session_id={first['session_id']}")
    resume = {
        "type": "resume",
        "session_id": first["session_id"],
        "resume_token": first["resume_token"],
        "last_result_id": -1,
    }
    await back.send(json.dumps(resume))
    assert json.loads(await back.recv())["type"] == "session.resumed"
    assert await counted(redis, "k-one") == {first["session_id"]}
    await back.close()


async def test_places_expire_without_their_gateway_and_the_heartbeat_renews_them(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """A session counted by a gateway that died (no renewal: its time passed) no longer
    counts; the live gateway's heartbeat moves its own sessions' time forward."""
    svc = await service_factory(api_keys=KEYS, max_sessions_per_key=1)
    quota = keys.quota(key_id("k-one"))
    await redis.zadd(quota, {"f" * 32: int(time.time() * 1000) - 1})  # a dead gateway's
    ws = await open_as(svc.url, "k-one")
    sid = (await started(ws))["session_id"]
    assert await counted(redis, "k-one") == {sid}
    first = await redis.zscore(quota, sid)
    await until(lambda: _renewed(redis, quota, sid, first), "a heartbeat to renew it")
    assert 0 < await redis.pttl(quota) <= svc.gateway.ctx.quota_hold_s * 1000
    await ws.close()


async def _renewed(redis: aioredis.Redis, quota: str, sid: str, before: float | None) -> bool:
    score = await redis.zscore(quota, sid)
    return score is not None and before is not None and score > before


async def test_without_a_limit_or_without_keys_nothing_is_counted(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """0 (the default) counts nothing; the setting must not be negative, and a limit
    without API keys (nothing to count by) is refused rather than ignored."""
    svc = await service_factory(api_keys=KEYS)
    ws = await open_as(svc.url, "k-one")
    await started(ws)
    assert await counted(redis, "k-one") == set()
    assert not svc.gateway.ctx.quota_held
    await ws.close()
    with pytest.raises(ConfigError) as info:
        Config(max_sessions_per_key=-1)
    assert "--max-sessions-per-key" in str(info.value)
    with pytest.raises(ConfigError) as info:
        Config(max_sessions_per_key=1)
    assert "--api-key" in str(info.value)
    Config(max_sessions_per_key=1, api_keys=("k",))


async def test_the_heartbeat_never_counts_an_ended_session_again_nor_cuts_one_short(
    redis: aioredis.Redis,
) -> None:
    """A heartbeat's renewal can be on its way while a session ends or is detached: it
    moves forward only the sessions still counted and never lowers a later time (the
    resume grace of a detached one); a resume's or a detach's hold adds whatever is
    missing."""
    store = Store(redis)
    quota = keys.quota("0123456789abcdef")
    later = int(time.time() * 1000) + 100_000
    await redis.zadd(quota, {"detached": later, "held": 1})
    await redis.pexpireat(quota, later)
    held = [SessionId("ended"), SessionId("detached"), SessionId("held")]
    await store.quota_hold({"0123456789abcdef": held}, 15, renew=True)
    scores = dict(await redis.zrange(quota, 0, -1, withscores=True))
    assert set(scores) == {b"detached", b"held"}  # "ended" is not counted again
    assert scores[b"detached"] == later and scores[b"held"] > time.time() * 1000
    expires = await cast(Awaitable[int], redis.pexpiretime(quota))  # redis-py types it `int`
    assert expires == later  # the key lives as long as its last
    await store.quota_hold({"0123456789abcdef": [SessionId("ended")]}, 15)
    assert await redis.zscore(quota, "ended") is not None
    await redis.delete(quota)


async def test_status_shows_each_keys_counted_sessions(
    service_factory: ServiceFactory, redis: aioredis.Redis, redis_url: str
) -> None:
    """`streamscribe status` lists the keys with sessions counted now, most first, by key
    ID; a key whose sessions' time has passed is not listed; `--limit` cuts the list."""
    svc = await service_factory(api_keys=KEYS, max_sessions_per_key=3)
    open_ = [await open_as(svc.url, key) for key in ("k-one", "k-one", "k-two")]
    for ws in open_:
        await started(ws)
    await redis.zadd(keys.quota("feedfacefeedface"), {"f" * 32: 1})  # passed long ago
    report = await collect(redis, Query(url=redis_url))
    quotas = report.sections["quotas"]
    assert quotas == QuotasInfo(2, (QuotaRow(key_id("k-one"), 2), QuotaRow(key_id("k-two"), 1)))
    text = render(report)
    assert "quotas    2 API key(s) with sessions counted (max_sessions_per_key)" in text
    assert f"{key_id('k-one')}  2" in text
    assert json.loads(json.dumps(to_json(report)))["quotas"]["keys"] == 2
    cut = await collect(redis, Query(url=redis_url, limit=1))
    assert cut.sections["quotas"] == QuotasInfo(2, (QuotaRow(key_id("k-one"), 2),))
    assert "  ... and 1 more" in render(cut)
    for ws in open_:
        await ws.close()
    await redis.delete(keys.quota("feedfacefeedface"))


def test_status_says_when_nothing_is_counted() -> None:
    """With the limit off (or no session open) the section is one line saying so."""
    assert render_quotas(QuotasInfo(0, ()), 0) == [
        "quotas    no API key has sessions counted (max_sessions_per_key off or idle)"
    ]
