"""The gateway's ingest batcher: grouping of calls into pipelines and where each outcome
goes. The store here is an in-memory stand-in with the same per-call contract as
`Store.ingest_many` (the real one runs against Valkey in
tests/integration/test_ingest_batch.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from gateway.connection import ack_text
from gateway.ingest import BatcherClosed, IngestBatcher
from shared.envelope import AudioChunk
from shared.keys import SessionId
from shared.protocol import Ack, build_server_message
from shared.store import IngestResult, SeqGap, SessionGone, Store

Outcome = IngestResult | SessionGone | SeqGap | ResponseError


class MemoryStore:
    """INGEST's rules per session (idempotent on seq, gaps refused) without Redis. Each
    `ingest_many` is held until the test lets it finish, so the test decides what is in
    flight."""

    def __init__(self) -> None:
        self.next_seq: dict[SessionId, int] = {}
        self.closed: set[SessionId] = set()
        self.pipelines: list[list[SessionId]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail_next: Exception | None = None
        self.sent = asyncio.Event()  # set once a pipeline has reached the store

    async def ingest_many(
        self, calls: Sequence[tuple[SessionId, Sequence[AudioChunk]]]
    ) -> list[Outcome]:
        self.pipelines.append([sid for sid, _ in calls])
        self.sent.set()
        await self.release.wait()
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        return [self._one(sid, chunks) for sid, chunks in calls]

    def _one(self, sid: SessionId, chunks: Sequence[AudioChunk]) -> Outcome:
        if sid not in self.next_seq:
            return SessionGone("unknown")
        if sid in self.closed:
            return SessionGone("not_open")
        if sid == "broken":
            return ResponseError("script error")
        nxt = self.next_seq[sid]
        if chunks[0].seq > nxt:
            return SeqGap(nxt)
        stored = 0
        for chunk in chunks:
            if chunk.seq == nxt:
                nxt += 1
                stored += 1
        self.next_seq[sid] = nxt
        return IngestResult(next_seq=nxt, stored=stored, audio_bytes=nxt * 2)


def sid(name: str) -> SessionId:
    return SessionId(name)


def frames(first: int, n: int = 1) -> list[AudioChunk]:
    return [AudioChunk(seq, b"\x00\x00") for seq in range(first, first + n)]


def batcher_for(store: MemoryStore, **kwargs: int) -> IngestBatcher:
    # The stand-in has Store's `ingest_many` contract; the batcher uses nothing else.
    return IngestBatcher(store, **kwargs)  # type: ignore[arg-type]


async def test_calls_of_one_loop_turn_share_one_pipeline() -> None:
    """Calls made together go to Redis as one pipeline, each getting its own result."""
    store = MemoryStore()
    store.next_seq = {sid("a"): 0, sid("b"): 0, sid("c"): 0}
    batcher = batcher_for(store)
    results = await asyncio.gather(*(batcher.ingest(s, frames(0, 2)) for s in store.next_seq))
    assert store.pipelines == [["a", "b", "c"]]
    assert [r.next_seq for r in results] == [2, 2, 2]
    assert (batcher.pipelines, batcher.calls) == (1, 3)
    await batcher.close()


async def test_calls_made_while_a_pipeline_is_in_flight_go_in_the_next() -> None:
    """While one pipeline waits for Redis the next one fills up (group commit)."""
    store = MemoryStore()
    store.next_seq = {sid("a"): 0, sid("b"): 0, sid("c"): 0}
    store.release.clear()
    batcher = batcher_for(store)
    first = asyncio.ensure_future(batcher.ingest(sid("a"), frames(0)))
    await store.sent.wait()
    later = [asyncio.ensure_future(batcher.ingest(s, frames(0))) for s in (sid("b"), sid("c"))]
    await asyncio.sleep(0)
    assert store.pipelines == [["a"]], "one pipeline at a time"
    store.release.set()
    await asyncio.gather(first, *later)
    assert store.pipelines == [["a"], ["b", "c"]]
    await batcher.close()


async def test_each_error_reaches_only_its_own_caller() -> None:
    """Gone, closed, gap and script errors in one pipeline each reach just the caller they
    belong to; the other calls of the same pipeline are stored."""
    store = MemoryStore()
    store.next_seq = {sid("ok"): 0, sid("closed"): 0, sid("gap"): 1, sid("broken"): 0}
    store.closed.add(sid("closed"))
    batcher = batcher_for(store)
    calls = {
        "ok": batcher.ingest(sid("ok"), frames(0)),
        "unknown": batcher.ingest(sid("unknown"), frames(0)),
        "closed": batcher.ingest(sid("closed"), frames(0)),
        "gap": batcher.ingest(sid("gap"), frames(5)),
        "broken": batcher.ingest(sid("broken"), frames(0)),
    }
    out = dict(
        zip(calls, await asyncio.gather(*calls.values(), return_exceptions=True), strict=True)
    )
    assert len(store.pipelines) == 1
    assert isinstance(out["ok"], IngestResult) and out["ok"].next_seq == 1
    assert isinstance(out["unknown"], SessionGone) and out["unknown"].reason == "unknown"
    assert isinstance(out["closed"], SessionGone) and out["closed"].reason == "not_open"
    assert isinstance(out["gap"], SeqGap) and out["gap"].next_seq == 1
    assert isinstance(out["broken"], ResponseError)
    await batcher.close()


async def test_a_connection_error_reaches_every_caller_and_a_retry_stores() -> None:
    """When the pipeline itself fails nothing is known about any call: each caller gets
    the error (and retries, as the connection does); the retry stores exactly once."""
    store = MemoryStore()
    store.next_seq = {sid("a"): 0, sid("b"): 0}
    store.fail_next = RedisConnectionError("connection reset")
    batcher = batcher_for(store)
    out = await asyncio.gather(
        batcher.ingest(sid("a"), frames(0)),
        batcher.ingest(sid("b"), frames(0)),
        return_exceptions=True,
    )
    assert all(isinstance(r, RedisConnectionError) for r in out)
    again = await asyncio.gather(
        batcher.ingest(sid("a"), frames(0)), batcher.ingest(sid("b"), frames(0))
    )
    assert [r.next_seq for r in again] == [1, 1]
    assert store.next_seq == {"a": 1, "b": 1}
    # Only the answered pipeline's round trip is in the histogram (`/metrics`).
    assert len(store.pipelines) == 2
    assert batcher.pipelines == batcher.round_trip.count == 1
    await batcher.close()


async def test_a_caller_that_gave_up_is_left_out() -> None:
    """A call cancelled before its pipeline is sent (its connection ended) is not sent."""
    store = MemoryStore()
    store.next_seq = {sid("a"): 0, sid("b"): 0, sid("c"): 0}
    store.release.clear()
    batcher = batcher_for(store)
    first = asyncio.ensure_future(batcher.ingest(sid("a"), frames(0)))
    await store.sent.wait()
    gone = asyncio.ensure_future(batcher.ingest(sid("b"), frames(0)))
    kept = asyncio.ensure_future(batcher.ingest(sid("c"), frames(0)))
    await asyncio.sleep(0)
    gone.cancel()
    store.release.set()
    await asyncio.gather(first, kept)
    assert store.pipelines == [["a"], ["c"]]
    assert store.next_seq[sid("b")] == 0
    await batcher.close()


async def test_pipelines_are_bounded() -> None:
    """No pipeline carries more than max_calls_per_pipeline calls; the rest follow."""
    store = MemoryStore()
    store.next_seq = {sid(str(i)): 0 for i in range(5)}
    batcher = batcher_for(store, max_calls_per_pipeline=2)
    await asyncio.gather(*(batcher.ingest(s, frames(0)) for s in store.next_seq))
    assert [len(p) for p in store.pipelines] == [2, 2, 1]
    await batcher.close()


async def test_pipelines_are_bounded_in_bytes() -> None:
    """A pipeline stops before the byte limit; a single larger call still goes alone."""
    store = MemoryStore()
    store.next_seq = {sid(str(i)): 0 for i in range(4)}
    batcher = batcher_for(store, max_bytes_per_pipeline=10)
    sizes = {"0": 2, "1": 2, "2": 8, "3": 1}  # frames of 2 bytes each
    await asyncio.gather(*(batcher.ingest(sid(k), frames(0, n)) for k, n in sizes.items()))
    assert store.pipelines == [["0", "1"], ["2"], ["3"]]
    await batcher.close()


async def test_close_fails_waiting_calls_and_refuses_new_ones() -> None:
    """After close, waiting and new calls fail with BatcherClosed instead of hanging."""
    store = MemoryStore()
    store.next_seq = {sid("a"): 0, sid("b"): 0}
    store.release.clear()
    batcher = batcher_for(store)
    in_flight = asyncio.ensure_future(batcher.ingest(sid("a"), frames(0)))
    await store.sent.wait()
    waiting = asyncio.ensure_future(batcher.ingest(sid("b"), frames(0)))
    await asyncio.sleep(0)
    await batcher.close()
    for fut in (in_flight, waiting):
        with pytest.raises(BatcherClosed):
            await fut
    with pytest.raises(BatcherClosed):
        await batcher.ingest(sid("a"), frames(0))


async def test_start_ingest_gives_a_future_that_joins_the_same_pipelines() -> None:
    """The callback form: its future resolves in the same pipeline as awaited calls,
    a cancelled one is left out, and after close it comes back already failed."""
    store = MemoryStore()
    store.next_seq = {sid("a"): 0, sid("b"): 0, sid("c"): 0}
    store.release.clear()
    batcher = batcher_for(store)
    first = batcher.start_ingest(sid("a"), frames(0))
    await store.sent.wait()
    awaited = asyncio.ensure_future(batcher.ingest(sid("b"), frames(0)))
    gone = batcher.start_ingest(sid("c"), frames(0))
    answered: list[int] = []
    first.add_done_callback(lambda fut: answered.append(fut.result().next_seq))
    await asyncio.sleep(0)
    gone.cancel()
    store.release.set()
    assert (await awaited).next_seq == 1
    assert answered == [1] and first.result().next_seq == 1
    assert store.pipelines == [["a"], ["b"]]
    assert store.next_seq[sid("c")] == 0
    await batcher.close()
    late = batcher.start_ingest(sid("a"), frames(1))
    assert late.done() and isinstance(late.exception(), BatcherClosed)


async def test_a_batcher_closed_before_it_started_is_not_started_by_a_call() -> None:
    batcher = batcher_for(MemoryStore())
    await batcher.close()
    late = batcher.start_ingest(sid("a"), frames(0))
    assert isinstance(late.exception(), BatcherClosed)
    assert batcher._task is None  # no batcher task left running


def test_bad_limit_is_refused() -> None:
    """A pipeline limit below one call is a ValueError."""
    with pytest.raises(ValueError, match="max_calls_per_pipeline"):
        IngestBatcher(Store.__new__(Store), max_calls_per_pipeline=0)
    with pytest.raises(ValueError, match="max_bytes_per_pipeline"):
        IngestBatcher(Store.__new__(Store), max_bytes_per_pipeline=0)


@pytest.mark.parametrize("seq", [0, 7, 123456789])
def test_ack_template_is_the_codec_text(seq: int) -> None:
    """The gateway's templated ack is exactly the codec's ack message."""
    assert ack_text(seq) == build_server_message(Ack(seq))
