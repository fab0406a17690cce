"""The gateway cuts incoming bytes into frames itself and hands whole binary messages to
the connection without websockets' parser (gateway/wsconn.py); every other frame goes to
websockets whole. Whatever way the bytes are split on the wire, what is stored must be
what was sent, in order, and websockets' own answers (1009) must still come."""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import ssl
import weakref

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode

from gateway.wsconn import READ_BUFFER_BYTES, BufferedReads, GatewayServerConnection
from tests.conftest import ServiceFactory
from tests.helpers import await_ack, drain, indexed_frame, open_ws, started, stored_order

pcm = indexed_frame

# On uvloop too: the loop the gateway runs on, whose transports read into the
# connection's buffer only through gateway.wsconn.BufferedReads.
pytestmark = pytest.mark.uvloop


def raw(opcode: Opcode, data: bytes, fin: bool = True) -> bytes:
    return Frame(opcode, data, fin).serialize(mask=True, extensions=[])


class Wire:
    """Writes raw client frames in pieces, each piece read by the server before the next
    is written (the server's `buffer_updated` is watched, not slept on)."""

    def __init__(self, ws: ClientConnection, conn: GatewayServerConnection) -> None:
        self.ws, self.conn = ws, conn
        self.read = asyncio.Event()
        self.partial = 0  # reads after which the server held the start of a frame
        self.grown = 0  # reads into a buffer grown past its usual size
        inner = conn.buffer_updated

        def buffer_updated(nbytes: int) -> None:
            self.grown += len(conn._buf) > READ_BUFFER_BYTES
            inner(nbytes)
            self.partial += bool(conn._filled)
            self.read.set()

        conn.buffer_updated = buffer_updated  # type: ignore[method-assign]

    async def write(self, data: bytes, sizes: list[int]) -> None:
        pos = 0
        for size in itertools.cycle(sizes):
            if pos >= len(data):
                return
            self.read.clear()
            self.ws.transport.write(data[pos : pos + size])
            pos += size
            await asyncio.wait_for(self.read.wait(), 10)


