"""What a client sent before its connection ended is stored, though nobody is left to
acknowledge it; and what it sent before bad input is stored and acknowledged before the
error (`store_after_close_s`; docs/protocol.md, *Client vanished* and *Errors*).

The frames are written in one go with the end behind them (a close frame, the socket
cut, a bad frame), so the gateway reads them all before it has stored them: without
this, all but the first were dropped."""

from __future__ import annotations

import asyncio
import json
import ssl

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.frames import Close, CloseCode, Frame, Opcode

from gateway.wsconn import GatewayServerConnection
from shared import envelope, keys
from shared.config import Config
from shared.envelope import Control
from shared.errors import ConfigError
from shared.keys import SessionId
from tests.conftest import Service, ServiceFactory
from tests.helpers import (
    drain,
    gateway_connections,
    hget,
    indexed_frame,
    open_ws,
    started,
    stored_order,
)
from tests.integration.test_takeover import until

pytestmark = pytest.mark.uvloop

FRAMES = 15  # 48 KB of audio: one read, under the connection's 64 KiB read scratch


def raw(opcode: Opcode, data: bytes) -> bytes:
    return Frame(opcode, data).serialize(mask=True, extensions=[])


def audio(count: int) -> bytes:
    return b"".join(raw(Opcode.BINARY, indexed_frame(seq)) for seq in range(count))


CLOSE = raw(Opcode.CLOSE, Close(CloseCode.NORMAL_CLOSURE, "bye").serialize())


async def detached(redis: aioredis.Redis, sid: SessionId) -> None:
    """Until the gateway released the session (its handler has ended, storing included)."""
    await until(lambda: redis.zscore(keys.DETACHED, sid), "the gateway to release the session")


async def write_read(svc: Service, ws: ClientConnection, data: bytes) -> None:
    """Write `data` (at most one read's worth) and wait until the gateway has read it:
    its connection's `buffer_updated` is watched, not slept on."""
    [conn] = gateway_connections(svc)
    assert isinstance(conn, GatewayServerConnection)
    read = asyncio.Event()
    inner = conn.buffer_updated

    def buffer_updated(nbytes: int) -> None:
        inner(nbytes)
        read.set()

    conn.buffer_updated = buffer_updated  # type: ignore[method-assign]
    ws.transport.write(data)
    await asyncio.wait_for(read.wait(), 10)


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_frames_before_a_close_frame_are_all_stored(
    service_factory: ServiceFactory,
    redis: aioredis.Redis,
    client_ssl: ssl.SSLContext,
    tls: bool,
) -> None:
    """Audio and a close frame at once: the close handshake completes, and every frame
    sent before the close is stored, in order, though the client got no ack for them."""
    svc = await service_factory(with_worker=False, tls=tls)
    ws = await open_ws(svc.url, ssl_ctx=client_ssl if tls else None)
    sid = SessionId((await started(ws))["session_id"])
    ws.transport.write(audio(FRAMES) + CLOSE)
    out = await drain(ws)
    assert out.code == CloseCode.NORMAL_CLOSURE
    await detached(redis, sid)
    assert await stored_order(redis, sid) == list(range(FRAMES))
    assert int(await hget(redis, keys.meta(sid), "next_seq") or 0) == FRAMES
    acked = {m["seq"] for m in out.messages if m["type"] == "ack"}
    stored_after = svc.gateway.metrics.counters["audio_frames_stored_after_close_total"]
    assert stored_after == FRAMES - len(acked) > 0  # the rest were stored after the close


