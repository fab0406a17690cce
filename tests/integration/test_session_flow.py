"""A whole session through a real gateway, a real Valkey and a worker (null engine)."""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest
import redis.asyncio as aioredis

from shared import keys
from shared.keys import SessionId
from tests.conftest import ServiceFactory
from tests.helpers import drain, fixture, hget, open_ws, started

# On uvloop too: the loop `streamscribe gateway` and `worker` run on (tests/conftest.py).
pytestmark = pytest.mark.uvloop


async def test_session_started_acks_finals_and_closed(service_factory: ServiceFactory) -> None:
    """A new session gets session.started first, an ack covering every frame, gap-free finals,
    and session.closed with the totals, then close 1000."""
    svc = await service_factory()
    audio = fixture("s1.wav")
    frames = audio.frames(100)
    ws = await open_ws(svc.url)
    first = await started(ws)
    assert first["protocol"] == 1 and first["sample_rate"] == 16000
    assert len(first["session_id"]) == 32 and first["resume_token"]
    for frame in frames:
        await ws.send(frame)
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.code == 1000
    acks = [m["seq"] for m in out.of_type("ack")]
    assert acks == sorted(acks) and acks[-1] == len(frames) - 1
    assert [f["result_id"] for f in out.finals] == list(range(len(out.finals)))
    assert len(out.finals) >= 2  # the fixture has pauses between sentences
    closed = out.messages[-1]
    assert closed["type"] == "session.closed" and closed["reason"] == "client_closed"
    assert closed["final_results"] == len(out.finals)
    assert abs(closed["audio_seconds"] - audio.duration_s) < 0.01
    assert all(f["words"] for f in out.finals), "finals carry word timings"


async def test_tls_serves_wss(service_factory: ServiceFactory, client_ssl: ssl.SSLContext) -> None:
    """With a certificate the gateway speaks wss:// and the dev certificate verifies."""
    svc = await service_factory(tls=True)
    assert svc.url.startswith("wss://")
    ws = await open_ws(svc.url, ssl_ctx=client_ssl)
    await started(ws)
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.code == 1000 and out.messages[-1]["reason"] == "client_closed"


async def test_finalize_ends_the_utterance_now(service_factory: ServiceFactory) -> None:
    """`finalize` in the middle of speech produces a final before any silence arrives."""
    svc = await service_factory()
    frames = fixture("s1.wav").frames(100)
    ws = await open_ws(svc.url)
    await started(ws)
    for frame in frames[:20]:  # about 2 s: into the first sentence
        await ws.send(frame)
    await ws.send(json.dumps({"type": "finalize"}))
    while True:
        msg = json.loads(await ws.recv())
        if msg["type"] == "transcript" and msg["is_final"]:
            break
    assert msg["result_id"] == 0 and msg["end"] <= 2.0 + 1e-6
    await ws.close()


async def test_idle_timeout_closes_with_reason(service_factory: ServiceFactory) -> None:
    """No audio and no keepalive for idle_timeout_s: session.closed idle_timeout, close 1000."""
    svc = await service_factory(idle_timeout_s=0.6)
    ws = await open_ws(svc.url)
    await started(ws)
    out = await drain(ws)
    assert out.code == 1000
    assert out.messages[-1]["type"] == "session.closed"
    assert out.messages[-1]["reason"] == "idle_timeout"


async def test_keepalive_holds_off_idle_timeout(service_factory: ServiceFactory) -> None:
    """Keepalives keep an idle session open past idle_timeout_s."""
    svc = await service_factory(idle_timeout_s=0.8)
    ws = await open_ws(svc.url)
    await started(ws)
    for _ in range(6):  # 1.8 s of keepalives, each well inside the timeout
        await ws.send(json.dumps({"type": "keepalive"}))
        await asyncio.sleep(0.3)
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.messages[-1]["reason"] == "client_closed"


async def test_max_duration_closes_the_session(service_factory: ServiceFactory) -> None:
    """Audio beyond max_session_audio_s ends the session with reason max_duration."""
    svc = await service_factory(max_session_audio_s=1.0)
    ws = await open_ws(svc.url)
    await started(ws)
    for frame in fixture("s1.wav").frames(100)[:30]:
        await ws.send(frame)
    out = await drain(ws)
    assert out.code == 1000
    closed = out.messages[-1]
    assert closed["type"] == "session.closed" and closed["reason"] == "max_duration"
    assert 1.0 <= closed["audio_seconds"] <= 3.0


async def test_interim_results_false_sends_no_interims(service_factory: ServiceFactory) -> None:
    """interim_results=false: only finals, never an interim."""
    svc = await service_factory(interim_interval_s=0.3)
    ws = await open_ws(svc.url, "interim_results=false")
    await started(ws)
    for frame in fixture("s1.wav").frames(100):
        await ws.send(frame)
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    transcripts = out.of_type("transcript")
    assert transcripts and all(t["is_final"] for t in transcripts)


async def test_interims_precede_their_final(service_factory: ServiceFactory) -> None:
    """At real-time pace interims arrive, each carrying the result_id of the next final."""
    svc = await service_factory(interim_interval_s=0.5)
    ws = await open_ws(svc.url)
    await started(ws)
    for frame in fixture("s2.wav").frames(100):
        await ws.send(frame)
        await asyncio.sleep(0.05)  # twice real time: leaves room for interims
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    next_final = 0
    interims = 0
    for m in out.of_type("transcript"):
        assert m["result_id"] == next_final
        if m["is_final"]:
            next_final += 1
        else:
            interims += 1
    assert interims >= 1 and next_final >= 2


async def test_session_keys_expire_after_close(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """Once closed, every key of the session carries the configured TTL."""
    svc = await service_factory(session_ttl_s=120)
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    await ws.send(fixture("s1.wav").frames(100)[0])
    await ws.send(json.dumps({"type": "close_stream"}))
    await drain(ws)
    assert await hget(redis, keys.meta(sid), "state") == b"closed"
    for key in (keys.meta(sid), keys.results(sid), keys.audio(sid)):
        assert 0 < await redis.ttl(key) <= 120
    assert not await redis.exists(keys.lease(sid))
    assert await redis.xpending(keys.DISPATCH, keys.DISPATCH_GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }
