"""Audio used per API key (with `api_keys` set): what each key stored, summed across the
fleet per usage window (`ss:usage:<key_id>:<window>`), and `audio_budget_s`: past it a
frame gets `rate_limited` and 4429 with the frames before it stored, a new session of
the key is refused, a resume is not, and other keys are not affected."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from gateway.connection import key_id
from gateway.server import Gateway
from shared import keys
from shared.client import SessionError, StreamingSession
from shared.config import Config
from shared.envelope import Transcript
from shared.errors import ConfigError
from shared.status import Query, collect, render, to_json
from shared.status_model import UsageInfo, UsageRow
from shared.status_render import render_usage
from shared.wavfile import WavAudio
from tests.conftest import ServiceFactory
from tests.helpers import Outcome, await_ack, drain, fixture, hgetall, open_ws, started

KEYS = ("k-one", "k-two")
FRAME = b"\x00\x00" * 1600  # 100 ms at 16 kHz
FRAME_US = 100_000


async def open_as(url: str, api_key: str, query: str = "") -> ClientConnection:
    return await open_ws(url, query, headers={"Authorization": f"Bearer {api_key}"})


def usage_of(gateway: Gateway, api_key: str) -> str:
    """The key's usage hash for the current window."""
    usage = gateway.ctx.usage
    assert usage is not None
    return keys.usage(key_id(api_key), usage.window())


async def fields(redis: aioredis.Redis, name: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in (await hgetall(redis, name)).items()}


async def send_until_closed(ws: ClientConnection, frames: int) -> Outcome:
    """Send up to `frames` frames as fast as the socket takes them, then read what the
    server says until it closes."""
    try:
        for _ in range(frames):
            await ws.send(FRAME)
        await ws.send(json.dumps({"type": "close_stream"}))
    except ConnectionClosed:
        pass
    return await drain(ws)


def last_ack(out: Outcome) -> int:
    return max((m["seq"] for m in out.of_type("ack")), default=-1)


async def resume(url: str, api_key: str, first: dict[str, object]) -> ClientConnection:
    ws = await open_as(url, api_key, f"session_id={first['session_id']}")
    await ws.send(
        json.dumps(
            {
                "type": "resume",
                "session_id": first["session_id"],
                "resume_token": first["resume_token"],
                "last_result_id": -1,
            }
        )
    )
    return ws


