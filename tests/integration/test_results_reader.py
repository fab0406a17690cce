"""The gateway's results re-reads, batched: each connection gets exactly its own
session's entries after its own cursor, and one failing read fails only its caller."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError
from redis.typing import EncodableT, FieldT

from gateway.results import ResultsReader
from shared import envelope, keys
from shared.batching import BatcherClosed
from shared.envelope import Closed, Transcript
from shared.keys import SessionId
from shared.store import Store


def final(rid: int, text: str) -> Transcript:
    return Transcript(result_id=rid, is_final=True, start=rid, end=rid + 1.0, text=text)


async def test_batched_reads_match_single_reads(redis: aioredis.Redis) -> None:
    store = Store(redis)
    sids = [SessionId(f"{i:032x}") for i in range(3)]
    ids: dict[SessionId, list[bytes]] = {}
    for n, sid in enumerate(sids):
        ids[sid] = []
        for rid in range(n + 1):
            entry: dict[FieldT, EncodableT] = {
                "t": "final",
                "rid": str(rid),
                "m": envelope.encode(final(rid, f"{sid} {rid}")),
            }
            ids[sid].append(await redis.xadd(keys.results(sid), entry))
    done = Closed(reason="client_closed", audio_seconds=3.0, final_results=3)
    await redis.xadd(keys.results(sids[2]), {"t": "closed", "m": envelope.encode(done)})
    broken = SessionId("f" * 32)
    await redis.set(keys.results(broken), "not a stream")  # XRANGE on it: WRONGTYPE

    reader = ResultsReader(store)
    # Each from its own cursor: the whole stream, after the first entry, after the last.
    cursors = [b"0-0", ids[sids[1]][0], ids[sids[2]][-1]]
    try:
        got = await asyncio.gather(
            *(reader.read(sid, after) for sid, after in zip(sids, cursors, strict=True)),
            reader.read(broken, b"0-0"),
            return_exceptions=True,
        )
    finally:
        await reader.close()
    assert reader.pipelines == 1 and reader.calls == 4  # one round trip for all of them
    first, second, third, failed = got
    assert isinstance(failed, ResponseError) and "WRONGTYPE" in str(failed)
    for sid, after, entries in zip(sids, cursors, (first, second, third), strict=True):
        assert entries == await store.read_results(sid, after)
    assert isinstance(first, list) and isinstance(second, list) and isinstance(third, list)
    assert [item.text for _, item in first if isinstance(item, Transcript)] == [f"{sids[0]} 0"]
    assert [item.text for _, item in second if isinstance(item, Transcript)] == [f"{sids[1]} 1"]
    assert [type(item) for _, item in third] == [Closed]


async def test_reads_after_close_are_refused(redis: aioredis.Redis) -> None:
    reader = ResultsReader(Store(redis))
    reader.start()
    await reader.close()
    with pytest.raises(BatcherClosed):
        await reader.read(SessionId("0" * 32), b"0-0")
