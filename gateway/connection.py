"""One client connection: the async shell around `shared.protocol.ServerSession`.

Five tasks per connection, all ending together:
- reader: client frames -> ServerSession -> the pending queue (bounded: back-pressure);
  most audio frames skip the task: taken in the protocol callback (gateway/wsconn.py);
- writer: pending queue -> one atomic, idempotent Redis append per batch (sent with
  other connections' appends in one pipeline, gateway/ingest.py) -> `ack`; most
  batches skip the task too: stored and acked from callbacks while it is parked;
- results: pub/sub + results stream -> `Delivery` -> transcripts and `session.closed`;
- watchdog: idle timeout;
- queue watcher: `queued` positions until a worker claims the session.
Errors become an `error` message and a close code in `_fail`, the one place that maps
the exception tree to the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, NoReturn, TypeVar
from urllib.parse import urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, PayloadTooBig
from websockets.protocol import State

from gateway.admission import Admission
from gateway.auth import authenticate, listed
from gateway.ingest import BatcherClosed, IngestBatcher
from gateway.pending import PendingQueue
from gateway.relay import RECONCILE, Relay
from gateway.results import ResultsReader
from gateway.usage import US, UsageMeter
from gateway.wsconn import GatewayServerConnection
from shared import envelope
from shared.config import Config
from shared.delivery import Delivery
from shared.envelope import AudioChunk, Closed, CloseReason, Control, Replaced, Transcript
from shared.errors import (
    BadRequest,
    Forbidden,
    FrameTooLarge,
    Internal,
    NotFound,
    Overloaded,
    ProtocolViolation,
    RateLimited,
    SessionFailed,
    StreamscribeError,
)
from shared.fleet import Fleet
from shared.keys import GatewayId, SessionId
from shared.metrics import ROUND_TRIP_BOUNDS_S, Histogram, Metrics
from shared.modelinfo import english_only
from shared.protocol import (
    ACK_TEXT,
    CloseStream,
    ConnectionState,
    Finalize,
    Keepalive,
    Queued,
    Resume,
    ServerMessage,
    ServerSession,
    SessionParams,
    SessionResumed,
    SessionStarted,
    build_server_message,
    error_message,
    parse_query,
)
from shared.ratelimit import AudioRateLimit
from shared.store import IngestResult, SeqGap, SessionGone, Store, now_ms

log = logging.getLogger(__name__)

MAX_BATCH_FRAMES = 64
REDIS_RETRIES = 5
#: A session no worker has claimed after this long is announced as `queued`. A worker
#: with a free slot claims a new session within milliseconds (its read of the dispatch
#: lanes is already waiting); looking at once told some sessions that never waited that
#: they were queued (`streamscribe loadtest`: 1 of 8 sessions, with 8 free slots).
QUEUED_AFTER_S = 0.25


def close_reason(text: str) -> str:
    """A close frame's reason is at most 123 bytes of UTF-8."""
    data = text.encode()
    return text if len(data) <= 123 else data[:120].decode(errors="ignore") + "..."


def ack_text(seq: int) -> str:
    """`build_server_message(Ack(seq))`, without building a dict and encoding JSON."""
    return ACK_TEXT % seq


def text_frame(data: bytes) -> bytes:
    """A whole, unmasked text frame carrying `data`, as the server sends it (RFC 6455
    5.2; the same bytes as websockets' `Frame(TEXT, data).serialize(mask=False)`)."""
    size = len(data)
    if size < 126:
        return b"\x81%c%b" % (size, data)
    if size < 65536:
        return b"\x81\x7e%b%b" % (size.to_bytes(2, "big"), data)
    return b"\x81\x7f%b%b" % (size.to_bytes(8, "big"), data)


def send_now(ws: ServerConnection, text: str) -> bool:
    """Frame and write `text` at once, as `ws.send` would, without its per-message
    coroutine, context manager and drain, and without websockets' framing: True if it was
    written. The gateway sends an ack per stored frame, and that machinery was most of an
    ack's cost.

    Only when nothing can go wrong that `ws.send` would handle: the connection is open, no
    fragmented message is being sent (attribute of websockets >= 15; missing, this says
    no), no extension (compression) is in use, websockets has nothing of its own waiting to
    be written, and the socket's write buffer is under its high-water mark, so a client
    that does not read still meets `ws.send`'s back-pressure on the next message.
    Otherwise False: the caller awaits `ws.send`."""
    protocol = ws.protocol
    if (
        getattr(ws, "send_in_progress", False) is not None
        or protocol.state is not State.OPEN
        or protocol.extensions
        or protocol.writes
    ):
        return False
    transport = ws.transport
    if transport.get_write_buffer_size() >= transport.get_write_buffer_limits()[1]:
        return False
    transport.write(text_frame(text.encode()))
    return True


class QueuePlace(NamedTuple):
    """A session no worker has claimed yet: its lane, its place in the lane, and how
    long it had waited when this connection took it over."""

    priority: str
    place: int
    waited_s: float


