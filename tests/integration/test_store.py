"""The Redis layout's atomic scripts against a real Valkey: idempotent, ordered, fenced."""

from __future__ import annotations

import asyncio
import random

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from shared import envelope, keys
from shared.envelope import AudioChunk, Transcript
from shared.keys import SessionId, WorkerId
from shared.protocol import SessionParams
from shared.store import ClaimResult, Contested, SeqGap, Store
from tests.helpers import audio_chunk, hget, hgetall

SID = SessionId("ab" * 16)


async def _new_session(store: Store) -> None:
    await store.create_session(SID, SessionParams(), "tokenhash", "conn-1")


async def test_racing_appends_store_each_seq_once_in_order(redis: aioredis.Redis) -> None:
    """Many writers racing with overlapping, shuffled batches: the stream holds seq
    0..n-1 exactly once, in order (ingest is idempotent on seq and refuses gaps)."""
    store = Store(redis)
    await _new_session(store)
    n = 120
    chunks = [AudioChunk(seq, seq.to_bytes(2, "little") * 8) for seq in range(n)]
    rng = random.Random(7)

    async def writer() -> None:
        start = 0
        while start < n:
            size = rng.randint(1, 9)
            batch = chunks[start : start + size]
            try:
                result = await store.ingest(SID, batch)
                start = result.next_seq  # continue after what is stored (ours or others')
            except SeqGap as gap:
                start = gap.next_seq
            await asyncio.sleep(0)

    await asyncio.gather(*(writer() for _ in range(6)))
    entries = await redis.xrange(keys.audio(SID))
    seqs = [audio_chunk(envelope.decode_entry(fields)).seq for _, fields in entries]
    assert seqs == list(range(n))
    meta = await store.load_meta(SID)
    assert meta is not None and meta.next_seq == n and meta.audio_bytes == 16 * n


async def test_gap_is_refused_with_next_seq(redis: aioredis.Redis) -> None:
    """A batch that would leave a gap is refused and names the seq to resend from."""
    store = Store(redis)
    await _new_session(store)
    await store.ingest(SID, [AudioChunk(0, b"\x00\x00")])
    try:
        await store.ingest(SID, [AudioChunk(5, b"\x00\x00")])
    except SeqGap as gap:
        assert gap.next_seq == 1
    else:
        raise AssertionError("gap accepted")
    assert await redis.xlen(keys.audio(SID)) == 1


async def test_fenced_worker_cannot_publish(redis: aioredis.Redis) -> None:
    """After another worker claims the session (new epoch), the old owner's interim, final
    and close are all rejected in Redis and nothing reaches the results stream."""
    store = Store(redis)
    await _new_session(store)
    first = await store.claim(SID, WorkerId("w1"), lease_s=5)
    assert isinstance(first, ClaimResult) and first.epoch == 1
    contested = await store.claim(SID, WorkerId("w2"), lease_s=5)
    assert isinstance(contested, Contested), "lease still held"
    assert 0 < contested.pttl_ms <= 5000
    await redis.delete(keys.lease(SID))  # w1's lease expires (paused, partitioned...)
    second = await store.claim(SID, WorkerId("w2"), lease_s=5)
    assert isinstance(second, ClaimResult) and second.epoch == 2
    meta = await hgetall(redis, keys.meta(SID))
    assert meta[b"owner"] == b"w2" and int(meta[b"claimed_ms"]) > 0
    final = Transcript(0, True, 0.0, 1.0, "stale words")
    assert await store.publish_final(SID, "w1:1", final, "0-1", 100, 0) == -1
    assert not await store.publish_interim(SID, "w1:1", Transcript(0, False, 0, 1, "x"))
    summary = envelope.Closed("client_closed", 1.0, 0)
    assert not await store.close_session(SID, "w1:1", summary, ttl_s=60)
    assert await redis.xlen(keys.results(SID)) == 0
    assert await store.publish_final(SID, "w2:2", final, "0-1", 100, 0) == 1
    assert await redis.xlen(keys.results(SID)) == 1


