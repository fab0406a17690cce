"""What the fault tests observe: a client driver and two Redis-side recorders.

- `ClientRun` + `drive()`: streams WAV clips through the SDK (`StreamingSession`) at a
  multiple of real time and records every frame sent, acks, finals, the closing summary
  and reconnects.
- `EventRecorder`: its own pattern subscription to every session's events channel; keeps
  every message with its arrival time (to see which owner epoch published what).
- `AudioRecorder`: tails one session's audio stream with XREAD from the start, so the
  test sees every stored frame (seq and content) before the worker trims it.
Both recorders reconnect by themselves across Redis restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import envelope, keys
from shared.client import SessionError, StreamingSession
from shared.envelope import AudioChunk, Closed, Control, Envelope, Transcript
from shared.errors import EnvelopeError
from shared.keys import SessionId
from shared.wavfile import read_wav
from tests.faults.harness import FIXTURES, now_ms

FRAME_MS = 100


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


@dataclass
class ClientRun:
    """One client session and everything it saw."""

    name: str
    clips: tuple[str, ...]
    frames: list[bytes]
    sample_rate: int
    session_id: str = ""
    sent: int = 0
    bytes_sent: int = 0
    acked_seq: int = -1
    finals: list[Transcript] = field(default_factory=list)
    final_ms: list[int] = field(default_factory=list)
    interims: int = 0
    closed: Closed | None = None
    reconnects: int = 0
    most_buffered: int = 0
    error: str = ""
    started_ms: int = 0
    ended_ms: int = 0
    rewound: int = 0  # acknowledged frames the SDK re-sent because the service lost them
    session: StreamingSession | None = None  # while it runs
    started: asyncio.Event = field(default_factory=asyncio.Event)
    _marks: list[tuple[int, asyncio.Event]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(f.text.strip() for f in self.finals)

    @property
    def sid(self) -> SessionId:
        return SessionId(self.session_id)

    def after_frames(self, count: int) -> asyncio.Event:
        """An event set once `count` frames have been handed to the SDK."""
        event = asyncio.Event()
        if self.sent >= count:
            event.set()
        else:
            self._marks.append((count, event))
        return event

    def _sent_one(self, size: int) -> None:
        self.sent += 1
        self.bytes_sent += size
        for count, event in self._marks:
            if self.sent >= count:
                event.set()


def load_clips(name: str, clips: Sequence[str]) -> ClientRun:
    """A session's audio: the clips back to back (all 16 kHz mono s16le), 100 ms frames."""
    data = b""
    rate = 16000
    for clip in clips:
        audio = read_wav(FIXTURES / f"{clip}.wav")
        if (audio.sample_rate, audio.channels, audio.encoding) != (16000, 1, "pcm_s16le"):
            raise ValueError(f"{clip}: the fault tests use 16 kHz mono s16le clips")
        data += audio.data
    step = rate * FRAME_MS // 1000 * 2
    frames = [data[i : i + step] for i in range(0, len(data), step)]
    return ClientRun(name=name, clips=tuple(clips), frames=frames, sample_rate=rate)


async def drive(
    run: ClientRun,
    urls: Sequence[str],
    *,
    pace: float = 1.0,
    on_started: Callable[[ClientRun], Awaitable[None]] | None = None,
    **session_options: Any,
) -> ClientRun:
    """Stream `run`'s frames through the SDK at `pace` x real time (0: as fast as the SDK
    takes them), then close the stream and collect results until `session.closed`.
    A `SessionError` is recorded in `run.error`, not raised."""
    options: dict[str, Any] = {"max_reconnects": 10, "backoff_s": 0.1, "max_backoff_s": 1.0}
    options.update(session_options)
    session = StreamingSession(
        urls[0], fallback_urls=urls[1:], sample_rate=run.sample_rate, **options
    )
    collector: asyncio.Task[None] | None = None
    run.session = session
    run.started_ms = now_ms()
    try:
        await session.connect()
        assert session.session_id is not None
        run.session_id = session.session_id
        if on_started is not None:
            await on_started(run)
        run.started.set()
        collector = asyncio.create_task(_collect(session, run))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        for i, frame in enumerate(run.frames):
            if pace > 0:
                await asyncio.sleep(max(0.0, t0 + i * FRAME_MS / 1000 / pace - loop.time()))
            await session.send_audio(frame)
            run._sent_one(len(frame))
            run.most_buffered = max(run.most_buffered, session.unacked_frames)
        await session.close_stream()
        await collector
    except SessionError as exc:
        run.error = f"{type(exc).__name__}: {exc} (close {exc.close_code}, code {exc.code})"
    finally:
        if collector is not None and not collector.done():
            collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await collector
        run.reconnects = session.reconnects
        run.acked_seq = session.acked_seq
        run.rewound = session.rewound_frames
        run.ended_ms = now_ms()
        await session.aclose()
    return run