async def test_frames_split_anyhow_are_stored_in_order(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    svc = await service_factory(with_worker=False)
    ws = await open_ws(svc.url)
    sid = (await started(ws))["session_id"]
    [conn] = svc.gateway._server.connections
    assert isinstance(conn, GatewayServerConnection)
    wire = Wire(ws, conn)
    sent: list[object] = []
    out: list[bytes] = []
    seq = 0

    def audio(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            out.append(raw(Opcode.BINARY, pcm(seq)))
            sent.append(seq)
            seq += 1

    audio(5)
    out.append(raw(Opcode.PING, b"p1"))  # a control frame between audio frames
    audio(3)
    out.append(raw(Opcode.TEXT, json.dumps({"type": "finalize"}).encode()))
    sent.append("finalize")
    audio(2)
    whole = pcm(seq)  # one audio message in three fragments
    out += [
        raw(Opcode.BINARY, whole[:1000], fin=False),
        raw(Opcode.CONT, whole[1000:1001], fin=False),
        raw(Opcode.CONT, whole[1001:], fin=True),
    ]
    sent.append(seq)
    seq += 1
    audio(4)
    out.append(raw(Opcode.TEXT, json.dumps({"type": "keepalive"}).encode()))
    audio(6)
    # 1.2 s in one message: more than the connection's read buffer holds.
    out.append(raw(Opcode.BINARY, pcm(seq) * 12))
    long_one = {seq: 12}
    sent.append(seq)
    seq += 1
    audio(2)
    # Pieces of 1 byte up to several frames, so headers, masks and payloads are all cut.
    await wire.write(b"".join(out), [1, 2, 3, 7, 100, 3205, 9000, 5, 1600, 64000])
    await await_ack(ws, seq - 1)
    stored = await stored_order(redis, sid, long_one)
    assert stored == sent
    assert conn.direct > 0  # whole binary messages taken here
    assert conn.slow_frames >= 7  # ping, 2 texts, 3 fragments, and frames behind them
    assert wire.partial > 0  # frames did arrive in pieces
    assert wire.grown > 0  # the large message grew the read buffer while it arrived...
    assert len(conn._buf) == READ_BUFFER_BYTES  # ...and it shrank back after
    await ws.close()


async def test_frame_over_the_limit_arriving_in_pieces_closes_1009(
    service_factory: ServiceFactory,
) -> None:
    svc = await service_factory(max_frame_bytes=4000)
    ws = await open_ws(svc.url)
    await started(ws)
    [conn] = svc.gateway._server.connections
    assert isinstance(conn, GatewayServerConnection)
    wire = Wire(ws, conn)
    await wire.write(raw(Opcode.BINARY, b"\x00" * 4000), [2, 1, 4500])  # at the limit
    assert json.loads(await ws.recv()) == {"type": "ack", "seq": 0}
    # Its header in pieces, and only part of its payload: refused at the header.
    await wire.write(raw(Opcode.BINARY, b"\x00" * 4002)[:300], [2, 1, 1, 500])
    out = await drain(ws)
    assert out.code == 1009
    [error] = out.of_type("error")
    assert error["code"] == "frame_too_large"
    assert "max_frame_bytes (4000 bytes)" in error["message"]


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_the_transport_reads_into_the_connections_buffer(
    service_factory: ServiceFactory,
    redis: aioredis.Redis,
    client_ssl: ssl.SSLContext,
    monkeypatch: pytest.MonkeyPatch,
    tls: bool,
) -> None:
    """On either loop, over TCP and over TLS, the transport reads through the connection's
    `BufferedReads` (uvloop would call websockets' `data_received`, and its SSL layer take
    a 256 KiB block per read, if the transport's protocol were the connection itself), and
    every audio frame is taken by the framing, stored in order."""
    reads: list[int] = []
    inner = BufferedReads.buffer_updated

    def counted(self: BufferedReads, nbytes: int) -> None:
        reads.append(nbytes)
        inner(self, nbytes)

    monkeypatch.setattr(BufferedReads, "buffer_updated", counted)
    svc = await service_factory(with_worker=False, tls=tls)
    ws = await open_ws(svc.url, ssl_ctx=client_ssl if tls else None)
    sid = (await started(ws))["session_id"]
    [conn] = svc.gateway._server.connections
    assert isinstance(conn, GatewayServerConnection)
    assert isinstance(conn.transport.get_protocol(), BufferedReads)
    for seq in range(20):
        await ws.send(pcm(seq))
    await await_ack(ws, 19)
    assert await stored_order(redis, sid) == list(range(20))
    assert sum(reads) > 20 * len(pcm(0))  # the handshake and every frame came this way
    assert conn.direct == 20 and conn.slow_frames == 0
    await ws.close()


async def test_bytes_given_to_data_received_are_framed_the_same(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """A transport that calls `data_received` (not reading into `get_buffer`) has its bytes
    copied into the read buffer and framed there: split frames, and more bytes at once
    than the buffer holds, are stored whole and in order."""
    svc = await service_factory(with_worker=False)
    ws = await open_ws(svc.url)
    sid = (await started(ws))["session_id"]
    [conn] = svc.gateway._server.connections
    assert isinstance(conn, GatewayServerConnection)
    data = b"".join(raw(Opcode.BINARY, pcm(seq)) for seq in range(6))  # > READ_BUFFER_BYTES
    assert len(data) > READ_BUFFER_BYTES
    conn.data_received(data[:5])  # a header cut short
    conn.data_received(data[5:])
    await await_ack(ws, 5)
    assert await stored_order(redis, sid) == list(range(6))
    assert conn.direct == 6 and conn._filled == 0
    await ws.close()


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_a_closed_connection_is_freed_without_the_cycle_collector(
    service_factory: ServiceFactory, client_ssl: ssl.SSLContext, tls: bool
) -> None:
    """Once closed, a connection (with its SSL objects and buffers) is freed by reference
    counting: the transport's `BufferedReads` lets go of it. Held in a cycle, 200 closed
    TLS connections kept 20 MiB until a full collection, which the gateway makes rare."""
    svc = await service_factory(with_worker=False, tls=tls)
    ws = await open_ws(svc.url, ssl_ctx=client_ssl if tls else None)
    await started(ws)
    [conn] = svc.gateway._server.connections
    ref = weakref.ref(conn)
    freed = asyncio.Event()
    weakref.finalize(conn, freed.set)
    del conn
    gc.disable()
    try:
        await ws.close()
        try:  # the handler and the transport finish closing, then the last reference goes
            await asyncio.wait_for(freed.wait(), 10)
        except TimeoutError:
            holders = [type(r).__name__ for r in gc.get_referrers(ref())]
            raise AssertionError(f"the closed connection is still held by {holders}") from None
    finally:
        gc.enable()