async def test_frames_before_a_cut_connection_are_all_stored(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """Audio, then the socket cut without a close frame (the client's process died):
    every frame that reached the gateway is stored."""
    svc = await service_factory(with_worker=False)
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    await write_read(svc, ws, audio(FRAMES))
    ws.transport.abort()
    await detached(redis, sid)
    assert await stored_order(redis, sid) == list(range(FRAMES))


async def test_frames_read_before_a_drain_are_stored(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """The gateway drains (1012) right after it read a burst of audio: what it had read
    is stored before it lets go of the session, so a resume on another gateway finds
    it (`next_seq`) and the client need not send it again."""
    svc = await service_factory(with_worker=False)
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    await write_read(svc, ws, audio(FRAMES))
    await svc.gateway.shutdown()
    out = await drain(ws)
    assert out.code == 1012
    assert await stored_order(redis, sid) == list(range(FRAMES))
    assert int(await hget(redis, keys.meta(sid), "next_seq") or 0) == FRAMES


async def test_close_stream_before_the_client_left_still_ends_the_session(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """A client that sends its audio and `close_stream` and goes without waiting for
    `session.closed`: the audio and the close are stored, so the session ends as the
    client asked (reason `client_closed`) instead of waiting out its resume grace, and a
    resume replays its finals and `session.closed`."""
    svc = await service_factory()
    ws = await open_ws(svc.url)
    hello = await started(ws)
    sid = SessionId(hello["session_id"])
    close_stream = raw(Opcode.TEXT, json.dumps({"type": "close_stream"}).encode())
    ws.transport.write(audio(FRAMES) + close_stream + CLOSE)
    await drain(ws)
    await detached(redis, sid)
    assert await stored_order(redis, sid) == [*range(FRAMES), "close"]
    [(_, last)] = await redis.xrevrange(keys.audio(sid), count=1)
    mark = envelope.decode_entry(last)
    assert isinstance(mark, Control) and mark.reason == "client_closed"
    again = await open_ws(svc.url, f"session_id={sid}")
    resume = {"session_id": sid, "resume_token": hello["resume_token"], "last_result_id": -1}
    await again.send(json.dumps({"type": "resume", **resume}))
    out = await asyncio.wait_for(drain(again), 30)
    assert out.code == CloseCode.NORMAL_CLOSURE
    closed = [m for m in out.messages if m["type"] == "session.closed"]
    assert [c["reason"] for c in closed] == ["client_closed"]


async def test_frames_before_bad_input_are_stored_and_acknowledged_before_the_error(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """Audio and then a frame that is not whole samples, at once: every frame before the
    bad one is stored and acknowledged, and only then come the error and its close, so
    the client's last ack says exactly where a resume starts."""
    svc = await service_factory(with_worker=False)
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    ws.transport.write(audio(FRAMES) + raw(Opcode.BINARY, b"\x00\x00\x00"))
    out = await drain(ws)
    assert out.code == 4400
    kinds = [m["type"] for m in out.messages]
    assert kinds[-1] == "error" and out.messages[-1]["code"] == "bad_request"
    assert set(kinds[:-1]) == {"ack"}  # every ack came before the error
    assert max(m["seq"] for m in out.messages[:-1]) == FRAMES - 1
    await detached(redis, sid)
    assert await stored_order(redis, sid) == list(range(FRAMES))
    assert svc.gateway.metrics.counters["audio_frames_stored_after_close_total"] == 0


async def test_frames_before_a_frame_over_the_limit_are_stored(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """A frame over `max_frame_bytes` is refused by the websockets library, which closes
    at once (1009): the frames before it are stored all the same."""
    svc = await service_factory(with_worker=False, max_frame_bytes=8000)
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    ws.transport.write(audio(FRAMES) + raw(Opcode.BINARY, b"\x00" * 8002))
    out = await drain(ws)
    assert out.code == 1009
    await detached(redis, sid)
    assert await stored_order(redis, sid) == list(range(FRAMES))


async def test_zero_drops_what_was_not_stored_when_the_client_left(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """`store_after_close_s` 0: the frames still queued when the connection ended are
    dropped (at most the call already in flight is stored), as before the setting; a
    negative or non-finite value is refused, naming the flag."""
    svc = await service_factory(with_worker=False, store_after_close_s=0)
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    ws.transport.write(audio(FRAMES) + CLOSE)
    await drain(ws)
    await detached(redis, sid)
    stored = await stored_order(redis, sid)
    assert stored == list(range(len(stored))) and len(stored) < FRAMES
    assert svc.gateway.metrics.counters["audio_frames_stored_after_close_total"] <= len(stored)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError) as info:
            Config(store_after_close_s=bad)
        assert "--store-after-close-s" in str(info.value)