def _reader_end(reader: asyncio.Task[None]) -> Literal["closed", "bad input"] | None:
    """Why the (finished) reader ended: the connection did ("closed", by either side,
    cleanly or not); the client sent something that ends it with an error ("bad input",
    the error to send once what came before is stored); or neither (None)."""
    if reader.cancelled():
        return None
    exc = reader.exception()
    if exc is None or isinstance(exc, ConnectionClosed):
        return "closed"
    return "bad input" if isinstance(exc, StreamscribeError) else None


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def key_id(api_key: str) -> str:
    """An API key's name in Redis (`keys.quota`): the start of its SHA-256, so that
    Redis never holds the key itself."""
    return hash_token(api_key)[:16]


T = TypeVar("T")


class CloseWithoutError(Exception):
    """Close the socket with a code that is not an error, so no `error` message precedes."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def reconnect(reason: str) -> CloseWithoutError:
    """1012: the client should reconnect (to any gateway) and resume."""
    return CloseWithoutError(1012, reason)


@dataclass(frozen=True)
class GatewayContext:
    config: Config
    store: Store
    relay: Relay
    metrics: Metrics
    fleet: Fleet
    gateway_id: GatewayId
    admission: Admission
    #: Every connection's audio goes to Redis through this one batcher (gateway/ingest.py).
    ingest: IngestBatcher
    #: And every re-read of a results stream through this one (gateway/results.py).
    results: ResultsReader
    #: Connections that ended while Redis was unreachable: (session, connection, done),
    #: released by the gateway's heartbeat once Redis is back.
    unreleased: list[tuple[SessionId, str, bool]] = field(default_factory=list)
    #: Sessions this gateway's connections hold that count against an API key's
    #: `max_sessions_per_key`: session -> (key ID, connection). The heartbeat renews them
    #: (`hold_quota`).
    quota_held: dict[SessionId, tuple[str, str]] = field(default_factory=dict)
    #: Audio stored per API key (`api_keys` set; gateway/usage.py), else None.
    usage: UsageMeter | None = None
    #: Each ack's wait: from the arrival of the oldest frame it acknowledges to its
    #: sending (`/metrics`: `ack_seconds`).
    ack_seconds: Histogram = field(default_factory=lambda: Histogram(ROUND_TRIP_BOUNDS_S))

    @property
    def quota_hold_s(self) -> float:
        """How long a held session counts without renewal: the time after which a
        silent gateway is dead (`worker_alive_s`)."""
        return self.config.worker_alive_s

    async def hold_quota(self) -> None:
        """Renew every session this gateway holds against its API key's quota."""
        by_key: dict[str, list[SessionId]] = {}
        for sid, (key, _conn) in self.quota_held.items():
            by_key.setdefault(key, []).append(sid)
        await self.store.quota_hold(by_key, self.quota_hold_s, renew=True)

    async def sync_usage(self, only: str | None = None) -> None:
        """Write this gateway's audio totals per API key into Redis and learn the
        fleet's (`UsageMeter.to_sync`; `only`: that key's current window alone)."""
        usage = self.usage
        if usage is None:
            return
        items = usage.to_sync(only)
        totals = await self.store.usage_sync(
            self.gateway_id,
            [(item.key_id, item.window, item.local_us) for item in items],
            2 * usage.window_s,  # the last window's total stays readable a whole window
        )
        usage.synced(items, totals)


async def release_session(ctx: GatewayContext, sid: SessionId, conn: str, done: bool) -> None:
    """A connection ended: start the session's resume grace (unless it is finished or a
    newer connection holds it) and drop it from this gateway's registry set. A finished
    session stops counting against its API key's quota; a detached one counts through
    its resume grace."""
    held = ctx.quota_held.get(sid)
    key = held[0] if held is not None and held[1] == conn else None  # not a newer one's
    if not done and await ctx.store.detach(sid, conn, ctx.config.resume_grace_s):
        log.info("session %s detached; resumable for %.0fs", sid, ctx.config.resume_grace_s)
        if key is not None:
            grace_s = ctx.config.resume_grace_s + ctx.quota_hold_s
            await ctx.store.quota_hold({key: [sid]}, grace_s)
    elif key is not None and done:
        await ctx.store.quota_release(key, sid)
    if key is not None:
        del ctx.quota_held[sid]
    await ctx.fleet.gateway_released(ctx.gateway_id, sid)


