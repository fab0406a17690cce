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
from collections.abc import Iterable

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.frames import Close, CloseCode, Frame, Opcode

from gateway.wsconn import (
    READ_BUFFER_BYTES,
    BufferedReads,
    GatewayServerConnection,
    thread_scratch,
)
from tests.conftest import ServiceFactory
from tests.helpers import (
    await_ack,
    drain,
    gateway_connections,
    indexed_frame,
    open_ws,
    started,
    stored_order,
)

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
            self.grown += conn._buf is not None and len(conn._buf) > READ_BUFFER_BYTES
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
    [conn] = gateway_connections(svc)
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
    assert wire.grown > 0  # the large message grew the own buffer while it arrived...
    assert conn._buf is None and conn._filled == 0  # ...which went once it was whole
    await ws.close()


async def test_frame_over_the_limit_arriving_in_pieces_closes_1009(
    service_factory: ServiceFactory,
) -> None:
    svc = await service_factory(max_frame_bytes=4000)
    ws = await open_ws(svc.url)
    await started(ws)
    [conn] = gateway_connections(svc)
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
    [conn] = gateway_connections(svc)
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
    [conn] = gateway_connections(svc)
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
    [conn] = gateway_connections(svc)
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


def connection_of(
    svc_connections: Iterable[ServerConnection], ws: ClientConnection
) -> GatewayServerConnection:
    """The gateway's side of the client connection `ws`."""
    [conn] = [c for c in svc_connections if c.remote_address == ws.local_address]
    assert isinstance(conn, GatewayServerConnection)
    return conn


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_connections_take_turns_at_the_scratch_buffer(
    service_factory: ServiceFactory,
    redis: aioredis.Redis,
    client_ssl: ssl.SSLContext,
    tls: bool,
) -> None:
    """Two connections read into the loop's one scratch buffer in turn, each frame's
    start that arrived without its end kept in a buffer of the connection's own, which
    goes once the frame is whole: reads of one between the pieces of the other's frames
    change nothing of what either stores, and neither holds a buffer when idle."""
    svc = await service_factory(with_worker=False, tls=tls)
    ssl_ctx = client_ssl if tls else None
    ws_a, ws_b = await open_ws(svc.url, ssl_ctx=ssl_ctx), await open_ws(svc.url, ssl_ctx=ssl_ctx)
    sid_a, sid_b = (await started(ws_a))["session_id"], (await started(ws_b))["session_id"]
    conns = gateway_connections(svc)
    a, b = connection_of(conns, ws_a), connection_of(conns, ws_b)
    assert a._scratch is b._scratch is thread_scratch()
    assert a._buf is None and b._buf is None  # nothing held by an idle connection
    wire_a, wire_b = Wire(ws_a, a), Wire(ws_b, b)
    # B's frames twice as long as A's, so that bytes of one stored as the other's fail.
    data_a = b"".join(raw(Opcode.BINARY, pcm(seq)) for seq in range(6))
    data_b = b"".join(raw(Opcode.BINARY, pcm(seq) * 2) for seq in range(6))

    def pieces(data: bytes) -> list[bytes]:
        frame = len(data) // 6
        cuts = itertools.accumulate([frame // 2, frame, frame + 5, 2 * frame, 3])
        bounds = [0, *cuts, len(data)]
        return [data[i:j] for i, j in itertools.pairwise(bounds)]

    kept = 0
    for piece_a, piece_b in zip(pieces(data_a), pieces(data_b), strict=True):
        await wire_a.write(piece_a, [len(piece_a)])  # one read of A, then one of B
        kept += a._buf is not None and a._filled > 0
        await wire_b.write(piece_b, [len(piece_b)])
        kept += b._buf is not None and b._filled > 0
    await await_ack(ws_a, 5)
    await await_ack(ws_b, 5)
    assert await stored_order(redis, sid_a) == list(range(6))
    assert await stored_order(redis, sid_b, {seq: 2 for seq in range(6)}) == list(range(6))
    assert kept > 0  # frames' starts were kept between reads...
    assert a._buf is None and b._buf is None  # ...and no buffer once they were whole
    assert a.direct == 6 and b.direct == 6
    await ws_a.close()
    await ws_b.close()


async def test_a_read_that_brings_nothing_leaves_the_scratch_to_the_next(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """A transport may ask for a buffer and read nothing into it (a TLS record not yet
    whole decrypts to nothing): the scratch it was lent serves the next connection's read
    as usual, and its own next read too."""
    svc = await service_factory(with_worker=False)
    ws_a, ws_b = await open_ws(svc.url), await open_ws(svc.url)
    sid_a, sid_b = (await started(ws_a))["session_id"], (await started(ws_b))["session_id"]
    conns = gateway_connections(svc)
    a, b = connection_of(conns, ws_a), connection_of(conns, ws_b)
    scratch = thread_scratch()
    assert a.get_buffer(-1) is scratch.view  # lent to A, and no update follows
    for seq in range(3):
        await ws_b.send(pcm(seq))
    await await_ack(ws_b, 2)
    assert scratch.owner is None  # B borrowed it since, and gave it back
    for seq in range(3):
        await ws_a.send(pcm(seq))
    await await_ack(ws_a, 2)
    assert await stored_order(redis, sid_a) == [0, 1, 2]
    assert await stored_order(redis, sid_b) == [0, 1, 2]
    assert a._buf is None and b._buf is None
    await ws_a.close()
    await ws_b.close()


async def test_no_read_goes_into_the_scratch_while_it_is_being_framed(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """While a read in the scratch is being framed (a transport that closes then reads
    what it still holds), a read of any connection goes into that connection's own
    buffer, not over the bytes being framed."""
    svc = await service_factory(with_worker=False)
    ws_a, ws_b = await open_ws(svc.url), await open_ws(svc.url)
    sid_a = (await started(ws_a))["session_id"]
    await started(ws_b)
    conns = gateway_connections(svc)
    a, b = connection_of(conns, ws_a), connection_of(conns, ws_b)
    scratch = thread_scratch()
    hook = a.on_binary
    assert hook is not None
    offered: list[bool] = []

    def take(frame: bytes) -> bool:
        for conn in (a, b):  # reads that framing sets off, on this and another
            buf = conn.get_buffer(-1)
            offered.append(buf.obj is scratch.view.obj)
            conn.buffer_updated(0)
        return hook(frame)

    a.on_binary = take
    for seq in range(4):
        await ws_a.send(pcm(seq))
    await await_ack(ws_a, 3)
    assert await stored_order(redis, sid_a) == [0, 1, 2, 3]
    assert offered and not any(offered)
    assert not scratch.busy and scratch.owner is None
    assert a._buf is None and b._buf is None
    await ws_a.close()
    await ws_b.close()


@pytest.mark.parametrize("tls", [False, True], ids=["ws", "wss"])
async def test_frames_behind_a_close_frame_in_the_same_read_are_dropped_cleanly(
    service_factory: ServiceFactory,
    redis: aioredis.Redis,
    client_ssl: ssl.SSLContext,
    tls: bool,
) -> None:
    """Audio, a close frame and 100 KB more audio, written at once: the close handshake
    completes, and no frame after the close is stored (those before it are, in order,
    once the handler has stored what it had read: tests/integration/
    test_store_after_close.py). Over
    TLS the gateway's close reads what the SSL layer still holds from inside the framing
    of the scratch (a read that must not go into the scratch)."""
    svc = await service_factory(with_worker=False, tls=tls)
    ws = await open_ws(svc.url, ssl_ctx=client_ssl if tls else None)
    sid = (await started(ws))["session_id"]
    [conn] = gateway_connections(svc)
    assert isinstance(conn, GatewayServerConnection)
    into_scratch_while_framing: list[bool] = []
    inner = conn.get_buffer

    def get_buffer(sizehint: int) -> memoryview:
        busy = conn._scratch.busy
        buf = inner(sizehint)
        if busy:
            into_scratch_while_framing.append(buf.obj is conn._scratch.view.obj)
        return buf

    conn.get_buffer = get_buffer  # type: ignore[method-assign]
    before = b"".join(raw(Opcode.BINARY, pcm(seq)) for seq in range(3))
    close = raw(Opcode.CLOSE, Close(CloseCode.NORMAL_CLOSURE, "bye").serialize())
    after = b"".join(raw(Opcode.BINARY, pcm(seq)) for seq in range(3, 35))
    assert len(after) > 100_000
    ws.transport.write(before + close + after)
    out = await drain(ws)
    assert out.code == CloseCode.NORMAL_CLOSURE
    stored = await stored_order(redis, sid)
    assert stored == [0, 1, 2][: len(stored)]
    # The standard loop's SSL layer reads from inside the framing here (uvloop's did not
    # when this test was written): those reads went to the connection's own buffer.
    assert not any(into_scratch_while_framing)
