"""`streamscribe loadtest`: many concurrent sessions against a deployment, measured.

A lean protocol-v1 client on `websockets` and `shared/protocol.py`, cheap per session:
one task per session receives and timestamps the server's messages, and one shared
pacing task sends every session's audio frames on schedule (a heap of due times), so
nothing is scheduled or logged per frame. Each clip's frames are serialized (and masked,
as a client must) into WebSocket binary frames once, when the clip is loaded; the pacer
writes those bytes straight to each session's transport, so that the load generator
leaves the cores to the service it measures. Statistics live in `shared/loadstats.py`.

Unlike the SDK (`shared/client.py`) this client never reconnects: a dropped connection or a
drain (1012) is what a load test must report, so the session counts as failed with its
close code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import heapq
import itertools
import json
import math
import signal
import ssl
import sys
import time
import traceback
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar, cast
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.frames import Frame, Opcode
from websockets.protocol import Event, State

from shared.envelope import Closed, Transcript
from shared.errors import ConfigError, ProtocolViolation
from shared.loadstats import LoadRecorder, LoadReport, RunInfo, SessionRecorder
from shared.protocol import (
    ACK_TEXT,
    Ack,
    CloseStream,
    ErrorMessage,
    Queued,
    SessionStarted,
    build_client_message,
    parse_server_text,
    valid_language,
)
from shared.wavfile import read_wav
from shared.wsframes import frame_bounds, frame_limit, framing_state

KNOWN_SERVER_TYPES = frozenset(
    {"session.started", "session.resumed", "ack", "transcript", "queued", "session.closed", "error"}
)
BACKPRESSURE_RETRY_S = 0.005
CLOSE_STREAM = build_client_message(CloseStream())
T = TypeVar("T")


class UsageError(Exception):
    """Bad flags or inputs: exit code 2."""


# --- inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    """One WAV file, cut into frames once and shared by every session that streams it."""

    path: str
    sample_rate: int
    channels: int
    encoding: str
    frames: tuple[bytes, ...]
    #: `frames`, each as a whole masked WebSocket binary frame, ready for the socket.
    wire: tuple[bytes, ...]
    ends_s: tuple[float, ...]  # audio seconds at the last sample of each frame (one copy)
    duration_s: float
    reference: str | None  # text of FILE.txt beside FILE.wav, if any

    def frame_end_s(self, k: int) -> float:
        """Session audio seconds at the end of frame k of this clip played in a loop."""
        copy, i = divmod(k, len(self.frames))
        return copy * self.duration_s + self.ends_s[i]


def wire_frame(payload: bytes) -> bytes:
    """One binary message as a client sends it: a single masked frame. The masking key is
    drawn once per clip frame, not per send; the server only requires a mask (RFC 6455's
    advice on unpredictable keys guards intermediaries, and this is a load generator)."""
    return Frame(Opcode.BINARY, payload).serialize(mask=True, extensions=[])


SAMPLE_NOTE = (
    "no --audio given: streaming the 4 built-in sample utterances (synthetic speech, "
    "26 s in all, with reference texts); for figures that hold for your users, give "
    "recordings of real speech"
)


def sample_audio() -> tuple[str, ...]:
    """What `--audio` defaults to: the four utterances every worker ships to measure its
    engine at start-up (worker/samples.py), as paths."""
    from worker.samples import clip_files

    paths = tuple(str(f) for f in clip_files())
    if not all(Path(p).is_file() for p in paths):
        raise UsageError("the built-in sample audio is not installed as files: give --audio")
    return paths


def load_clip(path: str, frame_ms: int) -> Clip:
    try:
        audio = read_wav(path)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot use audio file {path}: {exc}") from None
    frames = tuple(audio.frames(frame_ms))
    if not frames:
        raise UsageError(f"audio file {path} holds no audio")
    ends, total = [], 0
    for frame in frames:
        total += len(frame)
        ends.append(total / audio.bytes_per_second)
    ref_path = Path(path).with_suffix(".txt")
    reference = ref_path.read_text().strip() if ref_path.is_file() else None
    return Clip(
        path=path,
        sample_rate=audio.sample_rate,
        channels=audio.channels,
        encoding=audio.encoding,
        frames=frames,
        wire=tuple(wire_frame(frame) for frame in frames),
        ends_s=tuple(ends),
        duration_s=ends[-1],
        reference=reference or None,
    )


@dataclass(frozen=True)
class Options:
    url: str
    sessions: int
    audio: tuple[str, ...]
    pace: float = 1.0
    ramp_s: float = 0.0
    duration_s: float | None = None
    drain_timeout_s: float = 60.0
    frame_ms: int = 100
    interim_results: bool = True
    language: str | None = None
    high_share: float = 0.0  # share of the sessions that ask for priority=high
    api_key: str | None = None
    insecure: bool = False
    cafile: str | None = None
    max_unacked_frames: int = 64
    open_timeout_s: float = 10.0
    tick_ms: float = 5.0

    def __post_init__(self) -> None:
        checks = (
            (self.sessions >= 1, f"--sessions must be at least 1, got {self.sessions}"),
            (self.pace >= 0, f"--pace must be >= 0 (0 = as fast as acks allow), got {self.pace}"),
            (self.ramp_s >= 0, f"--ramp-s must be >= 0, got {self.ramp_s}"),
            (
                self.duration_s is None or self.duration_s > 0,
                f"--duration-s must be > 0, got {self.duration_s}",
            ),
            (
                self.drain_timeout_s > 0,
                f"--drain-timeout-s must be > 0, got {self.drain_timeout_s}",
            ),
            (1 <= self.frame_ms <= 5000, f"--frame-ms must be 1..5000, got {self.frame_ms}"),
            (self.max_unacked_frames >= 1, "--max-unacked-frames must be at least 1"),
            (self.open_timeout_s > 0, "--open-timeout-s must be > 0"),
            (0 <= self.tick_ms <= 100, f"--tick-ms must be 0..100, got {self.tick_ms}"),
            (bool(self.audio), "give at least one --audio file"),
            (
                0 <= self.high_share <= 1,  # NaN fails too
                f"--high-share must be 0..1, got {self.high_share}",
            ),
            (
                self.language is None or valid_language(self.language),
                f"--language must be an ISO 639 code such as 'de', or 'auto', "
                f"got {self.language!r}",
            ),
            (
                urlsplit(self.url).scheme in ("ws", "wss"),
                f"--url must be ws:// or wss://, got {self.url!r}",
            ),
        )
        for ok, message in checks:
            if not ok:
                raise UsageError(message)

    def copies(self, clip: Clip) -> int:
        """Whole copies of the clip one session streams (whole, so references stay exact)."""
        if self.duration_s is None:
            return 1
        return max(1, math.ceil(self.duration_s / clip.duration_s - 1e-9))

    def deadline_s(self, clips: Sequence[Clip]) -> float:
        """Seconds after the start when everything still running is cancelled."""
        longest = max(self.copies(c) * c.duration_s for c in clips)
        streaming = longest / self.pace if self.pace > 0 else 0.0
        return self.ramp_s + streaming + self.drain_timeout_s

    def ssl_context(self) -> ssl.SSLContext | None:
        """One context for every connection of the run."""
        if not self.url.startswith("wss:"):
            return None
        ctx = ssl.create_default_context(cafile=self.cafile)
        if self.insecure:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def priority(self, index: int) -> str:
        """Session `index`'s lane: `high` for floor(sessions x high_share) of them, spread
        evenly through the ramp (session i is high where floor(i x share) steps up at
        i + 1: with 0.25, sessions 3, 7, 11, ...)."""
        share = self.high_share
        steps = math.floor((index + 1) * share + 1e-9) > math.floor(index * share + 1e-9)
        return "high" if steps else "normal"

    def session_url(self, clip: Clip, priority: str = "normal") -> str:
        parts = urlsplit(self.url)
        params: dict[str, Any] = {
            "sample_rate": clip.sample_rate,
            "encoding": clip.encoding,
            "channels": clip.channels,
        }
        if not self.interim_results:
            params["interim_results"] = "false"
        if self.language is not None:
            params["language"] = self.language
        if priority != "normal":
            params["priority"] = priority
        path = parts.path if parts.path not in ("", "/") else "/v1/listen"
        return urlunsplit(parts._replace(path=path, query=urlencode(params)))


# --- sending: one pacing task for every session ----------------------------------------


class Stream:
    """The sending side of one session; only `Pacer` calls `pump`."""

    __slots__ = ("_t0", "clip", "closed", "next_frame", "pace", "rec", "start", "total", "waiting",
                 "window", "ws")  # fmt: skip

    def __init__(
        self,
        ws: ClientConnection,
        rec: SessionRecorder,
        clip: Clip,
        copies: int,
        options: Options,
        start: float,
        t0: float,
    ) -> None:
        self.ws, self.rec, self.clip = ws, rec, clip
        self.total = copies * len(clip.frames)
        self.pace, self.window = options.pace, options.max_unacked_frames
        self.start, self._t0 = start, t0
        self.next_frame = 0
        self.waiting = False  # blocked on the unacked window: the next ack reschedules it
        self.closed = False  # close_stream sent, or the connection ended

    def due(self, k: int) -> float | None:
        """Monotonic time when frame k is due: when its last sample would have been spoken."""
        if self.pace == 0:
            return None
        return self.start + self.clip.frame_end_s(k) / self.pace

    async def pump(self, now: float) -> float | None:
        """Send every frame that is due; returns when to call again (None: not by time)."""
        ws, rec, wire = self.ws, self.rec, self.clip.wire
        transport = ws.transport
        try:
            while self.next_frame < self.total and not self.closed:
                due = self.due(self.next_frame)
                if due is not None and due > now:
                    return due
                if rec.unacked >= self.window:
                    self.waiting = True
                    return None
                frame = wire[self.next_frame % len(wire)]
                # Never let one slow socket stall the pacer for everyone: skip it this time.
                if transport.get_write_buffer_size() + len(frame) > ws.write_limit_high:
                    return now + BACKPRESSURE_RETRY_S
                if ws.protocol.state is not State.OPEN:
                    raise ConnectionClosed(None, None)  # closing: no more data frames
                # The pre-built frame, written as `ws.send` would after framing it: whole
                # frames only, so websockets' own writes (pings, close) never interleave.
                transport.write(frame)
                sent = time.monotonic() - self._t0
                rec.frame_sent(
                    sent,
                    self.clip.frame_end_s(self.next_frame),
                    None if due is None else due - self._t0,
                )
                self.next_frame += 1
            if not self.closed:
                self.closed = True
                await ws.send(CLOSE_STREAM)
                rec.close_stream_sent(time.monotonic() - self._t0)
        except ConnectionClosed:
            self.closed = True  # the receiving task records how it ended
        return None


class Pacer:
    """One task that sends the audio of every session, earliest due first.

    It wakes at most once per `tick_s` and then sends every frame that is due, as an audio
    callback of a fixed period would: a frame goes out up to `tick_s` after it is due
    (never before), and hundreds of sessions' frames cost one wake-up, not one each.
    With `tick_s` 0 it wakes for each due time."""

    def __init__(self, tick_s: float = 0.0) -> None:
        self._heap: list[tuple[float, int, Stream]] = []
        self._order = itertools.count()
        self._wake: asyncio.Future[None] | None = None
        self._tick_s = tick_s
        #: Wake-ups so far (for tests and the docs' figures).
        self.wakeups = 0

    def schedule(self, at: float, stream: Stream) -> None:
        heapq.heappush(self._heap, (at, next(self._order), stream))
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            now = time.monotonic()
            self.wakeups += 1
            handled = 0
            while self._heap and self._heap[0][0] <= now:
                _, _, stream = heapq.heappop(self._heap)
                again = await stream.pump(time.monotonic())
                if again is not None:
                    heapq.heappush(self._heap, (again, next(self._order), stream))
                handled += 1
                if handled % 200 == 0:
                    await asyncio.sleep(0)  # let acks in while many sessions are due
            self._wake = loop.create_future()
            timer = None
            if self._heap:
                at = max(self._heap[0][0], now + self._tick_s)
                timer = loop.call_later(max(0.0, at - time.monotonic()), _resolve, self._wake)
            try:
                await self._wake
            finally:
                if timer is not None:
                    timer.cancel()
                self._wake = None


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


# --- receiving: one task per session ---------------------------------------------------


class Run:
    """What every session task of one run shares."""

    def __init__(self, options: Options, clips: Sequence[Clip]) -> None:
        self.options = options
        self.clips = clips
        self.recorder = LoadRecorder()
        self.pacer = Pacer(options.tick_ms / 1000)
        self.ssl = options.ssl_context()
        self.headers = {"Authorization": f"Bearer {options.api_key}"} if options.api_key else None
        self.t0 = time.monotonic()
        self.plan: list[tuple[Clip, float]] = []  # per session: its clip, its start offset
        for i in range(options.sessions):
            clip = clips[i % len(clips)]
            copies = options.copies(clip)
            ref = " ".join([clip.reference] * copies) if clip.reference else None
            self.recorder.session(Path(clip.path).name, ref, options.priority(i))
            self.plan.append((clip, options.ramp_s * i / options.sessions))

    def clock(self) -> float:
        return time.monotonic() - self.t0

    async def session(self, index: int) -> None:
        clip, start_offset = self.plan[index]
        rec = self.recorder.sessions[index]
        await asyncio.sleep(max(0.0, start_offset - self.clock()))
        rec.connecting(self.clock())
        handler = SessionHandler(self, clip, rec)
        try:
            ws = await connect(
                self.options.session_url(clip, rec.priority),
                ssl=self.ssl,
                additional_headers=self.headers,
                compression=None,
                open_timeout=self.options.open_timeout_s,
                close_timeout=2,
                max_size=2**20,
                create_connection=cast(
                    "type[ClientConnection]", functools.partial(CallbackConnection, handler)
                ),
            )
        except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
            rec.connect_failed(self.clock(), _describe(exc))
            return
        try:
            await ws.wait_closed()
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await ws.close(1001, "load test deadline")
            raise
        finally:
            if handler.stream is not None:
                handler.stream.closed = True
        if handler.error is not None:
            raise handler.error
        rec.connection_closed(self.clock(), ws.close_code or 1006, ws.close_reason or "")

    async def guarded_session(self, index: int) -> None:
        """A bug in the client must not end the run silently or take other sessions down."""
        try:
            await self.session(index)
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            self.recorder.sessions[index].connect_failed(
                self.clock(), f"load tester error: {type(exc).__name__}"
            )


class SessionHandler:
    """What one session does with each message from the server. Called from the
    connection's protocol callback (`CallbackConnection`): no task wakes per message."""

    def __init__(self, run: Run, clip: Clip, rec: SessionRecorder) -> None:
        self.run, self.clip, self.rec = run, clip, rec
        self.stream: Stream | None = None
        self.error: Exception | None = None  # a bug in this client: ends the session

    def __call__(self, ws: ClientConnection, raw: str | bytes) -> None:
        run, rec = self.run, self.rec
        t = run.clock()
        msg = _parse(raw, rec)
        stream = self.stream
        if isinstance(msg, Ack):
            rec.ack(t, msg.seq)
            if stream is not None and stream.waiting and rec.unacked < stream.window:
                stream.waiting = False
                run.pacer.schedule(time.monotonic(), stream)
        elif isinstance(msg, Transcript):
            rec.transcript(t, msg.result_id, msg.is_final, msg.start, msg.end, msg.text)
        elif isinstance(msg, SessionStarted) and stream is None:
            rec.started(t, msg.session_id)
            copies = run.options.copies(self.clip)
            self.stream = Stream(ws, rec, self.clip, copies, run.options, time.monotonic(), run.t0)
            run.pacer.schedule(time.monotonic(), self.stream)
        elif isinstance(msg, Closed):
            rec.session_closed(t, msg.reason, msg.audio_seconds, msg.final_results)
        elif isinstance(msg, ErrorMessage):
            rec.error_message(t, msg.code)
        elif isinstance(msg, Queued):
            rec.queued(t, msg.position)