async def _collect(session: StreamingSession, run: ClientRun) -> None:
    try:
        async for result in session.results():
            if isinstance(result, Transcript):
                if result.is_final:
                    run.finals.append(result)
                    run.final_ms.append(now_ms())
                else:
                    run.interims += 1
            elif isinstance(result, Closed):
                run.closed = result
                return
    except SessionError as exc:
        run.error = run.error or f"{type(exc).__name__}: {exc} (close {exc.close_code})"


# --- Redis-side recorders ------------------------------------------------------------------


@dataclass(frozen=True)
class Event:
    at_ms: int
    sid: str
    item: Envelope | None  # None: undecodable payload (recorded, counted as a problem)


class EventRecorder:
    """Every message on every session's events channel, as Redis delivered it."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.events: list[Event] = []
        self.reconnects = 0
        self._task: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="event-recorder")
        async with asyncio.timeout(10):
            await self._subscribed.wait()

    async def _run(self) -> None:
        pattern = keys.events_channel(SessionId("*"))
        while True:
            client = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await client.client_setname("fault-recorder")
                await pubsub.psubscribe(pattern)
                self._subscribed.set()
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if msg is None or msg.get("type") != "pmessage":
                        continue
                    sid = keys.parse_session_from_key(msg["channel"].decode()) or ""
                    try:
                        item: Envelope | None = envelope.decode(msg["data"])
                    except EnvelopeError:
                        item = None
                    self.events.append(Event(now_ms(), sid, item))
            except (RedisError, OSError):
                self.reconnects += 1
                await asyncio.sleep(0.1)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()

    def for_session(self, sid: str) -> list[Event]:
        return [e for e in self.events if e.sid == sid]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


@dataclass(frozen=True)
class StoredEntry:
    entry_id: str
    seq: int  # -1 for a control mark
    digest: str
    control: str = ""


class AudioRecorder:
    """Tails `ss:{sid}:audio` from its first entry until the close mark is stored."""

    def __init__(self, redis_url: str, sid: SessionId) -> None:
        self.redis_url = redis_url
        self.sid = sid
        self.entries: list[StoredEntry] = []
        self.undecodable = 0
        self.closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"audio-recorder-{self.sid[:8]}")

    async def _run(self) -> None:
        last = b"0-0"
        stream = keys.audio(self.sid)
        while not self.closed.is_set():
            client = aioredis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
            try:
                while not self.closed.is_set():
                    reply = await client.xread({stream: last}, count=500, block=200)
                    for _key, entries in reply or []:
                        for entry_id, fields in entries:
                            last = entry_id
                            self._record(entry_id.decode(), fields)
            except (RedisError, OSError):
                await asyncio.sleep(0.1)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await client.aclose()

    def _record(self, entry_id: str, fields: dict[bytes, bytes]) -> None:
        try:
            item = envelope.decode_entry(fields)
        except EnvelopeError:
            self.undecodable += 1
            return
        if isinstance(item, AudioChunk):
            self.entries.append(StoredEntry(entry_id, item.seq, digest(item.pcm)))
        elif isinstance(item, Control):
            self.entries.append(StoredEntry(entry_id, -1, "", item.kind))
            if item.kind == "close":
                self.closed.set()

    def forget_after(self, entry_id: str) -> int:
        """Drop entries newer than `entry_id` (Redis lost them in a rollback); returns how
        many were dropped."""

        def key(eid: str) -> tuple[int, int]:
            ms, _, seq = eid.partition("-")
            return int(ms), int(seq)

        keep = [e for e in self.entries if key(e.entry_id) <= key(entry_id)]
        dropped = len(self.entries) - len(keep)
        self.entries = keep
        return dropped

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Observers:
    """An event recorder for all sessions plus an audio recorder per session."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.events = EventRecorder(redis_url)
        self.audio: dict[str, AudioRecorder] = {}

    async def start(self) -> None:
        await self.events.start()

    async def on_started(self, run: ClientRun) -> None:
        """Pass as `drive(on_started=...)`: start tailing the new session's audio."""
        recorder = AudioRecorder(self.redis_url, run.sid)
        self.audio[run.session_id] = recorder
        recorder.start()

    async def stop(self) -> None:
        for recorder in self.audio.values():
            await recorder.stop()
        await self.events.stop()