async def test_each_keys_stored_audio_is_counted_once_across_a_resume(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """Without a budget the audio is metered all the same: a session that drops after 5
    frames and resumes for 3 more counts 0.8 s, under this gateway's field, in a hash named
    by the key's ID (never the key) that outlives the window; a key that sent nothing
    has no hash."""
    svc = await service_factory(api_keys=KEYS)
    ws = await open_as(svc.url, "k-one")
    first = await started(ws)
    for _ in range(5):
        await ws.send(FRAME)
    await await_ack(ws, 4)
    await ws.close()  # dropped: resumable
    back = await resume(svc.url, "k-one", first)
    assert json.loads(await back.recv())["next_seq"] == 5
    out = await send_until_closed(back, 3)
    assert (out.code, last_ack(out)) == (1000, 7)
    idle = await open_as(svc.url, "k-two")
    await started(idle)
    await svc.gateway.ctx.sync_usage()
    name = usage_of(svc.gateway, "k-one")
    assert await fields(redis, name) == {svc.gateway.gateway_id: 8 * FRAME_US}
    assert 86400 < await redis.ttl(name) <= 2 * 86400
    assert not await redis.exists(usage_of(svc.gateway, "k-two"))
    assert not [k for k in await redis.keys(f"{keys.PREFIX}:usage:*") if b"k-" in k]
    await idle.close()


async def test_the_frame_past_the_budget_is_refused_and_the_ones_before_are_kept(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """A budget of 1 s takes exactly ten 100 ms frames: the eleventh gets `rate_limited`
    and 4429 with the reason, after all ten were acked. The session resumes (a resume is
    never refused) at seq 10, but its next frame is refused too, as is a new session of
    the key; another key streams as usual."""
    svc = await service_factory(api_keys=KEYS, audio_budget_s=1.0)
    ws = await open_as(svc.url, "k-one")
    first = await started(ws)
    out = await send_until_closed(ws, 15)
    (error,) = out.of_type("error")
    assert (out.code, error["code"], last_ack(out)) == (4429, "rate_limited", 9)
    assert "audio budget of 1 s per 86400 s (audio_budget_s)" in error["message"]
    assert "renews" in out.reason
    back = await resume(svc.url, "k-one", first)
    assert json.loads(await back.recv())["next_seq"] == 10
    again = await send_until_closed(back, 1)
    assert (again.code, again.of_type("error")[0]["code"]) == (4429, "rate_limited")
    refused = await drain(await open_as(svc.url, "k-one"))
    assert refused.code == 4429 and "audio_budget_s" in refused.reason
    assert not refused.of_type("session.started")
    other = await open_as(svc.url, "k-two")
    await started(other)
    ok = await send_until_closed(other, 10)
    assert (ok.code, last_ack(ok)) == (1000, 9)
    await svc.gateway.ctx.sync_usage()
    assert await fields(redis, usage_of(svc.gateway, "k-one")) == {svc.gateway.gateway_id: 10**6}
    assert svc.gateway.metrics.counters["audio_over_budget_total"] == 3


async def test_gateways_share_a_keys_budget_through_redis(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """0.6 s stored through one gateway leaves 0.4 s for the same key on another: the
    second gateway reads the key's fleet total when the session starts."""
    a = await service_factory(api_keys=KEYS, audio_budget_s=1.0)
    b = await service_factory(api_keys=KEYS, audio_budget_s=1.0, with_worker=False)
    ws = await open_as(a.url, "k-one")
    await started(ws)
    for _ in range(6):
        await ws.send(FRAME)
    await await_ack(ws, 5)
    await a.gateway.ctx.sync_usage()
    there = await open_as(b.url, "k-one")
    await started(there)
    out = await send_until_closed(there, 10)
    assert (out.code, last_ack(out)) == (4429, 3)
    await b.gateway.ctx.sync_usage()
    both = await fields(redis, usage_of(a.gateway, "k-one"))
    assert both == {a.gateway.gateway_id: 600_000, b.gateway.gateway_id: 400_000}
    await ws.close()


async def test_status_shows_each_keys_audio_per_window(
    service_factory: ServiceFactory, redis: aioredis.Redis, redis_url: str
) -> None:
    """`streamscribe status` lists the usage hashes, latest window first, then most
    audio; `--limit` cuts the list."""
    svc = await service_factory(api_keys=KEYS)
    for api_key, frames in (("k-one", 3), ("k-two", 5)):
        ws = await open_as(svc.url, api_key)
        await started(ws)
        assert (await send_until_closed(ws, frames)).code == 1000
    await svc.gateway.ctx.sync_usage()
    old = keys.usage("feedfacefeedface", 86400)
    await cast(
        Awaitable[int], redis.hset(old, mapping={"gw-gone": 2 * 10**6, "gw-other": 5 * 10**5})
    )
    window = usage_of(svc.gateway, "k-one").rsplit(":", 1)[1]
    report = await collect(redis, Query(url=redis_url))
    assert report.sections["usage"] == UsageInfo(
        3,
        (
            UsageRow(key_id("k-two"), int(window), 0.5, 1),
            UsageRow(key_id("k-one"), int(window), 0.3, 1),
            UsageRow("feedfacefeedface", 86400, 2.5, 2),
        ),
    )
    text = render(report)
    assert "usage     audio stored per API key and window (3 found)" in text
    assert "feedfacefeedface  1970-01-02 00:00" in text
    assert json.loads(json.dumps(to_json(report)))["usage"]["hashes"] == 3
    cut = await collect(redis, Query(url=redis_url, limit=1))
    assert "  ... and 2 more" in render(cut)
    await redis.delete(old)


def test_status_says_when_nothing_is_metered() -> None:
    assert render_usage(UsageInfo(0, ()), 0) == [
        "usage     no API key has audio stored (no api_keys, or none used yet)"
    ]


def test_budget_and_window_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"audio-budget-s.*needs --api-key"):
        Config(audio_budget_s=60)
    with pytest.raises(ConfigError, match=r"audio-budget-s.*>= 0"):
        Config(api_keys=KEYS, audio_budget_s=-1)
    with pytest.raises(ConfigError, match=r"audio-budget-s.*>= 0"):
        Config(api_keys=KEYS, audio_budget_s=float("inf"))
    with pytest.raises(ConfigError, match=r"usage-window-s.*>= 60"):
        Config(usage_window_s=59)
    assert Config(api_keys=KEYS, audio_budget_s=0.1, usage_window_s=60).usage_window_s == 60


async def _finals_until_failure(
    url: str, api_key: str, audio: WavAudio, **options: Any
) -> tuple[list[Transcript], SessionError]:
    """Stream `audio` with the SDK; the finals it delivered and the error it ended with."""
    finals: list[Transcript] = []
    async with StreamingSession(url, api_key=api_key, **options) as session:

        async def send() -> None:
            with contextlib.suppress(SessionError):  # the session failed: results() says why
                for frame in audio.frames(100):
                    await session.send_audio(frame)
                await session.close_stream()

        sender = asyncio.create_task(send())
        with pytest.raises(SessionError) as caught:
            async for result in session.results():
                if isinstance(result, Transcript) and result.is_final:
                    finals.append(result)
        await sender
    return finals, caught.value


async def test_the_sdk_delivers_the_finals_of_the_audio_kept_before_a_4429(
    service_factory: ServiceFactory,
) -> None:
    """The budget cuts s1.wav at 2 s: the SDK resumes without sending more, closes the
    stream and delivers the finals of those 2 s before the error, whose `closed` summary
    says what was kept. With collecting turned off the same cut delivers nothing."""
    svc = await service_factory(api_keys=KEYS, audio_budget_s=2.0)
    audio = fixture("s1.wav")
    finals, error = await _finals_until_failure(svc.url, "k-one", audio)
    assert (error.close_code, error.code) == (4429, "rate_limited")
    assert error.closed is not None and error.closed.audio_seconds == 2.0
    assert finals and error.closed.final_results == len(finals)
    assert finals[-1].end <= 2.0
    finals, error = await _finals_until_failure(svc.url, "k-two", audio, collect_after_limit_s=0)
    assert (error.close_code, finals, error.closed) == (4429, [], None)