async def test_a_final_records_the_language_it_locked_and_only_its_owner_can(
    redis: aioredis.Redis,
) -> None:
    """`language_locked` is written with the final whose detection fixed the language,
    in the same script: by the lease holder only; load_meta reads it back."""
    store = Store(redis)
    await _new_session(store)
    meta = await store.load_meta(SID)
    assert meta is not None and meta.language_locked == ""
    assert isinstance(await store.claim(SID, WorkerId("w1"), lease_s=5), ClaimResult)
    await redis.delete(keys.lease(SID))
    assert isinstance(await store.claim(SID, WorkerId("w2"), lease_s=5), ClaimResult)
    final = Transcript(0, True, 0.0, 1.0, "guten tag")
    assert await store.publish_final(SID, "w1:1", final, "0-1", 100, 0, "th") == -1
    assert await hget(redis, keys.meta(SID), "language_locked") is None
    assert await store.publish_final(SID, "w2:2", final, "0-1", 100, 0) == 1
    assert await hget(redis, keys.meta(SID), "language_locked") is None  # none given
    second = Transcript(1, True, 1.0, 2.0, "wie geht es")
    assert await store.publish_final(SID, "w2:2", second, "0-1", 200, 0, "de") == 2
    meta = await store.load_meta(SID)
    assert meta is not None and meta.language_locked == "de"


async def test_final_numbering_cannot_skip(redis: aioredis.Redis) -> None:
    """A final whose result_id is not the next number is rejected (-2)."""
    store = Store(redis)
    await _new_session(store)
    claim = await store.claim(SID, WorkerId("w1"), lease_s=5)
    assert claim is not None
    assert isinstance(claim, ClaimResult)
    token = f"w1:{claim.epoch}"
    assert await store.publish_final(SID, token, Transcript(1, True, 0, 1, "x"), "0-1", 0, 0) == -2
    assert await store.publish_final(SID, token, Transcript(0, True, 0, 1, "x"), "0-1", 0, 0) == 1


async def test_renew_many_renews_only_leases_still_held(redis: aioredis.Redis) -> None:
    """One pipeline renews every lease whose token still matches and reports the others
    as lost, also after the server lost its script cache."""
    store = Store(redis)
    other = SessionId("cd" * 16)
    await _new_session(store)
    await store.create_session(other, SessionParams(), "tokenhash", "conn-2")
    mine = await store.claim(SID, WorkerId("w1"), lease_s=5)
    theirs = await store.claim(other, WorkerId("w1"), lease_s=5)
    assert isinstance(mine, ClaimResult) and isinstance(theirs, ClaimResult)
    await redis.delete(keys.lease(other))  # lost, then claimed by another worker
    taken = await store.claim(other, WorkerId("w2"), lease_s=5)
    assert isinstance(taken, ClaimResult)
    await redis.script_flush()
    renewed = await store.renew_many([(SID, "w1:1"), (other, "w1:1")], lease_s=60)
    assert renewed == [True, False]
    assert 5000 < await redis.pttl(keys.lease(SID)) <= 60_000
    assert await redis.pttl(keys.lease(other)) <= 5000  # w2's lease untouched
    assert await store.renew_many([], lease_s=60) == []


async def test_read_audio_reads_many_streams_from_their_ids(redis: aioredis.Redis) -> None:
    """`read_audio` (the worker's hand-packed XREAD): entries after each stream's own ID,
    in order, with flat field lists; [] when nothing arrives within the block, or at once
    without one; streams
    with nothing new are left out; a reply is still read after the server dropped the
    connection it keeps."""
    store = Store(redis)
    other = SessionId("cd" * 16)
    for sid in (SID, other):
        await store.create_session(sid, SessionParams(), "tokenhash", "conn")
    await store.ingest(SID, [AudioChunk(0, b"\0\0"), AudioChunk(1, b"\1\1")])
    first = (await redis.xrange(keys.audio(SID)))[0][0]
    a, b = keys.audio(SID).encode(), keys.audio(other).encode()
    reply = await store.read_audio([(a, first), (b, b"0-0")], count=10, block_ms=10)
    assert len(reply) == 1 and reply[0][0] == a
    [(entry_id, fields)] = reply[0][1]
    assert entry_id > first
    assert envelope.decode_fields(fields) == AudioChunk(1, b"\1\1")
    assert await store.read_audio([(a, entry_id), (b, b"0-0")], count=10, block_ms=10) == []
    # Without BLOCK: nothing new is an empty reply at once (a blocking read without a
    # timeout would wait here for ever), and new entries are read as with it.
    assert await asyncio.wait_for(store.read_audio([(a, entry_id)], 10, None), 5) == []
    await store.ingest(SID, [AudioChunk(2, b"\3\3")])
    [(key, [(_, fields)])] = await store.read_audio([(a, entry_id)], 10, None)
    assert key == a and envelope.decode_fields(fields) == AudioChunk(2, b"\3\3")
    await store.ingest(other, [AudioChunk(0, b"\2\2")])
    await redis.client_kill_filter(_type="normal", skipme=True)  # drops the kept connection
    with pytest.raises(RedisConnectionError):  # the caller retries (the worker does)
        await store.read_audio([(b, b"0-0")], count=10, block_ms=10)
    again = await store.read_audio([(b, b"0-0")], count=10, block_ms=10)
    assert [envelope.decode_fields(f) for _, f in again[0][1]] == [AudioChunk(0, b"\2\2")]