class Connection:
    def __init__(self, ws: ServerConnection, ctx: GatewayContext) -> None:
        self.ws = ws
        self.ctx = ctx
        self.cfg = ctx.config
        # Prefixed with the gateway's ID: if this gateway dies, the maintenance job can
        # tell which sessions it held (shared/fleet.py).
        self.conn_id = f"{ctx.gateway_id}/{secrets.token_hex(8)}"
        self.sid: SessionId | None = None
        self.session: ServerSession | None = None
        self.delivery = Delivery()
        self.loop = asyncio.get_running_loop()
        self.pending: PendingQueue[AudioChunk | Control] = PendingQueue(
            self.cfg.max_pending_frames, self.loop
        )
        self.events: asyncio.Queue[bytes] | None = None
        self.last_activity = self.loop.time()
        self.results_after = b"0-0"
        # Where the session waits while no worker has claimed it.
        self.queue: QueuePlace | None = None
        # (age in s, audio bytes stored) of a resumed session, for its rate limit.
        self.resumed_usage: tuple[float, int] = (0.0, 0)
        # The API key's ID (`key_id`) when its sessions count against max_sessions_per_key.
        self.quota_key: str | None = None
        # The API key's ID when its audio is metered (`ctx.usage`), and, under
        # audio_budget_s, the audio this connection sent but has not stored yet (us).
        self.usage_key: str | None = None
        self._unstored_us = 0
        self._bytes_per_s = 0  # the session's, set as the reader starts
        # When each queued audio frame arrived (`perf_counter`), in queue order, and the
        # first of the batch being stored: for `ack_seconds`. One batch at a time is
        # taken (`_take_audio`), and only after the one before it was acked or dropped.
        self._arrivals: deque[float] = deque()
        self._batch_arrived = 0.0
        self._limit: AudioRateLimit | None = None  # with max_audio_rate, from the reader on
        # An audio frame that failed in the protocol callback; the reader raises it.
        self._direct_error: Exception | None = None
        self._reader_busy = False  # the reader is putting a message of its own in `pending`
        # The writer (see `_writer`): its wake-up while parked (`_parked`), and the call
        # that callbacks made meanwhile, with its frames.
        self._writer_wake: asyncio.Future[None] | None = None
        self._ingesting: tuple[asyncio.Future[IngestResult], list[AudioChunk]] | None = None
        self._max_audio_bytes = 0.0  # max_session_audio_s in bytes, set as the writer starts
        self._callback_error: Exception | None = None  # raised by the writer
        # The reader is done: the writer stores what it had queued and returns
        # (`_store_rest`); and, once the connection has ended, no more acks.
        self._reader_done = False
        self._acks_off = False

    # --- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        self.ctx.metrics.inc("connections_total")
        try:
            await self._open()
            await self._serve()
        except StreamscribeError as err:
            await self._fail(err)
        except CloseWithoutError as exc:
            await self._close(exc.code, exc.reason)
        except ConnectionClosed:
            if isinstance(self.ws.protocol.parser_exc, PayloadTooBig):
                # websockets' own 1009 (gateway/wsconn.py sent the `error` before it).
                self.ctx.metrics.inc('errors_total{code="frame_too_large"}')
                log.info(
                    "session %s: frame_too_large (1009): %s", self.sid, self.ws.protocol.parser_exc
                )
        except Exception:
            log.exception("internal error on session %s", self.sid)
            await self._fail(Internal("internal server error"))
        finally:
            if self.usage_key is not None and self.ctx.usage is not None:
                self.ctx.usage.closed(self.usage_key)
            await asyncio.shield(self._cleanup())

    async def _open(self) -> None:
        query = urlsplit(self.ws.request.path if self.ws.request else "").query
        params = parse_query(query)
        self._authenticate(params)
        if params.model is not None and params.model != self.cfg.model:
            raise BadRequest(
                f"model {params.model!r} is not loaded; this service runs {self.cfg.model!r}"
            )
        if english_only(self.cfg.model) and params.language not in (None, "en"):
            raise BadRequest(  # the reason first: a close reason is cut at 123 bytes
                f"language {params.language!r} is not available: the model is English-only "
                f"({self.cfg.model})"
            )
        if params.session_id is None:
            await self._start_new(params)
        else:
            await self._resume(params)

    def _authenticate(self, params: SessionParams) -> None:
        headers = self.ws.request.headers if self.ws.request else None
        presented = authenticate(self.cfg.api_keys, headers, params.access_token)
        if presented is None:
            return
        if self.cfg.max_sessions_per_key:
            self.quota_key = key_id(presented)
        if self.ctx.usage is not None:
            self.usage_key = key_id(presented)
            self.ctx.usage.opened(self.usage_key)
        if params.priority == "high" and not listed(presented, self.cfg.high_priority_keys):
            raise BadRequest("priority=high is not allowed for this API key")

    async def _start_new(self, params: SessionParams) -> None:
        await self.ctx.admission.check_new(params.priority)  # 1013 when the queue is full
        if self.usage_key is not None and self.cfg.audio_budget_s:
            await self._check_budget_left(self.usage_key)
        sid = SessionId(secrets.token_hex(16))
        if self.quota_key is not None:
            await self._take_quota(self.quota_key, sid)
        token = secrets.token_urlsafe(24)
        self.sid = sid
        self.events = await self.ctx.relay.subscribe(sid)
        await self.ctx.fleet.gateway_holds(self.ctx.gateway_id, sid)
        index = await self.ctx.store.create_session(sid, params, hash_token(token), self.conn_id)
        self.queue = QueuePlace(params.priority, index, waited_s=0.0)
        self.session = ServerSession(params, resuming=False)
        self.delivery = Delivery(interim_results=params.interim_results)
        self.ctx.metrics.inc("sessions_started_total")
        log.info(
            "session %s started (%d Hz %s x%d)",
            sid,
            params.sample_rate,
            params.encoding,
            params.channels,
        )
        await self._send(SessionStarted(sid, token, params.sample_rate))

    async def _resume(self, params: SessionParams) -> None:
        self.session = ServerSession(params, resuming=True)
        try:
            first = await asyncio.wait_for(self.ws.recv(), timeout=self.cfg.idle_timeout_s)
        except TimeoutError:
            raise Forbidden("no 'resume' message arrived") from None
        if not isinstance(first, str):
            raise Forbidden("connection opened with session_id must send 'resume' before audio")
        msg = self.session.receive_text(first)
        assert isinstance(msg, Resume)  # receive_text raises otherwise
        if msg.session_id != params.session_id:
            raise Forbidden("resume session_id does not match the session_id in the URL")
        sid = SessionId(msg.session_id)
        meta = await self.ctx.store.load_meta(sid)
        if meta is None:
            raise NotFound("unknown or expired session")
        if not hmac.compare_digest(meta.token_hash, hash_token(msg.resume_token)):
            raise Forbidden("resume token does not match the session")
        if msg.last_result_id >= meta.finals:
            if meta.state != "open":
                raise BadRequest(
                    f"last_result_id {msg.last_result_id} was never sent: the session has "
                    f"{meta.finals} final result(s)"
                )
            # The client has finals Redis no longer has: a crash lost writes made after
            # the last AOF fsync. The worker makes them again from the audio the client
            # re-sends; they are not sent again (only finals after last_result_id are).
            log.warning(
                "session %s: resume with last_result_id %d but %d final(s) stored "
                "(Redis lost writes?); the missing ones are not sent again",
                sid,
                msg.last_result_id,
                meta.finals,
            )
        self.sid = sid
        self.session.params = meta.params
        self.events = await self.ctx.relay.subscribe(sid)
        await self.ctx.fleet.gateway_holds(self.ctx.gateway_id, sid)
        previous = await self.ctx.store.attach(sid, self.conn_id)
        if self.quota_key is not None:  # a resume counts, and is never refused
            await self.ctx.store.quota_hold({self.quota_key: [sid]}, self.ctx.quota_hold_s)
            self.ctx.quota_held[sid] = (self.quota_key, self.conn_id)
        if previous:
            await self.ctx.store.publish_replaced(sid, self.conn_id)
        self.session.resumed(meta.next_seq, open_=meta.state == "open")
        self.resumed_usage = (max(0.0, (now_ms() - meta.created_ms) / 1000), meta.audio_bytes)
        if meta.epoch == 0 and meta.state == "open":
            # Still waiting: the wait counts from when the session joined the queue, not
            # from this connection (a client cannot reset max_queue_wait_s by resuming).
            waited_s = max(0.0, (now_ms() - meta.created_ms) / 1000)
            self.queue = QueuePlace(meta.params.priority, meta.dispatch_index, waited_s)
        self.delivery = Delivery(
            next_result_id=msg.last_result_id + 1,
            interim_results=meta.params.interim_results,
            needs_catch_up=True,
        )
        self.ctx.metrics.inc("sessions_resumed_total")
        log.info("session %s resumed at seq %d (state %s)", sid, meta.next_seq, meta.state)
        await self._send(SessionResumed(sid, meta.next_seq))

    async def _take_quota(self, key: str, sid: SessionId) -> None:
        most = self.cfg.max_sessions_per_key
        counted, n = await self.ctx.store.quota_take(key, sid, most, self.ctx.quota_hold_s)
        if not counted:
            self.ctx.metrics.inc("sessions_over_quota_total")
            raise RateLimited(
                f"this API key has {n} sessions open, the most allowed (max_sessions_per_key)"
            )
        self.ctx.quota_held[sid] = (key, self.conn_id)

    async def _check_budget_left(self, key: str) -> None:
        """A new session of a key that has used its whole audio budget is refused (with
        the key's fleet total made fresh first)."""
        usage = self.ctx.usage
        assert usage is not None
        await self._with_retries(lambda: self.ctx.sync_usage(only=key))  # idempotent
        if usage.spent(key):
            self.ctx.metrics.inc("audio_over_budget_total")
            raise RateLimited(self._over_budget(usage))

    def _over_budget(self, usage: UsageMeter) -> str:
        """The reason a key over its budget gets (within a close reason's 123 bytes)."""
        renews = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(usage.renews_at()))
        return (
            f"this API key used its audio budget of {self.cfg.audio_budget_s:g} s per "
            f"{usage.window_s} s (audio_budget_s); renews {renews}"
        )

    async def _serve(self) -> None:
        tasks = [
            asyncio.create_task(self._reader(), name="reader"),
            asyncio.create_task(self._writer(), name="writer"),
            asyncio.create_task(self._results(), name="results"),
            asyncio.create_task(self._watchdog(), name="watchdog"),
            asyncio.create_task(self._queue_watch(), name="queue"),
        ]
        reader, writer = tasks[0], tasks[1]
        try:
            running = set(tasks)
            while running:
                done, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                if reader in done and writer not in done and (end := _reader_end(reader)):
                    await self._store_rest(writer, acks=end == "bad input")
                for task in done:
                    task.result()  # re-raise the first failure
                if any(task.get_name() != "queue" for task in done):
                    break  # the queue watcher alone may end early: the session got a worker
        finally:
            self._writer_wake = None  # no more calls from callbacks
            if self._ingesting is not None:
                self._ingesting[0].cancel()  # left out of its pipeline if not yet sent
                self._ingesting = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _cleanup(self) -> None:
        if self.sid is None:
            return
        if self.events is not None:
            await self.ctx.relay.unsubscribe(self.sid, self.events)
        try:
            await release_session(self.ctx, self.sid, self.conn_id, self.delivery.done)
        except (RedisError, OSError):
            # Redis is down: the gateway's heartbeat retries, so that the session still
            # gets its resume grace (and is reaped, freeing its worker slot).
            self.ctx.unreleased.append((self.sid, self.conn_id, self.delivery.done))

    async def _store_rest(self, writer: asyncio.Task[None], *, acks: bool) -> None:
        """The reader is done: let the writer store what it had queued (audio and
        commands that came before the end, in order; frames after a stream the server
        ended are still dropped), for at most `store_after_close_s`. With `acks` (the
        client sent bad input, and its error follows) the stored frames are acknowledged
        first; else the connection has ended, and nobody is left to read an ack."""
        self._reader_done = True
        self._acks_off = self._acks_off or not acks
        if self.cfg.store_after_close_s <= 0:
            return
        # Woken from `_park`, it returns at once when nothing is left; otherwise it may be
        # storing a batch it took from the queue, or settling a call made from a callback.
        self._wake_writer()
        try:
            await asyncio.wait_for(asyncio.shield(writer), self.cfg.store_after_close_s)
        except TimeoutError:
            log.warning(
                "session %s: %d item(s) read before the connection's end were not stored "
                "within %gs (store_after_close_s); dropped",
                self.sid,
                self.pending.qsize(),
                self.cfg.store_after_close_s,
            )
        except Exception as exc:  # e.g. storage unavailable: the reader's end is told
            log.info("session %s: storing after the reader ended stopped: %s", self.sid, exc)

    # --- the four tasks ------------------------------------------------------------------

    async def _reader(self) -> None:
        session = self._session()
        self._bytes_per_s = session.params.bytes_per_second
        if self.cfg.max_audio_rate > 0:
            self._limit = AudioRateLimit(
                self.cfg.max_audio_rate,
                self.cfg.audio_burst_s,
                session.params.bytes_per_second,
                self.loop.time(),
                age_s=self.resumed_usage[0],
                stored_bytes=self.resumed_usage[1],
            )
        direct = self.ws if isinstance(self.ws, GatewayServerConnection) else None
        if direct is not None:
            direct.on_binary = self._direct_audio  # most frames: no wake-up of this task
        try:
            async for message in self.ws:
                if self._direct_error is not None:
                    raise self._direct_error  # this very message failed in _direct_audio
                # Until this message is in `pending`, no frame may pass it there.
                self._reader_busy = True
                if isinstance(message, str):
                    await self._text(message)
                elif (chunk := self._audio(message)) is not None:
                    await self._queue(chunk)  # back-pressure: stop reading while full
                self._reader_busy = False
        finally:
            if direct is not None:
                direct.on_binary = None

    def _direct_audio(self, data: bytes) -> bool:
        """An audio frame from the protocol callback (`GatewayServerConnection`): stored
        in the pending queue at once, or False to let it go through the reader task
        (the queue is full, so back-pressure must wait; or the frame fails, and the
        reader raises its error in order, once it gets to it). Also False while the
        reader has a message of its own to put there: it may be waiting for room, and
        this frame must not take that room first."""
        if self._reader_busy or self.pending.full() or self._direct_error is not None:
            return False
        try:
            chunk = self._audio(data)
        except Exception as exc:
            self._direct_error = exc
            return False
        if chunk is not None:
            self.pending.put_nowait(chunk)
            self._kick()
        return True

    def _audio(self, data: bytes) -> AudioChunk | None:
        """Number and check one audio frame; the chunk to store, or None to drop it."""
        self.last_activity = self.loop.time()
        chunk = self._session().receive_audio(data)
        if chunk is None:
            return None
        if self._limit is not None:
            self._check_rate(self._limit, len(chunk.pcm))
        if self.usage_key is not None and self.cfg.audio_budget_s:
            self._check_budget(self.usage_key, len(chunk.pcm) * US // self._bytes_per_s)
        self.ctx.metrics.inc("audio_frames_total")
        self._arrivals.append(time.perf_counter())
        return chunk

    async def _text(self, message: str) -> None:
        self.last_activity = self.loop.time()
        session = self._session()
        size = len(message.encode())
        if size > self.cfg.max_text_frame_bytes:
            raise FrameTooLarge(
                f"text message of {size} bytes exceeds {self.cfg.max_text_frame_bytes}"
            )
        msg = session.receive_text(message)
        if isinstance(msg, Keepalive) or session.server_ended:
            return
        if isinstance(msg, Finalize):
            await self._queue(Control(kind="finalize"))
        elif isinstance(msg, CloseStream):
            await self._queue(Control(kind="close", reason="client_closed"))

    def _check_rate(self, limit: AudioRateLimit, nbytes: int) -> None:
        if limit.take(nbytes, self.last_activity):
            return
        # Frames before this one are stored (or on their way) and acknowledged as usual:
        # the client may resume from the last ack and send more slowly.
        raise RateLimited(
            f"audio arrives faster than {limit.rate:g}x real time after a burst of "
            f"{limit.burst_s:g} s (max_audio_rate, audio_burst_s); resume and send more slowly"
        )

    def _check_budget(self, key: str, frame_us: int) -> None:
        usage = self.ctx.usage
        assert usage is not None
        if not usage.allows(key, self._unstored_us + frame_us):
            # As for max_audio_rate, the frames before this one are stored and acked.
            self.ctx.metrics.inc("audio_over_budget_total")
            raise RateLimited(self._over_budget(usage))
        self._unstored_us += frame_us

    def _metered(self, batch: list[AudioChunk], stored: int) -> None:
        """An INGEST call for `batch` is answered, having stored its last `stored`
        frames (the others were stored already): count those against the API key."""
        usage, key = self.ctx.usage, self.usage_key
        if usage is None or key is None:
            return
        per_s = self._bytes_per_s
        if self.cfg.audio_budget_s:
            self._unstored_us -= sum(len(c.pcm) * US // per_s for c in batch)
        if stored:
            usage.stored(key, sum(len(c.pcm) * US // per_s for c in batch[len(batch) - stored :]))

    async def _writer(self) -> None:
        """Store what the reader queued, in order, one Redis call at a time, and ack it.

        Most audio never wakes this task. While it is parked (`_park`), the protocol
        callback (`_direct_audio`) and each call's completion (`_ingested`) store and
        ack audio themselves (`_kick`), one call at a time: a task woken twice per frame
        (by the frame, then by its reply) cost about a tenth of the gateway's CPU. Anything
        else wakes it (`_wake_writer`): a command, a call that failed (it is retried
        here, the calls being idempotent), an ack the socket cannot take at once,
        max_duration reached, audio after the server ended the stream. It first settles
        the call in flight, then works through the queue, and parks once it is empty."""
        session = self._session()
        self._max_audio_bytes = self.cfg.max_session_audio_s * session.params.bytes_per_second
        while True:
            if self._callback_error is not None:
                raise self._callback_error
            if self._ingesting is not None:
                await self._settle()
            elif self.pending.empty():
                if self._reader_done:
                    return  # all it had sent is stored
                await self._park()
            elif isinstance(control := self.pending.peek(), Control):
                self.pending.get_nowait()
                await self._store_control(control)
            elif session.server_ended:
                self.pending.get_nowait()  # in-flight audio is dropped unacked
                self._arrivals.popleft()
            else:
                await self._store_audio(self._take_audio())

    def _take_audio(self) -> list[AudioChunk]:
        """The audio at the head of the queue (at least one frame), up to the next
        command or MAX_BATCH_FRAMES."""
        batch: list[AudioChunk] = []
        pending, arrivals = self.pending, self._arrivals
        self._batch_arrived = arrivals[0]
        while len(batch) < MAX_BATCH_FRAMES and not pending.empty():
            chunk = pending.peek()
            if not isinstance(chunk, AudioChunk):
                break
            batch.append(chunk)
            pending.get_nowait()
            arrivals.popleft()
        return batch

    async def _park(self) -> None:
        """Wait, with nothing queued, until `_wake_writer`; meanwhile `_kick` stores
        audio from callbacks."""
        wake = self.loop.create_future()
        self._writer_wake = wake
        try:
            await wake
        finally:
            self._writer_wake = None

    def _parked(self) -> bool:
        """The writer waits in `_park` and no one has woken it yet."""
        wake = self._writer_wake
        return wake is not None and not wake.done()

    def _wake_writer(self) -> None:
        # Not parked from this moment (the wake-up is done): no callback starts another
        # call before the writer runs.
        wake = self._writer_wake
        if wake is not None and not wake.done():
            wake.set_result(None)

    def _kick(self) -> None:
        """Something was queued, or a call ended: if the writer is parked and no call
        is in flight, store the queued audio from here (or wake the writer for what
        only it does)."""
        if not self._parked() or self._ingesting is not None or self.pending.empty():
            return
        if not isinstance(self.pending.peek(), AudioChunk) or self._session().server_ended:
            self._wake_writer()
            return
        batch = self._take_audio()
        fut = self.ctx.ingest.start_ingest(self._sid(), batch)
        self._ingesting = (fut, batch)
        fut.add_done_callback(self._ingested)

    def _ingested(self, fut: asyncio.Future[IngestResult]) -> None:
        """A call `_kick` made is answered: ack it and go on from here, or leave it to
        the writer (woken meanwhile, or woken now for anything but a plain ack)."""
        ingesting = self._ingesting
        if ingesting is None or ingesting[0] is not fut or not self._parked():
            return  # the writer settles it (or the connection ended)
        try:
            if not fut.cancelled() and fut.exception() is None:
                result = fut.result()
                if result.audio_bytes < self._max_audio_bytes and send_now(
                    self.ws, ack_text(result.next_seq - 1)
                ):
                    self.ctx.ack_seconds.observe(time.perf_counter() - self._batch_arrived)
                    self._ingesting = None
                    self._metered(ingesting[1], result.stored)
                    self.ctx.metrics.inc('audio_writes_total{path="callback"}')
                    self._kick()
                    return
        except Exception as exc:  # a bug: the writer raises it (an internal error)
            self._callback_error = exc
        self._wake_writer()

    async def _settle(self) -> None:
        """The call `_kick` made: its ack and max_duration, or, if it failed, the same
        call again with retries and the errors mapped to the wire (it is idempotent)."""
        assert self._ingesting is not None
        fut, batch = self._ingesting
        self._ingesting = None
        try:
            if fut.cancelled():
                raise BatcherClosed("call cancelled")  # not this task: make the call again
            result = await fut
        except Exception:
            await self._store_audio(batch)
            return
        self._metered(batch, result.stored)
        self.ctx.metrics.inc('audio_writes_total{path="callback"}')
        await self._stored(result)

    async def _queue(self, item: AudioChunk | Control) -> None:
        """Queue for the writer (waiting while the queue is full: back-pressure)."""
        await self.pending.put(item)
        self._kick()

    async def _store_audio(self, batch: list[AudioChunk]) -> None:
        sid = self._sid()
        try:
            result = await self._with_retries(lambda: self.ctx.ingest.ingest(sid, batch))
        except SessionGone as gone:
            self._session_gone(gone)
        except SeqGap as gap:
            raise reconnect(
                f"audio out of order; resume and resend from seq {gap.next_seq}"
            ) from None
        except BatcherClosed:
            raise reconnect("gateway draining; reconnect and resume") from None
        self._metered(batch, result.stored)
        self.ctx.metrics.inc('audio_writes_total{path="task"}')
        await self._stored(result)

    async def _stored(self, result: IngestResult) -> None:
        """Audio is stored: ack it (unless the connection has ended); end the stream at
        max_duration."""
        # The ack is the one message per frame: its JSON from a template, not the codec
        # (same text as build_server_message(Ack(seq)); tests/unit/test_ingest_batcher.py).
        if not self._acks_off:
            try:
                await self._send_text(ack_text(result.next_seq - 1))
                self.ctx.ack_seconds.observe(time.perf_counter() - self._batch_arrived)
            except ConnectionClosed:
                # The connection is ending: the reader may still hand over frames that
                # came before its end, which are stored all the same (`_store_rest`).
                self._acks_off = True
        if self._acks_off:
            self.ctx.metrics.inc("audio_frames_stored_after_close_total", result.stored)
        if result.audio_bytes >= self._max_audio_bytes and not self._session().server_ended:
            # Stored directly: the writer must never wait on its own (possibly full) queue.
            self._session().mark_closing()
            log.info("session %s: server ends the stream (max_duration)", self.sid)
            await self._store_control(Control(kind="close", reason="max_duration"))

    async def _store_control(self, control: Control) -> None:
        sid = self._sid()
        try:
            await self._with_retries(lambda: self.ctx.store.append_control(sid, control))
        except SessionGone as gone:
            if control.reason in ("idle_timeout", "max_duration"):
                return  # the session was closed meanwhile: nothing left to end
            self._session_gone(gone)
        log.info("session %s: %s (%s)", sid, control.kind, control.reason or "client")

    async def _results(self) -> None:
        assert self.events is not None
        while True:
            if self.delivery.needs_catch_up:
                await self._catch_up()
            if self.delivery.done:
                break
            data = await self.events.get()
            if data == RECONCILE:
                self.delivery.needs_catch_up = True
                continue
            item = envelope.decode(data)
            if isinstance(item, Replaced):
                if item.conn != self.conn_id:
                    raise CloseWithoutError(
                        4409, "replaced by a newer connection resuming the session"
                    )
                continue
            if isinstance(item, Transcript | Closed):
                await self._forward(self.delivery.offer(item))
            if self.delivery.done:
                break
        await self._finish()

    async def _forward(self, outs: list[Transcript | Closed]) -> None:
        for out in outs:
            if isinstance(out, Closed) and out.reason == "failed":
                # Dead-lettered: not a normal end of session (protocol: error + 1011).
                self._session().mark_closed()
                raise SessionFailed(
                    "transcription of this session failed repeatedly; it was stopped "
                    f"after {out.final_results} final result(s)"
                )
            await self._send(out)

    async def _catch_up(self) -> None:
        self.delivery.needs_catch_up = False
        sid = self._sid()
        try:
            entries = await self._with_retries(
                lambda: self.ctx.results.read(sid, self.results_after)
            )
        except BatcherClosed:
            raise reconnect("gateway draining; reconnect and resume") from None
        for entry_id, item in entries:
            self.results_after = entry_id
            await self._forward(self.delivery.offer(item))

    async def _queue_watch(self) -> None:
        """While no worker has claimed the session: tell the client its place in the
        fleet's queue (`queued`) when it changes; past `max_queue_wait_s`, give up (1013)."""
        if self.queue is None:
            return
        priority, index, waited_s = self.queue
        sid = self._sid()
        waited_since = self.loop.time() - waited_s
        last: int | None = None
        await asyncio.sleep(min(QUEUED_AFTER_S, self.cfg.max_queue_wait_s))
        while True:
            epoch = await self._with_retries(lambda: self.ctx.store.epoch(sid))
            if epoch is None or epoch > 0:
                return  # claimed (or gone: the writer will say so)
            position = await self._with_retries(
                lambda: self.ctx.admission.position(priority, index)
            )
            if position > 0 and position != last:
                await self._send(Queued(position))
                last = position
            if self.loop.time() - waited_since >= self.cfg.max_queue_wait_s:
                if await self._with_retries(lambda: self.ctx.store.cancel_queued(sid)):
                    self.ctx.metrics.inc("sessions_queue_timeout_total")
                    raise Overloaded(
                        f"overloaded: no worker became free within {self.cfg.max_queue_wait_s:g}s"
                        "; try again later"
                    )
            await asyncio.sleep(self.cfg.queue_update_s)

    async def _watchdog(self) -> None:
        session = self._session()
        poll_s = min(1.0, self.cfg.idle_timeout_s / 4)
        while True:
            if session.state is not ConnectionState.STREAMING:
                await asyncio.sleep(poll_s)
                continue
            # Sleep until the idle deadline rather than polling: while audio flows that
            # is one wake-up per idle_timeout_s per connection, not one per second.
            idle_s = self.loop.time() - self.last_activity
            if idle_s >= self.cfg.idle_timeout_s:
                await self._server_close("idle_timeout")
            else:
                await asyncio.sleep(self.cfg.idle_timeout_s - idle_s)

    # --- helpers -------------------------------------------------------------------------

    async def _server_close(self, reason: CloseReason) -> None:
        self._session().mark_closing()
        log.info("session %s: server ends the stream (%s)", self.sid, reason)
        await self._queue(Control(kind="close", reason=reason))

    async def _finish(self) -> None:
        session = self._session()
        session.mark_closed()
        closed = self.delivery.closed
        log.info(
            "session %s closed (%s, %d finals)",
            self.sid,
            closed.reason if closed else "?",
            self.delivery.next_result_id,
        )
        await self.ws.close(1000, "session closed")

    def _session_gone(self, gone: SessionGone) -> NoReturn:
        if gone.reason == "unknown":
            raise NotFound("the session expired or no longer exists")
        raise ProtocolViolation("the session has ended and accepts no more audio or commands")

    async def _with_retries(self, call: Callable[[], Awaitable[T]]) -> T:
        """Retry idempotent Redis calls across brief outages, then ask for a resume."""
        delay = 0.05
        for attempt in range(REDIS_RETRIES):
            try:
                return await call()
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if attempt == REDIS_RETRIES - 1:
                    raise reconnect(
                        "storage temporarily unavailable; reconnect and resume"
                    ) from exc
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def _send(self, msg: ServerMessage) -> None:
        await self._send_text(build_server_message(msg))

    async def _send_text(self, text: str) -> None:
        """Every message to the client: written at once when the socket can take it
        (`send_now`), else through `ws.send` and its back-pressure."""
        if not send_now(self.ws, text):
            await self.ws.send(text)

    async def _fail(self, err: StreamscribeError) -> None:
        if isinstance(err, Internal):
            self.ctx.metrics.inc('errors_total{code="internal"}')
        else:
            self.ctx.metrics.inc(f'errors_total{{code="{err.code}"}}')
            log.info("session %s: %s (%d): %s", self.sid, err.code, err.close_code, err.message)
        with contextlib.suppress(ConnectionClosed):
            await self._send(error_message(err))
        await self._close(err.close_code, err.message)

    async def _close(self, code: int, reason: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self.ws.close(code, close_reason(reason))

    def _session(self) -> ServerSession:
        assert self.session is not None
        return self.session

    def _sid(self) -> SessionId:
        assert self.sid is not None
        return self.sid
