"""Python client SDK for protocol v1, used by `streamscribe transcribe` and tests.

    async with StreamingSession("wss://host:8765/v1/listen", sample_rate=16000) as s:
        await s.send_audio(pcm_bytes)          # as many times as needed
        await s.close_stream()
        async for result in s.results():       # Transcript (interim/final), then Closed
            print(result)

The session checks the real connection state (WebSocket pings notice a dead link), keeps
every unacknowledged audio frame, and when the link drops (or a gateway drains with 1012)
it reconnects with exponential backoff and jitter, up to `max_reconnects` attempts per
outage, to its URL or the next of `fallback_urls`, resumes the session and re-sends from
the server's `next_seq`, so no audio and no final is lost or duplicated. While it is
disconnected `send_audio` keeps accepting audio into that buffer, up to
`max_buffered_frames` unacknowledged frames (then `AudioBufferFull`). Errors that
retrying cannot fix (1008, 1009, 4400, 4401, 4403, 4404, 4409, 4429, and HTTP 400, 401,
403, 404 refusals of the upgrade) end the session with `SessionError`. After a 4429 (audio
past a rate limit or an API key's audio budget) the service still has every frame it
acknowledged: the SDK resumes once without sending more audio, closes the stream and
delivers the finals of that audio before the error (`collect_after_limit_s`).
docs/client.md has a runnable example.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException
from websockets.protocol import State

from shared.envelope import Closed, Transcript
from shared.protocol import (
    Ack,
    CloseStream,
    ErrorMessage,
    Finalize,
    Keepalive,
    Queued,
    Resume,
    SessionResumed,
    SessionStarted,
    build_client_message,
    parse_server_text,
)

log = logging.getLogger(__name__)

# 4409: another connection resumed the session; reconnecting would only fight it.
FATAL_CLOSE_CODES = frozenset({1008, 1009, 4400, 4401, 4403, 4404, 4409, 4429})
# Audio past a rate limit or an audio budget: what was acknowledged is kept, so its finals
# are collected (`StreamingSession._collect_after_limit`) before the error.
LIMIT_CLOSE_CODE = 4429
# An upgrade refused with one of these HTTP statuses is treated like its close code.
FATAL_HTTP_STATUSES = {400: 4400, 401: 4401, 403: 4403, 404: 4404}
CLOSE_TIMEOUT_S = 2.0  # closing handshake with a peer that may be gone
Result = Transcript | Closed


def _fatal_code(exc: BaseException) -> int | None:
    """The close code that makes a failed reconnect attempt final, if any."""
    if isinstance(exc, InvalidStatus):
        return FATAL_HTTP_STATUSES.get(exc.response.status_code)
    if isinstance(exc, ConnectionClosed) and exc.rcvd is not None:
        return exc.rcvd.code if exc.rcvd.code in FATAL_CLOSE_CODES else None
    return None


def backoff_delay(attempt: int, backoff_s: float, max_backoff_s: float, jitter: float) -> float:
    """Seconds to wait before reconnect attempt `attempt` (1, 2, ...): `backoff_s` doubling
    per attempt, capped at `max_backoff_s`, with "equal jitter": `jitter` in [0, 1) picks
    a point in the upper half, so clients cut off together do not come back together."""
    base = min(max_backoff_s, backoff_s * 2.0 ** min(attempt - 1, 62))
    return base * (0.5 + jitter / 2)


class SessionError(Exception):
    """The session ended with an error that reconnecting cannot fix."""

    def __init__(
        self, message: str, close_code: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.code = code
        #: After a 4429, the summary of the session as closed once its finals were
        #: collected (the audio the service kept); None if they could not be.
        self.closed: Closed | None = None


class AudioBufferFull(SessionError):
    """`send_audio` refused a frame: `max_buffered_frames` frames are already waiting for
    an acknowledgement (the connection has been down, or the service behind, too long).
    The frame was not taken; the session is still usable."""


class StreamingSession:
    def __init__(
        self,
        url: str,
        *,
        sample_rate: int = 16000,
        encoding: str = "pcm_s16le",
        channels: int = 1,
        language: str | None = None,
        interim_results: bool = True,
        api_key: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        max_reconnects: int = 8,
        backoff_s: float = 0.2,
        max_backoff_s: float = 5.0,
        keepalive_s: float = 10.0,
        open_timeout_s: float = 10.0,
        fallback_urls: Sequence[str] = (),
        max_buffered_frames: int = 3000,
        ping_interval_s: float | None = 10.0,
        ping_timeout_s: float | None = 10.0,
        retain_acked_s: float = 3.0,
        collect_after_limit_s: float = 60.0,
    ) -> None:
        """`max_reconnects`: attempts per outage; `fallback_urls`: other gateways of the
        same service, tried in turn with `url` when reconnecting; `max_buffered_frames`:
        unacknowledged frames kept for re-sending (5 minutes of 100 ms frames by default);
        `ping_interval_s`/`ping_timeout_s`: WebSocket pings that notice a dead link;
        `retain_acked_s`: seconds of acknowledged audio kept to re-send should the service
        lose acknowledged writes (Redis crashing with AOF `everysec` loses up to ~1-2 s);
        `collect_after_limit_s`: after a 4429, how long to wait for the finals of the
        audio the service kept (0: do not collect them)."""
        if max_reconnects < 0:
            raise ValueError(f"max_reconnects must be >= 0, got {max_reconnects}")
        if not 0 < backoff_s <= max_backoff_s:
            raise ValueError("backoff_s must be > 0 and at most max_backoff_s")
        if max_buffered_frames < 1:
            raise ValueError(f"max_buffered_frames must be >= 1, got {max_buffered_frames}")
        if keepalive_s <= 0:
            raise ValueError(f"keepalive_s must be > 0, got {keepalive_s}")
        if retain_acked_s < 0:
            raise ValueError(f"retain_acked_s must be >= 0, got {retain_acked_s}")
        if collect_after_limit_s < 0:
            raise ValueError(f"collect_after_limit_s must be >= 0, got {collect_after_limit_s}")
        self.collect_after_limit_s = collect_after_limit_s
        self.url = url
        self.urls: tuple[str, ...] = (url, *fallback_urls)
        self.params: dict[str, Any] = {
            "sample_rate": sample_rate,
            "encoding": encoding,
            "channels": channels,
        }
        if language:
            self.params["language"] = language
        if not interim_results:
            self.params["interim_results"] = "false"
        self.api_key = api_key
        self.ssl_context = ssl_context
        self.max_reconnects = max_reconnects
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.keepalive_s = keepalive_s
        self.open_timeout_s = open_timeout_s
        self.max_buffered_frames = max_buffered_frames
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.session_id: str | None = None
        self.resume_token: str | None = None
        self.reconnects = 0  # successful resumes
        self.acked_seq = -1
        self.last_queued: int | None = None
        self.last_error: ErrorMessage | None = None  # the server's latest `error` message
        # Seams for tests: how the SDK waits between reconnect attempts, and its jitter.
        self.backoff_sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
        self.jitter: Callable[[], float] = random.random
        self._url_index = 0
        self._failure: SessionError | None = None
        self._ws: ClientConnection | None = None
        self._next_seq = 0
        self._unacked: deque[tuple[int, bytes]] = deque()
        # The newest acknowledged frames, up to `retain_acked_s` of audio (see _resend).
        self._acked_tail: deque[tuple[int, bytes]] = deque()
        self._acked_tail_bytes = 0
        width = 4 if encoding == "pcm_f32le" else 2
        self._retain_bytes = int(retain_acked_s * sample_rate * channels * width)
        self.rewound_frames = 0  # acknowledged frames re-sent because the service lost them
        self._last_final = -1
        self._closing_sent = False
        self._results: asyncio.Queue[Result | BaseException] = asyncio.Queue()
        self._done = asyncio.Event()
        self._connected = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._last_sent = 0.0

    # --- connection management ---------------------------------------------------------

    async def __aenter__(self) -> StreamingSession:
        await self.connect()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _url(self, resume: bool) -> str:
        parts = urlsplit(self.urls[self._url_index])
        params = dict(self.params)
        if resume:
            params["session_id"] = self.session_id
        return urlunsplit(parts._replace(query=urlencode(params)))

    async def _open(self, resume: bool) -> tuple[ClientConnection, int]:
        """Open a WebSocket and start (or resume) the session on it; returns the socket
        and the seq the server expects next. The socket is closed if this fails."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        url = self._url(resume)
        ws = await connect(
            url,
            ssl=self.ssl_context if url.startswith("wss:") else None,
            additional_headers=headers,
            compression=None,
            open_timeout=self.open_timeout_s,
            ping_interval=self.ping_interval_s,
            ping_timeout=self.ping_timeout_s,
            close_timeout=CLOSE_TIMEOUT_S,
            max_size=2**20,
        )
        try:
            async with asyncio.timeout(self.open_timeout_s):
                if resume:
                    return ws, await self._resume_handshake(ws)
                await self._start_handshake(ws)
                return ws, 0
        except BaseException:
            with contextlib.suppress(Exception):
                await ws.close()
            raise

    async def _start_handshake(self, ws: ClientConnection) -> None:
        first = parse_server_text(str(await ws.recv()))
        if isinstance(first, ErrorMessage):
            raise await self._refused(ws, first)
        if not isinstance(first, SessionStarted):
            raise SessionError(f"expected session.started, got {first!r}")
        self.session_id, self.resume_token = first.session_id, first.resume_token

    async def _resume_handshake(self, ws: ClientConnection) -> int:
        assert self.session_id and self.resume_token
        await ws.send(
            build_client_message(Resume(self.session_id, self.resume_token, self._last_final))
        )
        while True:
            msg = parse_server_text(str(await ws.recv()))
            if isinstance(msg, SessionResumed):
                return msg.next_seq
            if isinstance(msg, ErrorMessage):
                raise await self._refused(ws, msg)

    async def _refused(self, ws: ClientConnection, err: ErrorMessage) -> SessionError:
        """The server sent `error`: wait for its close code, which says whether to retry."""
        self.last_error = err
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
        return SessionError(err.message, close_code=ws.close_code, code=err.code)

    def _rewind(self, next_seq: int) -> None:
        """The service lost acknowledged audio (Redis rolled back to its last fsync after a
        crash): put the retained acknowledged frames from `next_seq` on back in front of
        the unacknowledged ones. Without all of them, re-sending later frames would number
        them wrongly, so the session fails instead of carrying a silent gap."""
        lost = self.acked_seq - next_seq + 1
        while self._acked_tail and self._acked_tail[-1][0] >= next_seq:
            frame = self._acked_tail.pop()
            self._acked_tail_bytes -= len(frame[1])
            self._unacked.appendleft(frame)
        if not self._unacked or self._unacked[0][0] != next_seq:
            raise SessionError(
                f"the service lost {lost} acknowledged audio frame(s) (it resumes at seq "
                f"{next_seq}, frames up to {self.acked_seq} were acknowledged) and fewer are "
                f"retained (retain_acked_s)",
                code="audio_lost",
            )
        log.warning(
            "session %s: the service lost %d acknowledged frame(s); re-sending them",
            self.session_id,
            lost,
        )
        self.rewound_frames += lost
        self.acked_seq = next_seq - 1

    async def connect(self) -> None:
        """Open the connection and start the session (no retry: errors raise here)."""
        if self._reader is not None:
            raise RuntimeError("connect() was already called on this session")
        self._ws, _ = await self._open(resume=False)
        self._connected.set()
        self._reader = asyncio.create_task(self._read_loop(), name="client-reader")
        self._pinger = asyncio.create_task(self._keepalive_loop(), name="client-keepalive")

    async def _reconnect(self) -> None:
        """Back off (exponential, with jitter), reopen, resume, re-send; give up after
        `max_reconnects` failed attempts or at once on an error retrying cannot fix."""
        self._connected.clear()
        old, self._ws = self._ws, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()
        for attempt in range(1, self.max_reconnects + 1):
            await self.backoff_sleep(
                backoff_delay(attempt, self.backoff_s, self.max_backoff_s, self.jitter())
            )
            self._url_index = (self._url_index + 1) % len(self.urls)
            try:
                ws, next_seq = await self._open(resume=True)
                try:
                    await self._resend(ws, next_seq)
                except BaseException:
                    with contextlib.suppress(Exception):
                        await ws.close()
                    raise
            except SessionError as exc:
                if exc.close_code in FATAL_CLOSE_CODES or exc.code == "audio_lost":
                    raise
                log.info("reconnect attempt %d failed: %s", attempt, exc)
                continue
            except (OSError, TimeoutError, EOFError, WebSocketException) as exc:
                code = _fatal_code(exc)
                if code is not None:
                    raise SessionError(f"resume refused: {exc}", close_code=code) from exc
                log.info("reconnect attempt %d failed: %s", attempt, exc)
                continue
            self.reconnects += 1
            log.info("session %s resumed after %d attempt(s)", self.session_id, attempt)
            return
        raise SessionError(f"could not reconnect after {self.max_reconnects} attempts")

    async def _resend(self, ws: ClientConnection, next_seq: int) -> None:
        """Drop what the server has, re-send the rest in order, then go live. Runs under
        the send lock, so a concurrent `send_audio` can only follow the re-sent frames."""
        async with self._lock:
            if next_seq > self._next_seq:
                raise SessionError(
                    f"server expects seq {next_seq} but only {self._next_seq} frames were sent",
                    code="protocol_violation",
                )
            if next_seq <= self.acked_seq:
                self._rewind(next_seq)
            while self._unacked and self._unacked[0][0] < next_seq:
                self._unacked.popleft()
            for _seq, data in self._unacked:
                await ws.send(data)
            if self._closing_sent:
                await ws.send(build_client_message(CloseStream()))
            self._last_sent = asyncio.get_running_loop().time()
            self._ws = ws
            self._connected.set()

    async def _read_loop(self) -> None:
        try:
            while True:
                ws = self._ws
                assert ws is not None
                try:
                    async for raw in ws:
                        if self._handle(parse_server_text(str(raw))):
                            await ws.close()
                            return
                except ConnectionClosed:
                    pass
                code = ws.close_code or 1006
                if code == 1000:
                    if not self._done.is_set():
                        raise SessionError("server closed the session without session.closed", 1000)
                    return
                if code in FATAL_CLOSE_CODES:
                    err = self.last_error
                    failure = SessionError(
                        f"session closed by server: {code} {ws.close_reason or ''}"
                        + (f" ({err.code}: {err.message})" if err else ""),
                        close_code=code,
                        code=err.code if err else None,
                    )
                    if code == LIMIT_CLOSE_CODE and self.collect_after_limit_s > 0:
                        await self._collect_after_limit(failure)
                    raise failure
                log.info("connection lost (%s %s); reconnecting", code, ws.close_reason or "")
                await self._reconnect()
        except Exception as exc:  # hand every failure to results() and send_audio()
            failure = (
                exc
                if isinstance(exc, SessionError)
                else SessionError(f"session failed: {exc!r}", code="internal")
            )
            self._failure = failure
            self._connected.clear()
            self._results.put_nowait(failure)
            self._done.set()

    async def _collect_after_limit(self, failure: SessionError) -> None:
        """A 4429 refused audio, but the service keeps every frame it acknowledged:
        resume once, send `close_stream` and no more audio, and deliver the finals of the
        kept audio, for at most `collect_after_limit_s`. The session fails with `failure`
        either way (audio sent meanwhile is refused by `send_audio`); `failure.closed`
        is the closing summary if it came."""
        self._failure = failure  # from now on send_audio and close_stream raise it
        self._connected.clear()
        try:
            async with asyncio.timeout(self.collect_after_limit_s):
                ws, _ = await self._open(resume=True)
                self._ws = ws
                try:
                    await ws.send(build_client_message(CloseStream()))
                    async for raw in ws:
                        msg = parse_server_text(str(raw))
                        if isinstance(msg, Closed):
                            failure.closed = msg
                            return
                        if isinstance(msg, Transcript) and msg.is_final:
                            self._handle(msg)  # interims of that audio are of no use now
                finally:
                    with contextlib.suppress(Exception):
                        await ws.close()
        except (SessionError, OSError, TimeoutError, EOFError, WebSocketException) as exc:
            log.info("session %s: finals after %s not collected: %s", self.session_id, failure, exc)

    def _handle(self, msg: Any) -> bool:
        """Returns True when the session is complete."""
        if isinstance(msg, Ack):
            self.acked_seq = max(self.acked_seq, msg.seq)
            while self._unacked and self._unacked[0][0] <= msg.seq:
                frame = self._unacked.popleft()
                self._acked_tail.append(frame)
                self._acked_tail_bytes += len(frame[1])
            while self._acked_tail and self._acked_tail_bytes > self._retain_bytes:
                self._acked_tail_bytes -= len(self._acked_tail.popleft()[1])
        elif isinstance(msg, Transcript):
            if msg.is_final:
                if msg.result_id <= self._last_final:
                    return False  # duplicate after a resume: already delivered
                self._last_final = msg.result_id
            self._results.put_nowait(msg)
        elif isinstance(msg, Closed):
            self._results.put_nowait(msg)
            self._done.set()
            return True
        elif isinstance(msg, Queued):
            self.last_queued = msg.position
        elif isinstance(msg, ErrorMessage):
            # A close code follows; it decides whether this ends the session (_read_loop).
            self.last_error = msg
            log.warning("server error %s: %s", msg.code, msg.message)
        return False

    async def _keepalive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._done.is_set():
            await asyncio.sleep(self.keepalive_s / 2)
            if loop.time() - self._last_sent >= self.keepalive_s and self.connected:
                await self._send_text(build_client_message(Keepalive()))

    # --- sending -------------------------------------------------------------------------

    async def send_audio(self, data: bytes) -> int:
        """Send one frame (or buffer it while disconnected); returns its seq. The frame is
        kept until the server acknowledges it and re-sent after a resume if needed.
        Raises `AudioBufferFull` when `max_buffered_frames` frames await an ack, and
        `SessionError` once the session has ended."""
        self._raise_if_ended()
        async with self._lock:
            if len(self._unacked) >= self.max_buffered_frames:
                raise AudioBufferFull(
                    f"{len(self._unacked)} audio frames await an acknowledgement "
                    f"(max_buffered_frames={self.max_buffered_frames}); "
                    + ("the connection is down" if not self.connected else "the service is behind")
                )
            seq = self._next_seq
            self._next_seq += 1
            self._unacked.append((seq, data))
            await self._send(data)
            return seq

    async def finalize(self) -> None:
        """End the current utterance now. Dropped if sent while disconnected."""
        self._raise_if_ended()
        await self._send_text(build_client_message(Finalize()))

    async def close_stream(self) -> None:
        """No more audio. Sent again after a resume if the connection drops meanwhile."""
        self._raise_if_ended()
        async with self._lock:
            if self._closing_sent:
                return
            self._closing_sent = True
            await self._send(build_client_message(CloseStream()))

    def _raise_if_ended(self) -> None:
        if self._failure is not None:
            raise SessionError(
                str(self._failure), self._failure.close_code, self._failure.code
            ) from self._failure
        if self._done.is_set():
            raise SessionError("the session has ended")

    async def _send_text(self, text: str) -> None:
        async with self._lock:
            await self._send(text)

    async def _send(self, data: bytes | str) -> None:
        """Send on the live socket, if there is one (the caller holds the send lock).

        While disconnected nothing is sent: audio waits in `_unacked` for the resume.
        A frame lost with a dying connection stays in `_unacked` and is re-sent too."""
        ws = self._ws
        if ws is None or not self.connected:
            return
        self._last_sent = asyncio.get_running_loop().time()
        with contextlib.suppress(ConnectionClosed):
            await ws.send(data)

    @property
    def connected(self) -> bool:
        """True while the session's WebSocket is really open (not merely present)."""
        ws = self._ws
        return ws is not None and self._connected.is_set() and ws.state is State.OPEN

    @property
    def unacked_frames(self) -> int:
        return len(self._unacked)

    # --- receiving -----------------------------------------------------------------------

    async def results(self) -> AsyncIterator[Result]:
        """Transcripts as they come, then the Closed summary; raises SessionError on failure."""
        while True:
            item = await self._results.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if isinstance(item, Closed):
                return

    async def aclose(self) -> None:
        """Close the socket and stop the SDK's tasks; safe to call twice, and after errors."""
        if not self._done.is_set():
            self._results.put_nowait(SessionError("the session was closed by aclose()"))
        self._done.set()
        self._connected.clear()
        for task in (self._pinger, self._reader):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._pinger, self._reader):
            if task is not None:
                with contextlib.suppress(BaseException):
                    await task
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
