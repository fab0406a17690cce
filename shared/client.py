"""Python client SDK for protocol v1, used by `streamscribe transcribe` and tests.

    async with StreamingSession("wss://host:8765/v1/listen", sample_rate=16000) as s:
        await s.send_audio(pcm_bytes)          # as many times as needed
        await s.close_stream()
        async for result in s.results():       # Transcript (interim/final), then Closed
            print(result)

The session checks the real connection state, keeps every unacknowledged audio frame,
and when the link drops (or a gateway drains with 1012) it reconnects with exponential
backoff and jitter, resumes the session and re-sends from the server's `next_seq`, so no
audio and no final is lost or duplicated. Errors that retrying cannot fix (4400, 4401,
4403, 4404, 1008, 1009) end the session with `SessionError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

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

FATAL_CLOSE_CODES = frozenset({1008, 1009, 4400, 4401, 4403, 4404, 4429})
Result = Transcript | Closed


class SessionError(Exception):
    """The session ended with an error that reconnecting cannot fix."""

    def __init__(
        self, message: str, close_code: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.code = code


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
    ) -> None:
        self.url = url
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
        self.session_id: str | None = None
        self.resume_token: str | None = None
        self.reconnects = 0
        self.acked_seq = -1
        self.last_queued: int | None = None
        self._ws: ClientConnection | None = None
        self._next_seq = 0
        self._unacked: deque[tuple[int, bytes]] = deque()
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
        parts = urlsplit(self.url)
        params = dict(self.params)
        if resume:
            params["session_id"] = self.session_id
        return urlunsplit(parts._replace(query=urlencode(params)))

    async def _open(self, resume: bool) -> ClientConnection:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        ws = await connect(
            self._url(resume),
            ssl=self.ssl_context if self.url.startswith("wss:") else None,
            additional_headers=headers,
            compression=None,
            open_timeout=self.open_timeout_s,
            max_size=2**20,
        )
        if not resume:
            first = parse_server_text(str(await ws.recv()))
            if not isinstance(first, SessionStarted):
                await ws.close()
                raise SessionError(f"expected session.started, got {first!r}")
            self.session_id, self.resume_token = first.session_id, first.resume_token
            return ws
        assert self.session_id and self.resume_token
        await ws.send(
            build_client_message(Resume(self.session_id, self.resume_token, self._last_final))
        )
        while True:
            msg = parse_server_text(str(await ws.recv()))
            if isinstance(msg, SessionResumed):
                break
            if isinstance(msg, ErrorMessage):
                raise SessionError(msg.message, code=msg.code)
        # Drop what the server has; re-send the rest in order.
        while self._unacked and self._unacked[0][0] < msg.next_seq:
            self._unacked.popleft()
        for _seq, data in self._unacked:
            await ws.send(data)
        if self._closing_sent:
            await ws.send(build_client_message(CloseStream()))
        return ws

    async def connect(self) -> None:
        self._ws = await self._open(resume=False)
        self._connected.set()
        self._reader = asyncio.create_task(self._read_loop(), name="client-reader")
        self._pinger = asyncio.create_task(self._keepalive_loop(), name="client-keepalive")

    async def _reconnect(self) -> None:
        """Back off (exponential, with jitter), reopen, resume; give up after the cap."""
        self._connected.clear()
        delay = self.backoff_s
        for attempt in range(1, self.max_reconnects + 1):
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.max_backoff_s)
            try:
                self._ws = await self._open(resume=True)
            except (OSError, TimeoutError, ConnectionClosed, InvalidStatus) as exc:
                code = getattr(getattr(exc, "rcvd", None), "code", None)
                if code in FATAL_CLOSE_CODES:
                    raise SessionError(f"resume refused: {exc}", close_code=code) from exc
                log.info("reconnect attempt %d failed: %s", attempt, exc)
                continue
            self.reconnects += 1
            self._connected.set()
            log.info("session %s resumed after %d attempt(s)", self.session_id, attempt)
            return
        raise SessionError(f"could not reconnect after {self.max_reconnects} attempts")

    async def _read_loop(self) -> None:
        try:
            while True:
                assert self._ws is not None
                try:
                    async for raw in self._ws:
                        if self._handle(parse_server_text(str(raw))):
                            await self._ws.close()
                            return
                except ConnectionClosed:
                    pass
                code = self._ws.close_code or 1006
                if code == 1000:
                    if not self._done.is_set():
                        raise SessionError("server closed the session without session.closed", 1000)
                    return
                if code in FATAL_CLOSE_CODES:
                    raise SessionError(
                        f"session closed by server: {code} {self._ws.close_reason or ''}",
                        close_code=code,
                    )
                await self._reconnect()
        except BaseException as exc:  # hand every failure to the consumer of results()
            if not isinstance(exc, asyncio.CancelledError):
                self._results.put_nowait(exc)
            self._done.set()
            raise

    def _handle(self, msg: Any) -> bool:
        """Returns True when the session is complete."""
        if isinstance(msg, Ack):
            self.acked_seq = max(self.acked_seq, msg.seq)
            while self._unacked and self._unacked[0][0] <= msg.seq:
                self._unacked.popleft()
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
            self._results.put_nowait(SessionError(msg.message, code=msg.code))
        return False

    async def _keepalive_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._done.is_set():
            await asyncio.sleep(self.keepalive_s / 2)
            if loop.time() - self._last_sent >= self.keepalive_s and self._connected.is_set():
                with contextlib.suppress(ConnectionClosed):
                    await self._send_text(build_client_message(Keepalive()))

    # --- sending -------------------------------------------------------------------------

    async def send_audio(self, data: bytes) -> int:
        """Send one frame; returns its seq. Kept until the server acknowledges it."""
        async with self._lock:
            seq = self._next_seq
            self._next_seq += 1
            self._unacked.append((seq, data))
            await self._send(data)
            return seq

    async def finalize(self) -> None:
        await self._send_text(build_client_message(Finalize()))

    async def close_stream(self) -> None:
        self._closing_sent = True
        await self._send_text(build_client_message(CloseStream()))

    async def _send_text(self, text: str) -> None:
        async with self._lock:
            await self._send(text)

    async def _send(self, data: bytes | str) -> None:
        await self._connected.wait()
        ws = self._ws
        assert ws is not None
        self._last_sent = asyncio.get_running_loop().time()
        with contextlib.suppress(ConnectionClosed):
            # A frame lost with the connection stays in _unacked and is re-sent on resume.
            await ws.send(data)

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
        """Close the socket and stop the SDK's tasks; safe to call twice."""
        self._done.set()
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
