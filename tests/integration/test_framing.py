"""The gateway cuts incoming bytes into frames itself and hands whole binary messages to
the connection without websockets' parser (gateway/wsconn.py); every other frame goes to
websockets whole. Whatever way the bytes are split on the wire, what is stored must be
what was sent, in order, and websockets' own answers (1009) must still come."""

from __future__ import annotations

import asyncio
import itertools
import json

import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode

from gateway.wsconn import READ_BUFFER_BYTES, GatewayServerConnection
from tests.conftest import ServiceFactory
from tests.helpers import await_ack, drain, indexed_frame, open_ws, started, stored_order

pcm = indexed_frame


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
