"""Small helpers for tests that speak the protocol over a real WebSocket."""

from __future__ import annotations

import json
import ssl
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from shared import envelope, keys
from shared.envelope import AudioChunk, Control, Envelope
from shared.keys import SessionId
from shared.wavfile import WavAudio, read_wav
from tests.conftest import FIXTURES, Service


@dataclass
class Outcome:
    messages: list[dict[str, Any]] = field(default_factory=list)
    code: int | None = None
    reason: str = ""

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == kind]

    @property
    def finals(self) -> list[dict[str, Any]]:
        return [m for m in self.of_type("transcript") if m["is_final"]]

    @property
    def text(self) -> str:
        return " ".join(m["text"] for m in self.finals)


async def open_ws(
    url: str,
    query: str = "",
    *,
    ssl_ctx: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> ClientConnection:
    full = f"{url}?{query}" if query else url
    return await connect(
        full, ssl=ssl_ctx, additional_headers=headers, compression=None, max_size=2**22
    )


async def drain(ws: ClientConnection) -> Outcome:
    """Read every message until the server closes; record the close code and reason."""
    out = Outcome()
    try:
        async for raw in ws:
            assert isinstance(raw, str), "the server only sends text frames"
            out.messages.append(json.loads(raw))
    except ConnectionClosed:
        pass
    out.code = ws.close_code
    out.reason = ws.close_reason or ""
    return out


async def started(ws: ClientConnection) -> dict[str, Any]:
    msg = json.loads(await ws.recv())
    assert msg["type"] == "session.started", msg
    return dict(msg)


# redis-py types a command for its sync and its asyncio client at once (`Awaitable[T] | T`),
# and its hash reads as if responses were decoded (`str`). The tests' clients are asyncio
# ones that return bytes: these name that type, as shared/store.py does with `cast`.


def hget(redis: aioredis.Redis, name: str, key: str) -> Awaitable[bytes | None]:
    """`redis.hget(name, key)`, typed as the tests' clients return it."""
    return cast(Awaitable[bytes | None], redis.hget(name, key))


def hgetall(redis: aioredis.Redis, name: str) -> Awaitable[dict[bytes, bytes]]:
    """`redis.hgetall(name)`, typed as the tests' clients return it."""
    return cast(Awaitable[dict[bytes, bytes]], redis.hgetall(name))


def audio_chunk(item: Envelope) -> AudioChunk:
    """`item`, where the test expects audio (not a control mark or another envelope)."""
    assert isinstance(item, AudioChunk), item
    return item


def gateway_connections(svc: Service) -> set[ServerConnection]:
    """The open WebSocket connections of a started gateway."""
    server = svc.gateway._server
    assert server is not None, "the gateway has not started"
    return server.connections


def fixture(name: str) -> WavAudio:
    return read_wav(FIXTURES / name)


def reference(name: str) -> str:
    return (FIXTURES / f"{name}.txt").read_text().strip()


async def stream_session(url: str, audio: WavAudio, frame_ms: int = 100) -> Outcome:
    """A new session that sends all of `audio` as fast as the socket takes it, then
    `close_stream`, and reads everything until the server closes."""
    ws = await open_ws(url)
    await started(ws)
    for frame in audio.frames(frame_ms):
        await ws.send(frame)
    await ws.send(json.dumps({"type": "close_stream"}))
    return await drain(ws)


def indexed_frame(i: int) -> bytes:
    """100 ms of 16 kHz s16le audio with its index in every sample."""
    return i.to_bytes(2, "little") * 1600


async def await_ack(ws: ClientConnection, seq: int) -> None:
    """Read until an ack covers `seq`; only acks (and `queued`) may come meanwhile."""
    acked = -1
    while acked < seq:
        msg = json.loads(await ws.recv())
        assert msg["type"] in ("ack", "queued"), msg
        if msg["type"] == "ack":
            acked = max(acked, msg["seq"])


async def stored_order(
    redis: aioredis.Redis, sid: str, lengths: Mapping[int, int] | None = None
) -> list[object]:
    """A session's audio stream as stored: each frame's seq (its samples checked against
    `indexed_frame`, repeated `lengths[seq]` times where given) and each control mark's
    kind, in stream order."""
    stored: list[object] = []
    for _, fields in await redis.xrange(keys.audio(SessionId(sid))):
        item = envelope.decode_entry(fields)
        if isinstance(item, AudioChunk):
            assert item.pcm == indexed_frame(item.seq) * (lengths or {}).get(item.seq, 1)
            stored.append(item.seq)
        else:
            assert isinstance(item, Control)
            stored.append(item.kind)
    return stored