class MessageHandler(Protocol):
    """Takes each whole message of a `CallbackConnection`; `error` records a failure of
    its own (the connection is then aborted)."""

    error: Exception | None

    def __call__(self, ws: ClientConnection, raw: str | bytes) -> None: ...


class CallbackConnection(ClientConnection):
    """A client connection that hands each whole message to `handler` from the protocol
    callback, instead of queueing it for a task to `recv`.

    The load generator gets an ack per frame per session: with hundreds of sessions,
    waking each session's task for each ack (and websockets' message assembly) was a
    fifth of its CPU. Fragmented messages are joined here; control frames (ping, pong,
    close) are left to websockets.

    Framing: once the connection is open, incoming bytes are cut into whole frames here
    (`shared.wsframes`), and a frame that is a whole unmasked text message within
    `max_size`, in valid UTF-8, with no fragmented message in progress, goes to `handler`
    without websockets' generator-based parser (most of the rest of the load generator's
    receiving cost at an ack per frame). Every other frame goes to websockets whole, as
    the gateway does with its clients' audio (`gateway/wsconn.py`); connections opened
    with an extension (compression) leave all framing to websockets."""

    def __init__(self, handler: MessageHandler, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.handler = handler
        self._parts: list[bytes] = []
        self._text = False
        self._framing: bool | None = None  # None until the connection is open
        self._rest = b""  # the start of a frame whose end has not arrived yet
        #: Messages taken by the framing here and frames fed to websockets (for tests).
        self.direct = self.slow_frames = 0

    def data_received(self, data: bytes) -> None:
        framing = self._framing
        if framing is None:
            framing = self._framing = framing_state(self.protocol)
        if not framing:
            super().data_received(data)  # the handshake, or websockets keeps the framing
            return
        buf = self._rest + data if self._rest else data
        pos = self._frames(buf)
        self._rest = buf[pos:] if 0 <= pos < len(buf) else b""

    def _frames(self, buf: bytes) -> int:
        """Take or feed every whole frame in `buf`; where the first incomplete one
        starts, or -1 if framing stopped and websockets was given everything."""
        protocol = self.protocol
        limit = frame_limit(protocol)
        pos, size = 0, len(buf)
        while pos < size:
            bounds = frame_bounds(buf, pos)
            if bounds is None:
                break
            start, end = bounds
            if limit is not None and end - start > limit:
                # websockets refuses it at its header, before its payload arrives.
                self._framing = False
                super().data_received(buf[pos:])
                return -1
            if end > size:
                break
            text: str | None = None
            if (
                buf[pos] == 0x81  # FIN, no reserved bits, text
                and not buf[pos + 1] & 0x80  # unmasked, as a server's frames must be
                and not self._parts
                and protocol.state is State.OPEN
            ):
                with contextlib.suppress(UnicodeDecodeError):
                    text = buf[start:end].decode()
            if text is not None:
                self.direct += 1
                self._deliver(text)
            else:
                self.slow_frames += 1
                super().data_received(buf[pos:end])
            pos = end
        return pos

    def eof_received(self) -> None:
        if self._rest:
            rest, self._rest = self._rest, b""
            super().data_received(rest)  # websockets ends it as a truncated frame
        super().eof_received()

    def process_event(self, event: Event) -> None:
        if self.response is None or not isinstance(event, Frame):
            super().process_event(event)  # the handshake
            return
        opcode = event.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            self._parts, self._text = [bytes(event.data)], opcode is Opcode.TEXT
        elif opcode is Opcode.CONT:
            self._parts.append(bytes(event.data))
        else:
            super().process_event(event)
            return
        if not event.fin:
            return
        data = b"".join(self._parts)
        self._parts = []
        self._deliver(_text_or_bytes(data) if self._text else data)

    def _deliver(self, message: str | bytes) -> None:
        if self.handler.error is not None:
            return
        try:
            self.handler(self, message)
        except Exception as exc:  # a bug here: end this session, not the whole run
            self.handler.error = exc
            self.transport.abort()


def _text_or_bytes(data: bytes) -> str | bytes:
    """A text message as str. Invalid UTF-8 stays bytes, which `_parse` counts as the
    anomaly `binary_server_frame` (a server that sends it is broken either way)."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return data


#: How streamscribe's gateway writes an ack (`ACK_TEXT`), up to seq.
_ACK_HEAD = ACK_TEXT.split("%d")[0]


def _parse(raw: str | bytes, rec: SessionRecorder) -> object:
    if isinstance(raw, bytes):
        rec.anomaly("binary_server_frame")
        return None
    if raw.startswith(_ACK_HEAD) and raw.endswith("}"):
        # An ack per frame per session: read in the gateway's own layout without the JSON
        # decoder and the message checks. Any other layout is parsed in full below.
        digits = raw[len(_ACK_HEAD) : -1]
        if digits.isascii() and digits.isdigit():
            return Ack(int(digits))
    try:
        return parse_server_text(raw)
    except ProtocolViolation:
        with contextlib.suppress(ValueError, AttributeError):
            if json.loads(raw).get("type") not in KNOWN_SERVER_TYPES:
                return None  # a protocol extension this client does not know: ignore it
        rec.anomaly("malformed_server_message")
        return None


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:120]


async def _progress(run: Run, out: TextIO, tty: bool, interval_s: float) -> None:
    rec = run.recorder
    last_t, last_frames, last_acks = run.clock(), 0, 0
    while True:
        await asyncio.sleep(interval_s)
        t = run.clock()
        span = max(t - last_t, 1e-9)
        waiting = sum(1 for s in rec.sessions if s.stage in ("pending", "connecting"))
        line = (
            f"[{t:7.1f}s] sessions {rec.live} live, {rec.completed} done, {rec.failed} failed, "
            f"{waiting} starting | {(rec.frames_sent - last_frames) / span:8.1f} frames/s | "
            f"{(rec.acks - last_acks) / span:8.1f} acks/s | finals {rec.finals} | "
            f"errors {rec.error_count}"
        )
        out.write(f"\r\x1b[2K{line}" if tty else f"{line}\n")
        out.flush()
        last_t, last_frames, last_acks = t, rec.frames_sent, rec.acks


async def run_load(
    options: Options,
    clips: Sequence[Clip],
    *,
    progress: TextIO | None = None,
    progress_tty: bool = False,
    stop: asyncio.Event | None = None,
) -> tuple[LoadReport, LoadRecorder]:
    """Run the load test to completion, the deadline, or `stop`; always returns a report."""
    run = Run(options, clips)
    pacer = asyncio.create_task(run.pacer.run(), name="loadtest-pacer")
    sessions = [
        asyncio.create_task(run.guarded_session(i), name=f"loadtest-session-{i}")
        for i in range(options.sessions)
    ]
    helpers: list[asyncio.Task[Any]] = [pacer]
    if progress is not None:
        interval = 1.0 if progress_tty else 5.0
        helpers.append(asyncio.create_task(_progress(run, progress, progress_tty, interval)))
    everything = asyncio.gather(*sessions, return_exceptions=True)
    waiters: set[asyncio.Future[Any]] = {everything}
    if stop is not None:
        stopper = asyncio.ensure_future(stop.wait())
        helpers.append(stopper)
        waiters.add(stopper)
    try:
        await asyncio.wait(
            waiters, timeout=options.deadline_s(clips), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        for task in sessions:
            task.cancel()
        # Cancelled sessions close their sockets (bounded by close_timeout).
        await asyncio.gather(*sessions, return_exceptions=True)
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        if progress is not None and progress_tty:
            progress.write("\n")
    from shared.scoring import wer

    info = RunInfo(
        url=options.url,
        sessions=options.sessions,
        audio=tuple(options.audio),
        pace=options.pace,
        ramp_s=options.ramp_s,
        duration_s=options.duration_s,
        frame_ms=options.frame_ms,
        interim_results=options.interim_results,
        language=options.language,
        high_share=options.high_share,
    )
    interrupted = stop is not None and stop.is_set()
    report = run.recorder.report(
        info,
        run.clock(),
        interrupted=interrupted,
        wer_fn=functools.partial(wer, language=options.language),
    )
    return report, run.recorder


# --- command line ----------------------------------------------------------------------


def add_loadtest_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "loadtest",
        help="open many concurrent sessions against a deployment and measure latency",
        description="Open N concurrent sessions (started evenly over --ramp-s), stream WAV "
        "files at --pace x real time, and print latency percentiles, errors by close code, "
        "audio processed and WER (where FILE.txt holds the reference). Session i streams "
        "file i mod the number of files. Without --url, uses the service started by "
        "`streamscribe up` on this machine. Exit code 0: every session completed without "
        "errors; 1: some did not; 2: usage error. See docs/loadtest.md.",
    )
    p.add_argument("--url", help="gateway URL, e.g. wss://host:8765/v1/listen")
    p.add_argument("--sessions", type=int, default=10, help="concurrent sessions (default 10)")
    p.add_argument(
        "--audio",
        nargs="+",
        metavar="FILE",
        help="WAV file(s) to stream (default: 4 built-in sample utterances, synthetic "
        "speech; real recordings give figures that hold for real users)",
    )
    p.add_argument(
        "--pace",
        type=float,
        default=1.0,
        help="multiple of real time; 0 = as fast as acks allow (default 1.0)",
    )
    p.add_argument(
        "--ramp-s", type=float, default=0.0, help="start sessions evenly over this many seconds"
    )
    p.add_argument(
        "--duration-s",
        type=float,
        help="loop each session's file to at least this much audio (whole copies); "
        "default: stream it once",
    )
    p.add_argument(
        "--drain-timeout-s",
        type=float,
        default=60.0,
        help="after ramp + streaming, wait this long for sessions to close before cancelling "
        "them (default 60); with --pace 0 it also bounds the streaming",
    )
    p.add_argument("--frame-ms", type=int, default=100, help="audio per frame (default 100)")
    p.add_argument("--no-interim", action="store_true", help="ask for finals only")
    p.add_argument(
        "--language",
        help="the sessions' language: an ISO 639 code (de, fr, ...) or auto; needs a "
        "multilingual model such as base; WER then uses Whisper's basic text normalizer "
        "(default: the service's language, en)",
    )
    p.add_argument(
        "--high-share",
        type=float,
        default=0.0,
        metavar="F",
        help="share of the sessions (0..1) opened with priority=high, spread evenly through "
        "the ramp; the table then shows each priority lane (default 0)",
    )
    p.add_argument(
        "--max-unacked-frames",
        type=int,
        default=64,
        help="frames a session may have in flight without an ack (default 64)",
    )
    p.add_argument(
        "--open-timeout-s", type=float, default=10.0, help="connection set-up limit (default 10)"
    )
    p.add_argument(
        "--tick-ms",
        type=float,
        default=5.0,
        help="the sender's clock: due frames are sent together, at most this late "
        "(0..100, default 5; 0 = each at its own due time)",
    )
    p.add_argument(
        "--insecure", action="store_true", help="do not verify the server's TLS certificate"
    )
    p.add_argument("--cafile", help="trust this CA/certificate file (PEM)")
    p.add_argument("--api-key", help="API key (default: $STREAMSCRIBE_API_KEY)")
    p.add_argument("--json", metavar="OUT", help="write every figure and per-session summaries")
    p.add_argument(
        "--plot", metavar="OUT.png", help="draw latency over time and distributions (matplotlib)"
    )
    p.add_argument("--no-progress", action="store_true", help="no live progress line on stderr")
    p.add_argument("--state-dir", default=None, help="where `up` wrote up.json")
    return p


def options_from_args(args: argparse.Namespace) -> Options:
    from shared.cli import find_up
    from shared.config import client_api_key

    url, cafile = args.url, args.cafile
    if url is None:
        try:
            info = find_up(args.state_dir)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
        url = info["url"]
        cafile = cafile or info.get("cafile")
    for out in (args.json, args.plot):
        if out is not None and not Path(out).resolve().parent.is_dir():
            raise UsageError(f"cannot write {out}: no such directory")
    if args.plot is not None:
        from shared.loadplot import require_matplotlib

        require_matplotlib()
    return Options(
        url=url,
        sessions=args.sessions,
        audio=tuple(args.audio) if args.audio else sample_audio(),
        pace=args.pace,
        ramp_s=args.ramp_s,
        duration_s=args.duration_s,
        drain_timeout_s=args.drain_timeout_s,
        frame_ms=args.frame_ms,
        interim_results=not args.no_interim,
        language=args.language,
        high_share=args.high_share,
        api_key=args.api_key or client_api_key(),
        insecure=args.insecure,
        cafile=cafile,
        max_unacked_frames=args.max_unacked_frames,
        open_timeout_s=args.open_timeout_s,
        tick_ms=args.tick_ms,
    )


def prepare(args: argparse.Namespace) -> tuple[Options, list[Clip]]:
    """Validate flags and read the audio (blocking file I/O); UsageError on bad input."""
    options = options_from_args(args)
    return options, [load_clip(path, options.frame_ms) for path in options.audio]


def write_outputs(args: argparse.Namespace, report: LoadReport, recorder: LoadRecorder) -> None:
    if args.json is not None:
        Path(args.json).write_text(report.to_json() + "\n")
    if args.plot is not None:
        from shared.loadplot import write_plot

        write_plot(recorder, report, args.plot)


async def loadtest_main(
    args: argparse.Namespace,
    *,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """The whole command inside a running loop; returns the exit code."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        options, clips = await asyncio.to_thread(prepare, args)
    except UsageError as exc:
        err.write(f"streamscribe loadtest: error: {exc}\n")
        return 2
    if not args.audio:
        err.write(f"streamscribe loadtest: {SAMPLE_NOTE}\n")
    report, recorder = await run_load(
        options,
        clips,
        progress=None if args.no_progress else err,
        progress_tty=err.isatty(),
        stop=stop,
    )
    out.write(report.render_table())
    out.flush()
    await asyncio.to_thread(write_outputs, args, report, recorder)
    for path in (args.json, args.plot):
        if path is not None:
            err.write(f"wrote {path}\n")
    return 0 if report.all_completed else 1


def run_loadtest(args: argparse.Namespace) -> int:
    """CLI entry: uvloop where available, Ctrl-C/SIGTERM stop the run and still report."""
    _raise_fd_limit(args.sessions + 64)

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        try:
            return await loadtest_main(args, stop=stop)
        finally:
            for sig in signals:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)

    return _run(main())


def _run(coro: Coroutine[Any, Any, T]) -> T:
    from shared.runtime import tune_gc

    tune_gc()
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _raise_fd_limit(needed: int) -> None:
    """One socket per session: lift the soft open-files limit toward the hard one."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            sys.stderr.write(
                f"streamscribe loadtest: warning: open-files limit {target} < {needed}; "
                "raise it (ulimit -n) for this many sessions\n"
            )