async def test_publish_many_fences_and_fails_each_call_alone(redis: aioredis.Redis) -> None:
    """One pipeline of interims and finals for several sessions: each call is fenced by
    its own lease, an error fails only its own call, and a lost script cache is reloaded."""
    store = Store(redis)
    other = SessionId("cd" * 16)
    await _new_session(store)
    await store.create_session(other, SessionParams(), "tokenhash", "conn-2")
    assert isinstance(await store.claim(SID, WorkerId("w1"), lease_s=5), ClaimResult)
    assert isinstance(await store.claim(other, WorkerId("w1"), lease_s=5), ClaimResult)
    await redis.script_flush()
    final = Transcript(0, True, 0.0, 1.0, "hello")
    replies = await store.publish_many(
        [
            store.interim_call(SID, "w1:1", Transcript(0, False, 0.0, 0.5, "hel")),
            store.final_call(SID, "w1:1", final, "0-1", 16000, 0),
            store.interim_call(other, "w9:9", Transcript(0, False, 0.0, 0.5, "x")),  # fenced
            store.final_call(other, "w1:1", final, "0-1", 16000, 0),
        ]
    )
    assert replies == [1, 1, 0, 1]
    assert await redis.xlen(keys.results(SID)) == 1
    await redis.delete(keys.results(other))
    await redis.set(keys.results(other), "not a stream")  # its XADD will fail
    second = Transcript(1, True, 1.0, 2.0, "again")
    replies = await store.publish_many(
        [
            store.final_call(other, "w1:1", second, "0-1", 32000, 0),
            store.final_call(SID, "w1:1", second, "0-1", 32000, 0),
        ]
    )
    assert isinstance(replies[0], ResponseError) and "WRONGTYPE" in str(replies[0])
    assert replies[1] == 2
    assert await store.publish_many([]) == []


async def test_create_session_writes_meta_then_one_dispatch_entry_with_its_place(
    redis: aioredis.Redis,
) -> None:
    """`create_session`: the meta hash, one dispatch entry on the session's priority lane
    naming it, and its place (the lane's `entries-added` just after the add) returned and
    recorded with the entry's ID; after the server lost its script cache (NOSCRIPT) the
    next session still gets exactly one entry and the next place."""
    store = Store(redis)
    other = SessionId("cd" * 16)
    high = SessionId("ef" * 16)
    assert await store.create_session(SID, SessionParams(), "tokenhash", "conn-1") == 1
    await redis.script_flush()
    assert await store.create_session(other, SessionParams(), "tokenhash", "conn-2") == 2
    assert await store.create_session(high, SessionParams(priority="high"), "t", "c") == 1
    entries = await redis.xrange(keys.dispatch("normal"))
    assert [fields[b"sid"] for _, fields in entries] == [SID.encode(), other.encode()]
    assert len(await redis.xrange(keys.dispatch("high"))) == 1
    for sid, (entry_id, _), place in ((SID, entries[0], b"1"), (other, entries[1], b"2")):
        meta = await hgetall(redis, keys.meta(sid))
        assert meta[b"state"] == b"open" and meta[b"next_seq"] == b"0"
        assert meta[b"dispatch_id"] == entry_id and meta[b"dispatch_index"] == place
    loaded = await store.load_meta(other)
    assert loaded is not None and loaded.dispatch_index == 2
