"""Batched ingest against a real Valkey and a real gateway: one pipeline of INGEST calls
keeps each session's order, idempotence, gap refusal and errors exactly as one call per
session did."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from websockets.asyncio.client import ClientConnection

from shared import envelope, keys
from shared.envelope import AudioChunk
from shared.keys import SessionId
from shared.protocol import SessionParams
from shared.store import IngestResult, SeqGap, SessionGone, Store
from tests.conftest import ServiceFactory
from tests.helpers import audio_chunk, drain, hget, open_ws, started

FRAME_BYTES = 3200  # 100 ms of 16 kHz s16le mono


def sid(n: int) -> SessionId:
    return SessionId(f"{n:032x}")


def chunk(seq: int, tag: int = 0) -> AudioChunk:
    return AudioChunk(seq, bytes([tag % 256, seq % 256]) * 4)


async def stored_seqs(redis: aioredis.Redis, session: SessionId) -> list[int]:
    entries = await redis.xrange(keys.audio(session))
    return [audio_chunk(envelope.decode_entry(fields)).seq for _, fields in entries]


async def test_ingest_many_gives_each_call_what_ingest_would(redis: aioredis.Redis) -> None:
    """One pipeline over several sessions: stored, duplicate-skipping, gap, unknown and
    closed sessions each get the result or error that a lone `ingest` gets."""
    store = Store(redis)
    for n in range(4):
        await store.create_session(sid(n), SessionParams(), "tokenhash", "conn")
    await store.ingest(sid(1), [chunk(0), chunk(1)])
    await cast(Awaitable[int], redis.hset(keys.meta(sid(3)), "state", "closed"))
    out = await store.ingest_many(
        [
            (sid(0), [chunk(0), chunk(1), chunk(2)]),
            (sid(1), [chunk(1), chunk(2)]),  # seq 1 already stored: skipped
            (sid(2), [chunk(4)]),  # nothing stored yet: a gap
            (sid(3), [chunk(0)]),
            (sid(9), [chunk(0)]),  # never created
        ]
    )
    assert out[0] == IngestResult(next_seq=3, stored=3, audio_bytes=3 * 8)
    assert out[1] == IngestResult(next_seq=3, stored=1, audio_bytes=3 * 8)
    assert isinstance(out[2], SeqGap) and out[2].next_seq == 0
    assert isinstance(out[3], SessionGone) and out[3].reason == "not_open"
    assert isinstance(out[4], SessionGone) and out[4].reason == "unknown"
    assert await stored_seqs(redis, sid(0)) == [0, 1, 2]
    assert await stored_seqs(redis, sid(1)) == [0, 1, 2]
    assert await stored_seqs(redis, sid(2)) == []


async def test_ingest_many_reloads_a_flushed_script(redis: aioredis.Redis) -> None:
    """After the server lost its script cache (NOSCRIPT), the calls are sent again once
    the script is loaded, and each frame is stored exactly once."""
    store = Store(redis)
    for n in range(2):
        await store.create_session(sid(n), SessionParams(), "tokenhash", "conn")
    await store.ingest_many([(sid(0), [chunk(0)]), (sid(1), [chunk(0)])])
    await redis.script_flush()
    out = await store.ingest_many([(sid(0), [chunk(1)]), (sid(1), [chunk(0), chunk(1)])])
    assert [r.next_seq for r in out if isinstance(r, IngestResult)] == [2, 2]
    assert await stored_seqs(redis, sid(0)) == [0, 1]
    assert await stored_seqs(redis, sid(1)) == [0, 1]


def test_packed_calls_are_the_bytes_redis_py_would_send() -> None:
    """The gateway packs its INGEST pipeline itself; each call must be byte for byte what
    redis-py's `pack_command` makes of the same EVALSHA (frames large and small, one and
    several per call)."""
    from redis.asyncio.connection import Connection

    from shared.store import _ingest_args, pack_ingest_calls

    conn = Connection()
    sha = "a" * 40
    calls = [
        (sid(1), [chunk(0)]),
        (sid(2), [AudioChunk(7, b"\x01\x02" * 3200), AudioChunk(8, b"")]),
        (sid(3), [chunk(n, n) for n in range(5)]),
    ]
    want = b"".join(
        b"".join(
            conn.pack_command("EVALSHA", sha, 2, keys.meta(s), keys.audio(s), *_ingest_args(c))
        )
        for s, c in calls
    )
    assert pack_ingest_calls(sha, calls) == want


async def test_a_failure_on_one_sessions_keys_is_that_sessions_alone(
    redis: aioredis.Redis,
) -> None:
    """One pipeline for several sessions: a command failing on one session's keys (its
    audio key is not a stream) is that session's error; the sessions before and after
    it in the pipeline are stored."""
    store = Store(redis)
    for n in range(3):
        await store.create_session(sid(n), SessionParams(), "tokenhash", "conn")
    await redis.set(keys.audio(sid(1)), "not a stream")
    out = await store.ingest_many([(sid(n), [chunk(0), chunk(1)]) for n in range(3)])
    assert out[0] == out[2] == IngestResult(next_seq=2, stored=2, audio_bytes=2 * 8)
    assert isinstance(out[1], ResponseError) and "WRONGTYPE" in str(out[1])
    assert await stored_seqs(redis, sid(0)) == await stored_seqs(redis, sid(2)) == [0, 1]
    assert await hget(redis, keys.meta(sid(1)), "next_seq") == b"0"


async def test_a_pipeline_cut_off_before_its_replies_leaves_no_stale_reply(
    redis: aioredis.Redis,
) -> None:
    """A pipeline cancelled while its replies are still due (the gateway shutting down, a
    caller's task cancelled) must not leave its connection in the pool with those replies
    unread: the next pipeline on it would take them for its own. Here the server holds the
    first pipeline (CLIENT PAUSE WRITE) while it is cancelled; the next one must get its
    own results, and every frame is stored once."""
    store = Store(redis)
    await store.create_session(sid(0), SessionParams(), "tokenhash", "conn")
    await store.create_session(sid(1), SessionParams(), "tokenhash", "conn")
    await store.ingest_many([(sid(0), [chunk(0)]), (sid(1), [chunk(0)])])
    admin = aioredis.Redis(
        connection_pool=aioredis.ConnectionPool(**redis.connection_pool.connection_kwargs)
    )
    # redis-py leaves `execute_command` unannotated; a raw command's reply is the server's.
    command = cast(Callable[..., Awaitable[object]], admin.execute_command)
    try:
        await command("CLIENT", "PAUSE", 20000, "WRITE")
        held = asyncio.create_task(store.ingest_many([(sid(0), [chunk(1)])]))
        for _ in range(500):  # until the server holds the EVALSHA (bounded)
            clients = await admin.client_list()
            if any(c.get("cmd") == "evalsha" for c in clients) and not held.done():
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the paused EVALSHA never showed in CLIENT LIST")
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        await command("CLIENT", "UNPAUSE")
        out = await store.ingest_many([(sid(1), [chunk(1), chunk(2)])])
    finally:
        await command("CLIENT", "UNPAUSE")
        await admin.aclose()
        await admin.connection_pool.disconnect()
    assert out == [IngestResult(next_seq=3, stored=2, audio_bytes=3 * 8)]
    assert await stored_seqs(redis, sid(1)) == [0, 1, 2]
    # The held call may or may not have run once the pause ended; never twice.
    assert await stored_seqs(redis, sid(0)) in ([0], [0, 1])


async def _stream(ws: ClientConnection, tag: int, frames: int) -> int:
    """Send `frames` frames marked with `tag` and return the last ack's seq."""
    for seq in range(frames):
        await ws.send(bytes([tag, seq]) * (FRAME_BYTES // 2))
    acked = -1
    while acked < frames - 1:
        msg = json.loads(await ws.recv())
        if msg["type"] == "ack":
            assert msg["seq"] > acked, "acks only move forward"
            acked = msg["seq"]
    return acked


async def test_concurrent_sessions_store_their_own_audio_in_order(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """Many sessions streaming at once through one gateway: every frame is acked, and each
    session's audio stream holds exactly its own frames, once each, in order."""
    svc = await service_factory(with_worker=False)
    sessions, frames = 24, 30
    sockets = [await open_ws(svc.url) for _ in range(sessions)]
    sids = [SessionId((await started(ws))["session_id"]) for ws in sockets]
    acked = await asyncio.gather(*(_stream(ws, i, frames) for i, ws in enumerate(sockets)))
    assert acked == [frames - 1] * sessions
    for i, session in enumerate(sids):
        entries = await redis.xrange(keys.audio(session))
        items = [audio_chunk(envelope.decode_entry(fields)) for _, fields in entries]
        assert [item.seq for item in items] == list(range(frames))
        assert all(item.pcm == bytes([i, item.seq]) * (FRAME_BYTES // 2) for item in items)
    batcher = svc.gateway.batcher
    assert batcher.calls >= sessions and 1 <= batcher.pipelines <= batcher.calls
    # Audio alone, every ack written at once: each call was made and acked from
    # callbacks, none woke a writer task (gateway/connection.py, `_writer`).
    counters = svc.gateway.metrics.counters
    assert counters['audio_writes_total{path="callback"}'] == batcher.calls
    assert counters['audio_writes_total{path="task"}'] == 0
    for ws in sockets:
        await ws.close()


async def test_storage_errors_reach_only_their_own_connection(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """Sessions whose frames go out in the same pipelines: a closed session gets 1008, an
    expired one 4404, one whose stored audio is ahead of a gap 1012 (no error message),
    and a healthy one keeps getting acks."""
    svc = await service_factory(with_worker=False)
    names = ("closed", "expired", "gap", "healthy")
    sockets = {name: await open_ws(svc.url) for name in names}
    sids = {name: SessionId((await started(ws))["session_id"]) for name, ws in sockets.items()}
    for i, ws in enumerate(sockets.values()):
        assert await _stream(ws, i, 3) == 2
    await cast(Awaitable[int], redis.hset(keys.meta(sids["closed"]), "state", "closed"))
    await redis.delete(keys.meta(sids["expired"]))
    await cast(Awaitable[int], redis.hset(keys.meta(sids["gap"]), "next_seq", "1"))
    for ws in sockets.values():
        await ws.send(bytes(FRAME_BYTES))
    outcomes = dict(
        zip(names[:3], await asyncio.gather(*(drain(sockets[n]) for n in names[:3])), strict=True)
    )
    closed, expired, gap = outcomes["closed"], outcomes["expired"], outcomes["gap"]
    assert closed.code == 1008 and closed.of_type("error")[-1]["code"] == "protocol_violation"
    assert expired.code == 4404 and expired.of_type("error")[-1]["code"] == "not_found"
    assert gap.code == 1012 and not gap.of_type("error") and "seq 1" in gap.reason
    healthy = sockets["healthy"]
    acked = -1
    while acked < 3:
        msg = json.loads(await healthy.recv())
        acked = msg["seq"] if msg["type"] == "ack" else acked
    assert await stored_seqs(redis, sids["healthy"]) == [0, 1, 2, 3]
    await healthy.close()


async def test_a_flushed_script_cache_does_not_interrupt_a_session(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """SCRIPT FLUSH mid-stream (Redis restarted or failed over): the gateway reloads the
    script and the session goes on being acked, each frame stored once."""
    svc = await service_factory(with_worker=False)
    ws = await open_ws(svc.url)
    session = SessionId((await started(ws))["session_id"])
    assert await _stream(ws, 1, 3) == 2
    await redis.script_flush()
    for seq in range(3, 6):
        await ws.send(bytes([1, seq]) * (FRAME_BYTES // 2))
    acked = -1
    while acked < 5:
        msg = json.loads(await ws.recv())
        acked = msg["seq"] if msg["type"] == "ack" else acked
    assert await stored_seqs(redis, session) == list(range(6))
    await ws.close()


@pytest.mark.parametrize("path", ["hiredis reader", "redis-py read_response"])
async def test_kept_connection_reads_every_kind_of_reply_in_order(
    redis: aioredis.Redis, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """`KeptConnection.send` reads a pipeline's replies from hiredis's reader directly,
    or through redis-py's `read_response` when that parser is not there: either way every
    reply comes back in order (integers, strings, nested arrays, a reply larger than one
    socket read), error replies in their place as `ResponseError`s (NOSCRIPT as
    `NoScriptError`, which `ingest_many` reloads on), and the connection stays usable."""
    from redis._parsers.hiredis import _AsyncHiredisParser
    from redis.asyncio.connection import Connection
    from redis.exceptions import NoScriptError

    import shared.store
    from shared.store import KeptConnection

    if path == "redis-py read_response":
        monkeypatch.setattr(shared.store, "_AsyncHiredisParser", None)
    big = b"x" * 300_000  # several socket reads
    await redis.set("big", big)
    await redis.set("text", "not a list")
    pack = Connection().pack_command
    commands = [
        ("PING",),
        ("GET", "big"),
        ("LRANGE", "text", 0, -1),  # WRONGTYPE
        ("EVALSHA", "f" * 40, 0),  # NOSCRIPT
        ("EVAL", "return {1, {2, 'three'}, -4}", 0),
        ("GET", "missing"),
    ]
    kept = KeptConnection(redis)
    assert await kept.send(b"".join(pack("PING")), 1) == [b"PONG"]
    assert kept._conn is not None
    if path == "hiredis reader":

        async def public_path(*args: object, **kwargs: object) -> object:
            raise AssertionError("read through redis-py's read_response")

        monkeypatch.setattr(kept._conn, "read_response", public_path)
    for _ in range(2):  # the second pipeline reads on the same kept connection
        out = await kept.send(b"".join(b"".join(pack(*c)) for c in commands), len(commands))
        assert out[0] == b"PONG"
        assert out[1] == big
        assert isinstance(out[2], ResponseError) and "WRONGTYPE" in str(out[2])
        assert isinstance(out[3], NoScriptError)
        assert out[4] == [1, [2, b"three"], -4]
        assert out[5] is None
    assert isinstance(kept._conn._parser, _AsyncHiredisParser)  # hiredis is a dependency
