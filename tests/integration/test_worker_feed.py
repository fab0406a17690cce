"""The worker feeds the audio of every session of one read in one job on its VAD thread,
while the session tasks use the same transcribers from the event loop. They must take
turns: a transcriber is never used from two threads at once."""

from __future__ import annotations

import asyncio
import functools
import json
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import ServiceFactory
from tests.helpers import drain, fixture, open_ws, started, stream_session
from worker.stream import SessionTranscriber

GUARDED = ("push_audio", "finalize", "close", "next_request", "complete", "take_ready",
           "abandon_request")  # fmt: skip


async def test_a_transcriber_is_never_used_from_two_threads_at_once(
    service_factory: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    in_use: dict[int, str] = {}  # id(transcriber) -> thread using it now
    overlaps: list[tuple[str, str, str]] = []
    calls: dict[str, int] = {}
    guard = threading.Lock()

    def wrap(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(method)
        def guarded(self: SessionTranscriber, *args: Any, **kwargs: Any) -> Any:
            me = threading.current_thread().name
            with guard:
                other = in_use.get(id(self))
                if other is not None and other != me:
                    overlaps.append((name, me, other))
                nested = other == me
                in_use[id(self)] = me
                calls[me] = calls.get(me, 0) + 1
            try:
                if name == "push_audio":
                    time.sleep(0.002)  # a slow VAD: widens the window for an overlap
                return method(self, *args, **kwargs)
            finally:
                if not nested:
                    with guard:
                        in_use.pop(id(self), None)

        return guarded

    for name in GUARDED:
        monkeypatch.setattr(SessionTranscriber, name, wrap(name, getattr(SessionTranscriber, name)))

    svc = await service_factory(vad="energy", interim_interval_s=0.2)
    audio = fixture("s1.wav")

    async def one_session() -> int:
        out = await stream_session(svc.url, audio)
        assert out.code == 1000
        return len(out.finals)

    finals = await asyncio.gather(*(one_session() for _ in range(6)))
    assert all(n >= 1 for n in finals)
    # Both threads really used the transcribers, and never the same one at once.
    assert len(calls) >= 2, calls
    assert overlaps == []


async def test_audio_that_cannot_be_fed_fails_its_own_session_only(
    service_factory: ServiceFactory, monkeypatch: pytest.MonkeyPatch, redis: Any
) -> None:
    """One job feeds every session of a read; when one session's audio raises, that
    session is given up (its error recorded for the dead-letter entry) and the others in
    the same job go on to their finals."""
    from shared import keys
    from worker.audio import AudioConverter

    convert = AudioConverter.convert

    def convert_or_fail(self: AudioConverter, pcm: bytes) -> Any:
        if pcm[:4] == b"\x7f\x7f\x7f\x7f":
            raise ValueError("unconvertible test audio")
        return convert(self, pcm)

    monkeypatch.setattr(AudioConverter, "convert", convert_or_fail)
    svc = await service_factory(vad="energy")
    audio = fixture("s1.wav")
    bad = await open_ws(svc.url)
    bad_sid = (await started(bad))["session_id"]
    good = await open_ws(svc.url)
    await started(good)
    frames = list(audio.frames(100))
    for frame in frames:
        await good.send(frame)
        await bad.send(b"\x7f" * len(frame))
    await good.send(json.dumps({"type": "close_stream"}))
    out = await drain(good)
    assert out.code == 1000
    assert len(out.finals) >= 1
    for _ in range(200):  # until the worker has given the bad session up (bounded)
        why = await redis.hget(keys.meta(bad_sid), "last_error")
        if why is not None:
            break
        await asyncio.sleep(0.05)
    assert why == b"ValueError: unconvertible test audio"
    await bad.close()


async def test_a_read_loop_stopped_mid_feed_holds_the_sessions_until_the_feed_ends(
    service_factory: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown cancels the read loop, possibly while its feed job is running on the VAD
    thread. The job cannot be interrupted, so the session tasks must stay held at the gate
    until it has finished, not only until the read loop has stopped."""
    from worker.service import Worker

    entered, release = threading.Event(), threading.Event()
    feed_all = Worker._feed_all

    def slow_feed_all(self: Worker, work: Any) -> None:
        entered.set()
        release.wait(10)  # bounded: the test releases it
        feed_all(self, work)

    monkeypatch.setattr(Worker, "_feed_all", slow_feed_all)
    svc = await service_factory(vad="energy")
    worker = svc.worker
    assert worker is not None
    ws = await open_ws(svc.url)
    await started(ws)
    loop = asyncio.get_running_loop()
    frames = list(fixture("s1.wav").frames(100))
    await ws.send(frames[0])
    assert await loop.run_in_executor(None, entered.wait, 10)
    read_loop = next(t for t in worker._tasks if t.get_coro().__name__ == "_read_loop")  # type: ignore[union-attr]
    read_loop.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read_loop
    assert not worker._fed.is_set()  # the job still runs: sessions are held
    release.set()
    await asyncio.wait_for(worker._fed.wait(), 10)
    await ws.close()


async def test_a_read_of_more_streams_than_a_chunk_goes_in_chunks(
    service_factory: ServiceFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With more sessions than `read_chunk_streams`, a pass reads them in XREADs of at
    most that many streams, which do not block; every session still gets all of its
    audio (the same finals as the others, from the same audio)."""
    from shared.store import Store

    calls: list[tuple[int, int | None]] = []
    read_audio = Store.read_audio

    async def recording(self: Store, streams: Any, count: int, block_ms: int | None) -> Any:
        calls.append((len(streams), block_ms))
        return await read_audio(self, streams, count, block_ms)

    monkeypatch.setattr(Store, "read_audio", recording)
    svc = await service_factory(vad="energy", read_chunk_streams=2)
    frames = list(fixture("s1.wav").frames(100))
    sockets = [await open_ws(svc.url) for _ in range(5)]
    for ws in sockets:
        await started(ws)
    for frame in frames:
        for ws in sockets:
            await ws.send(frame)
    for ws in sockets:
        await ws.send(json.dumps({"type": "close_stream"}))
    outs = [await drain(ws) for ws in sockets]
    assert [o.code for o in outs] == [1000] * 5
    texts = [[f["text"] for f in o.finals] for o in outs]
    assert texts[0] and all(t == texts[0] for t in texts), texts
    assert calls and max(n for n, _ in calls) <= 2
    assert any(block is None for _, block in calls)  # chunked passes happened
