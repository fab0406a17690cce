"""Typed access to the Redis layout of shared/keys.py, for gateways and workers.

Every read and write of session state goes through `Store`; call sites see envelopes and
small value objects, never raw replies.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

try:  # redis-py 5's C parser and its "need more bytes" marker (a private module)
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
    from redis._parsers.hiredis import _AsyncHiredisParser
except ImportError:  # pragma: no cover - another redis-py layout: the public path only
    _AsyncHiredisParser = None  # type: ignore[assignment,misc]
    _NOT_ENOUGH_DATA = object()

from shared import envelope, keys, scripts
from shared.envelope import AudioChunk, Closed, Control, Transcript
from shared.keys import SessionId, WorkerId
from shared.protocol import SessionParams


def now_ms() -> int:
    return int(time.time() * 1000)


class WaitingPool(aioredis.ConnectionPool):
    """redis-py's own pool, except that a caller who finds `max_connections` in use waits
    up to `wait_s` for one to be given back instead of failing at once ("Too many
    connections"); then it fails with `ConnectionError("No connection available.")`.

    Below the limit a connection is taken and given back exactly as redis-py's pool does
    it, so the limit costs nothing until it is reached (redis-py's
    `BlockingConnectionPool` takes a lock for every connection given back and hands them
    out through a condition; docs/benchmarks.md, *Redis connection limit*)."""

    def __init__(self, *, wait_s: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.wait_s = wait_s
        self._waiters: list[asyncio.Future[None]] = []

    async def get_connection(self, *_args: Any, **_options: Any) -> AbstractConnection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while True:
            if self.can_get_connection():
                try:
                    return cast(AbstractConnection, await super().get_connection())
                except RedisConnectionError:
                    if self.can_get_connection():
                        raise  # a real failure, not the limit reached meanwhile
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RedisConnectionError("No connection available.")
            freed: asyncio.Future[None] = loop.create_future()
            self._waiters.append(freed)
            try:
                await asyncio.wait_for(freed, remaining)
            except TimeoutError:
                pass  # checked once more, then refused
            finally:
                if freed in self._waiters:
                    self._waiters.remove(freed)

    async def release(self, connection: AbstractConnection) -> None:
        await super().release(connection)
        if self._waiters:
            waiters, self._waiters = self._waiters, []
            for freed in waiters:
                if not freed.done():
                    freed.set_result(None)


def connect(
    url: str, name: str | None = None, *, max_connections: int = 0, pool_wait_s: float = 5.0
) -> aioredis.Redis:
    """A client on its own `connection_pool` (the arguments are that function's);
    closing the client closes the pool."""
    return aioredis.Redis.from_pool(
        connection_pool(url, name, max_connections=max_connections, pool_wait_s=pool_wait_s)
    )


def connection_pool(
    url: str, name: str | None = None, *, max_connections: int = 0, pool_wait_s: float = 5.0
) -> aioredis.ConnectionPool:
    """A pool with sane timeouts and reconnects; bytes in, bytes out. TCP keepalive
    for redis:// and rediss:// (a Unix socket has none: redis-py refuses the option).
    With `name` (`keys.client_name`), every connection of the pool sets it as its client
    name (`CLIENT SETNAME` on connect), so `CLIENT LIST` tells whose it is.

    With `max_connections` (> 0) the pool (`WaitingPool`) opens at most that many
    connections, pub/sub and kept connections (`KeptConnection`) included: a command
    that finds them all busy waits up to `pool_wait_s` for one, then fails with
    redis-py's `ConnectionError` ("No connection available."). Without, the pool opens
    one whenever every open one is busy (redis-py's default), so a burst of commands
    opens a burst of connections."""
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": 5,
        "health_check_interval": 30,
        "retry_on_timeout": True,
    }
    if not url.startswith("unix://"):
        options["socket_keepalive"] = True
    if name is not None:
        options["client_name"] = name
    if max_connections > 0:
        return WaitingPool.from_url(
            url, max_connections=max_connections, wait_s=pool_wait_s, **options
        )
    return aioredis.ConnectionPool.from_url(url, **options)


@dataclass(frozen=True, slots=True)
class SessionMeta:
    """The parts of a session's meta hash the gateway and worker read."""

    session_id: SessionId
    state: str
    params: SessionParams
    token_hash: str
    next_seq: int
    finals: int
    audio_bytes: int
    epoch: int
    owner: str
    conn: str
    dispatch_index: int = 0
    #: When the session was created (unix ms): when it joined the dispatch queue.
    created_ms: int = 0
    #: The language a `language=auto` session's detections fixed it on ("" until then).
    language_locked: str = ""

    @property
    def audio_seconds(self) -> float:
        return self.audio_bytes / self.params.bytes_per_second


@dataclass(frozen=True, slots=True)
class IngestResult:
    next_seq: int
    stored: int
    audio_bytes: int


@dataclass(frozen=True, slots=True)
class ClaimResult:
    epoch: int
    ckpt_entry: str
    ckpt_sample: int
    finals: int
    ckpt_base: int


@dataclass(frozen=True, slots=True)
class Contested:
    """Another worker holds a live lease on the session; it runs out in `pttl_ms`."""

    pttl_ms: int


class SessionGone(Exception):
    """The session is unknown, expired, or no longer accepts what was sent."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "unknown" or "not_open"


class SeqGap(Exception):
    """Frames would leave a gap in the session's audio; resend from `next_seq`."""

    def __init__(self, next_seq: int) -> None:
        super().__init__(f"gap: next stored seq is {next_seq}")
        self.next_seq = next_seq


def _s(value: bytes | None, default: str = "") -> str:
    return value.decode() if value is not None else default


def _ingest_args(chunks: Sequence[AudioChunk]) -> list[Any]:
    """INGEST's ARGV: the first seq, then envelope and PCM length per frame."""
    args: list[Any] = [chunks[0].seq]
    for chunk in chunks:
        args += [envelope.encode(chunk), len(chunk.pcm)]
    return args


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%b\r\n" % (len(value), value)


class KeptConnection:
    """One connection taken from the client's pool once and kept, for a stream of
    hand-packed commands or pipelines that should not pay the pool's check on every take
    (a non-blocking read under a timeout: as much as packing the commands). Taken from
    the pool, so closing the client closes it. One user at a time (a lock). A connection
    error disconnects it, with whatever replies were left unread, and propagates; the
    next use connects again."""

    def __init__(self, redis: aioredis.Redis) -> None:
        self._redis = redis
        self._conn: AbstractConnection | None = None
        self._lock = asyncio.Lock()

    async def send(self, packed: bytes, replies: int) -> list[Any]:
        """Write `packed` (RESP commands) and read `replies` replies, in order; an error
        reply (`ResponseError`) is returned in its place, not raised."""
        async with self._lock:
            conn = self._conn
            if conn is None:
                conn = self._conn = await self._redis.connection_pool.get_connection()
            try:
                await conn.send_packed_command(packed)
                return await read_replies(conn, replies)
            except BaseException:
                await conn.disconnect()  # replies may be left unread on it
                raise


async def read_replies(conn: AbstractConnection, count: int) -> list[Any]:
    """The next `count` replies on `conn`, in order; an error reply (`ResponseError`) is
    returned in its place, not raised.

    With redis-py's hiredis parser they are taken from its reader directly: redis-py's
    `read_response` wraps each reply in bookkeeping (the host's name formatted for a
    possible error, the loop's time for the health check: a getpid() system call on
    Python 3.11) that was two thirds of reading an INGEST reply (~3 against ~1 us), and
    the gateway reads one per audio frame. (Reads made here do not move redis-py's
    health-check clock, so a busy kept connection sends one PING every
    `health_check_interval`, 30 s, before its next command.) Anything else (another
    parser, a connection being torn down) takes the public path."""
    parser = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if (
        _AsyncHiredisParser is None
        or not isinstance(parser, _AsyncHiredisParser)
        or reader is None
        or not parser._connected
    ):
        out: list[Any] = []
        for _ in range(count):
            try:
                out.append(await conn.read_response())
            except ResponseError as exc:
                out.append(exc)
        return out
    gets = reader.gets
    replies: list[Any] = []
    try:
        for _ in range(count):
            reply = gets()
            while reply is _NOT_ENOUGH_DATA:
                await parser.read_from_socket()  # type: ignore[no-untyped-call]
                reply = gets()
            # As redis-py's own read: a connection-level error reply is raised.
            if isinstance(reply, RedisConnectionError):
                raise reply
            replies.append(reply)
    except OSError as exc:
        raise RedisConnectionError(f"Error while reading from Redis: {exc}") from exc
    return replies


@dataclass(frozen=True, slots=True)
class ScriptCall:
    """One script call for `Store.publish_many`: the script, its KEYS and ARGV."""

    script: AsyncScript
    keys: tuple[str, ...]
    args: tuple[str | bytes | int, ...]


def _arg(value: str | bytes | int) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return b"%d" % value


def _pack_evalsha(call: ScriptCall) -> bytes:
    """`EVALSHA sha numkeys KEYS... ARGV...` in RESP, as redis-py's `pack_command` makes it."""
    parts = [
        b"*%d\r\n$7\r\nEVALSHA\r\n" % (3 + len(call.keys) + len(call.args)),
        _bulk(call.script.sha.encode()),
        _bulk(b"%d" % len(call.keys)),
    ]
    parts += [_bulk(k.encode()) for k in call.keys]
    parts += [_bulk(_arg(a)) for a in call.args]
    return b"".join(parts)


def pack_ingest_calls(sha: str, calls: Sequence[tuple[SessionId, Sequence[AudioChunk]]]) -> bytes:
    """`EVALSHA sha 2 meta audio ARGV…` per call (ARGV from `_ingest_args`), in RESP, as
    one buffer: the same bytes redis-py's `pack_command` makes for each call. Each
    frame's envelope is written around its samples (`envelope.audio_head`), so the
    samples are copied once, into this buffer."""
    head = b"$7\r\nEVALSHA\r\n" + _bulk(sha.encode()) + b"$1\r\n2\r\n"
    tail = envelope.AUDIO_TAIL + b"\r\n"
    extra = len(envelope.AUDIO_TAIL)
    parts: list[bytes] = []
    for sid, chunks in calls:
        parts += (
            b"*%d\r\n" % (6 + 2 * len(chunks)),
            head,
            _bulk(keys.meta(sid).encode()),
            _bulk(keys.audio(sid).encode()),
            _bulk(b"%d" % chunks[0].seq),
        )
        for chunk in chunks:
            pcm = chunk.pcm
            size = len(pcm)
            env = envelope.audio_head(chunk.seq, size)
            count = b"%d" % size
            parts += (
                b"$%d\r\n%b" % (len(env) + size + extra, env),
                pcm,
                b"%b$%d\r\n%b\r\n" % (tail, len(count), count),
            )
    return b"".join(parts)


def _results_of(
    entries: Sequence[tuple[bytes, dict[bytes, bytes]]],
) -> list[tuple[bytes, Transcript | Closed]]:
    """The finals and closing summary among results-stream entries, with their IDs."""
    out: list[tuple[bytes, Transcript | Closed]] = []
    for entry_id, fields in entries:
        item = envelope.decode_entry(fields)
        if isinstance(item, Transcript | Closed):
            out.append((entry_id, item))
    return out


def _ingest_result(reply: Sequence[Any]) -> IngestResult:
    """INGEST's reply as a result, or the error it stands for."""
    next_seq, stored, total = reply
    if next_seq == -1:
        raise SessionGone("unknown")
    if next_seq == -2:
        raise SessionGone("not_open")
    if next_seq == -3:
        raise SeqGap(int(total))
    return IngestResult(next_seq=int(next_seq), stored=int(stored), audio_bytes=int(total))


class Store:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self._ingest = redis.register_script(scripts.INGEST)
        self._control = redis.register_script(scripts.CONTROL)
        self._claim = redis.register_script(scripts.CLAIM)
        self._renew = redis.register_script(scripts.RENEW)
        self._interim = redis.register_script(scripts.PUBLISH_INTERIM)
        self._final = redis.register_script(scripts.PUBLISH_FINAL)
        self._close = redis.register_script(scripts.CLOSE)
        self._release = redis.register_script(scripts.RELEASE)
        self._attach = redis.register_script(scripts.ATTACH)
        self._detach = redis.register_script(scripts.DETACH)
        self._quota_take = redis.register_script(scripts.QUOTA_TAKE)
        self._quota_hold = redis.register_script(scripts.QUOTA_HOLD)
        self._usage_sync = redis.register_script(scripts.USAGE_SYNC)
        self._abandon = redis.register_script(scripts.ABANDON)
        self._cancel_queued = redis.register_script(scripts.CANCEL_QUEUED)
        self._dispatch = redis.register_script(scripts.DISPATCH)
        #: The connections kept for the hand-packed hot paths: the gateway's audio, the
        #: worker's reads and its publishes.
        self._ingest_conn = KeptConnection(redis)
        self._read_conn = KeptConnection(redis)
        self._publish_conn = KeptConnection(redis)

    # --- gateway side ----------------------------------------------------------------

    async def create_session(
        self, sid: SessionId, params: SessionParams, token_hash: str, conn: str
    ) -> int:
        """Write the session's meta, then announce it on its priority's dispatch lane.

        Two round trips: the meta hash and the dispatch entry (`DISPATCH`: the `XADD` and
        the lane's `entries-added`) pipelined in that order, then the entry's ID and place
        into the meta hash (the dispatch stream lives in another cluster slot, so no one
        script does both). A worker that claims a dispatch entry whose meta is missing
        simply acknowledges it. Returns the entry's place in its lane: the lane's
        `entries-added` counter just after the add (compared with the consumer group's
        `entries-read` to tell the queue position).
        """
        mapping: dict[str, Any] = {
            "state": "open",
            "created_ms": now_ms(),
            "sample_rate": params.sample_rate,
            "encoding": params.encoding,
            "channels": params.channels,
            "language": params.language or "",
            "interim": int(params.interim_results),
            "model": params.model or "",
            "priority": params.priority,
            "token": token_hash,
            "next_seq": 0,
            "finals": 0,
            "audio_bytes": 0,
            "epoch": 0,
            "conn": conn,
        }
        # No MAXLEN on the dispatch entry: a cap could trim entries still pending. The
        # maintenance job trims with MINID below the oldest entry a worker still needs.
        lane = keys.dispatch(params.priority)
        dispatch = envelope.encode(envelope.Dispatch(sid))
        for attempt in range(2):
            # One round trip: the meta first, then the entry (a pipeline keeps the order).
            # By EVALSHA, not the Script object: in a pipeline that would first ask
            # SCRIPT EXISTS, a round trip of its own on every session start.
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(keys.meta(sid), mapping=mapping)
            pipe.evalsha(self._dispatch.sha, 1, lane, sid, dispatch)  # type: ignore[arg-type]
            written, reply = await pipe.execute(raise_on_error=False)
            if isinstance(written, Exception):
                raise written
            if not isinstance(reply, NoScriptError) or attempt:
                break
            # The server lost its script cache: no entry was added; load it and redo
            # both (the meta hash is written again with the same values).
            self._dispatch.sha = await self.redis.script_load(scripts.DISPATCH)
        if isinstance(reply, Exception):
            raise reply
        entry_id, added = reply
        index = int(added)
        await cast(
            Awaitable[int],
            self.redis.hset(
                keys.meta(sid), mapping={"dispatch_id": _s(entry_id), "dispatch_index": index}
            ),
        )
        return index

    async def load_meta(self, sid: SessionId) -> SessionMeta | None:
        raw = await cast(Awaitable[dict[bytes, bytes]], self.redis.hgetall(keys.meta(sid)))
        if not raw or b"state" not in raw:
            return None
        get = raw.get
        params = SessionParams(
            sample_rate=int(get(b"sample_rate", b"16000")),
            encoding=_s(get(b"encoding"), "pcm_s16le"),
            channels=int(get(b"channels", b"1")),
            language=_s(get(b"language")) or None,
            interim_results=get(b"interim", b"1") == b"1",
            model=_s(get(b"model")) or None,
            priority=_s(get(b"priority")) or "normal",
        )
        return SessionMeta(
            session_id=sid,
            state=_s(get(b"state")),
            params=params,
            token_hash=_s(get(b"token")),
            next_seq=int(get(b"next_seq", b"0")),
            finals=int(get(b"finals", b"0")),
            audio_bytes=int(get(b"audio_bytes", b"0")),
            epoch=int(get(b"epoch", b"0")),
            owner=_s(get(b"owner")),
            conn=_s(get(b"conn")),
            dispatch_index=int(get(b"dispatch_index", b"0")),
            created_ms=int(get(b"created_ms", b"0")),
            language_locked=_s(get(b"language_locked")),
        )

    async def ingest(self, sid: SessionId, chunks: Sequence[AudioChunk]) -> IngestResult:
        """Append frames atomically; already stored seqs are skipped."""
        reply = await self._ingest(
            keys=[keys.meta(sid), keys.audio(sid)], args=_ingest_args(chunks)
        )
        return _ingest_result(reply)

    async def ingest_many(
        self, calls: Sequence[tuple[SessionId, Sequence[AudioChunk]]]
    ) -> list[IngestResult | SessionGone | SeqGap | ResponseError]:
        """`ingest` for several sessions in one round trip: one pipeline (no MULTI) of
        INGEST script calls, one per (session, frames) pair, each on that session's own
        keys (so each call stays in one cluster slot) and each atomic by itself.

        Returns, per call and in order, its result or the error `ingest` would have
        raised for it. A connection error (nothing known about any call) is raised; the
        calls are idempotent, so the caller may resend them all.
        """
        if not calls:
            return []
        replies = await self._ingest_pipeline(calls)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            # The server lost its script cache (restart, SCRIPT FLUSH, failover): a
            # NOSCRIPT call did not run, so load the script and send just those again.
            self._ingest.sha = await self.redis.script_load(scripts.INGEST)
            again = await self._ingest_pipeline([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        out: list[IngestResult | SessionGone | SeqGap | ResponseError] = []
        for reply in replies:
            if isinstance(reply, ResponseError):
                out.append(reply)
                continue
            try:
                out.append(_ingest_result(reply))
            except (SessionGone, SeqGap) as exc:
                out.append(exc)
        return out

    async def _ingest_pipeline(
        self, calls: Sequence[tuple[SessionId, Sequence[AudioChunk]]]
    ) -> list[Any]:
        """Plain EVALSHA commands written as one buffer on one pooled connection, and
        their replies read back in order (an error reply is returned, not raised).

        This is what `pipeline(transaction=False)` does, packed here instead: the gateway
        sends thousands of these per second and redis-py's general command packing and
        per-command bookkeeping were a fifth of its CPU. Not the Script object either: in
        a pipeline that would first ask SCRIPT EXISTS. NOSCRIPT is handled by the caller.
        A connection error propagates with the connection dropped (nothing is known about
        any call; they are idempotent).

        The connection is kept between pipelines (`KeptConnection`)."""
        return await self._ingest_conn.send(pack_ingest_calls(self._ingest.sha, calls), len(calls))

    async def append_control(self, sid: SessionId, control: Control) -> None:
        new_state = "closing" if control.kind == "close" else ""
        rc = await self._control(
            keys=[keys.meta(sid), keys.audio(sid)], args=[envelope.encode(control), new_state]
        )
        if rc == -1:
            raise SessionGone("unknown")
        if rc == -2:
            raise SessionGone("not_open")

    async def epoch(self, sid: SessionId) -> int | None:
        """The session's ownership epoch: 0 until a worker claims it; None if it is gone."""
        raw = await self.redis.hget(keys.meta(sid), "epoch")  # type: ignore[misc]
        return None if raw is None else int(raw)

    async def cancel_queued(self, sid: SessionId) -> bool:
        """Delete a session that no worker has claimed yet (queue wait exceeded)."""
        return bool(
            await self._cancel_queued(keys=[keys.meta(sid), keys.audio(sid), keys.results(sid)])
        )

    async def attach(self, sid: SessionId, conn: str) -> str | None:
        """Mark `conn` as the session's connection; returns the one it replaced ('' none)."""
        prev = await self._attach(keys=[keys.meta(sid)], args=[conn])
        await self.redis.zrem(keys.DETACHED, sid)
        return None if prev is None else _s(prev)

    async def detach(self, sid: SessionId, conn: str, grace_s: float) -> bool:
        """Start the resume grace period if `conn` still holds the session."""
        if not await self._detach(keys=[keys.meta(sid)], args=[conn]):
            return False
        await self.redis.zadd(keys.DETACHED, {sid: now_ms() + int(grace_s * 1000)})
        return True

    # --- per-API-key quota (max_sessions_per_key) -----------------------------------------

    async def quota_take(
        self, key_id: str, sid: SessionId, most: int, hold_s: float
    ) -> tuple[bool, int]:
        """Count `sid` against API key `key_id` for `hold_s` unless `most` other sessions
        count already: (counted, sessions counted now). Forgets sessions whose time passed."""
        now = now_ms()
        counted, n = await self._quota_take(
            keys=[keys.quota(key_id)], args=[sid, now, now + int(hold_s * 1000), most]
        )
        return bool(counted), int(n)

    async def quota_hold(
        self, held: Mapping[str, Sequence[SessionId]], hold_s: float, *, renew: bool = False
    ) -> None:
        """Count these sessions (by API key ID) until `hold_s` from now, whatever the
        limit: one script call per key, all in one pipeline. `renew` (the heartbeat)
        only moves forward the sessions still counted (QUOTA_HOLD)."""
        until = now_ms() + int(hold_s * 1000)
        flag = "1" if renew else "0"
        pipe = self.redis.pipeline(transaction=False)
        calls = 0
        for key_id, sids in held.items():
            if sids:
                args: list[str | int] = [until, flag, *sids]
                await self._quota_hold(keys=[keys.quota(key_id)], args=args, client=pipe)
                calls += 1
        if calls:
            await pipe.execute()

    async def quota_release(self, key_id: str, sid: SessionId) -> None:
        """`sid` no longer counts against its API key (it ended)."""
        await self.redis.zrem(keys.quota(key_id), sid)

    # --- audio used per API key (usage_window_s, audio_budget_s) -------------------------

    async def usage_sync(
        self, gateway_id: str, totals: Sequence[tuple[str, int, int]], ttl_s: int
    ) -> list[int]:
        """Write this gateway's running totals, (API key ID, window start, microseconds),
        each into its key's usage hash (USAGE_SYNC), in one pipeline; returns each one's
        fleet total (microseconds), in order."""
        if not totals:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for key_id, window, us in totals:
            await self._usage_sync(
                keys=[keys.usage(key_id, window)], args=[gateway_id, us, ttl_s], client=pipe
            )
        return [int(total) for total in await pipe.execute()]

    async def publish_replaced(self, sid: SessionId, conn: str) -> None:
        """Tell whichever gateway holds the session's older connection to close it (4409)."""
        await self.redis.publish(keys.events_channel(sid), envelope.encode(envelope.Replaced(conn)))

    async def reap_detached(self, limit: int = 100) -> list[SessionId]:
        """Close sessions whose resume grace has ended (reason `abandoned`).

        Safe to run on every gateway at once: ZREM decides which caller handles an entry.
        """
        due = await self.redis.zrangebyscore(keys.DETACHED, "-inf", now_ms(), start=0, num=limit)
        done: list[SessionId] = []
        mark = envelope.encode(Control(kind="close", reason="abandoned"))
        for raw in due:
            sid = SessionId(_s(raw))
            if not await self.redis.zrem(keys.DETACHED, sid):
                continue  # another gateway took it
            if await self._abandon(keys=[keys.meta(sid), keys.audio(sid)], args=[mark]):
                done.append(sid)
        return done

    async def read_results(
        self, sid: SessionId, after_id: bytes = b"0-0", count: int = 500
    ) -> list[tuple[bytes, Transcript | Closed]]:
        """Finals and the closing summary recorded after stream entry `after_id`."""
        entries = await self.redis.xrange(keys.results(sid), min=b"(" + after_id, count=count)
        return _results_of(entries)

    async def read_results_many(
        self, reads: Sequence[tuple[SessionId, bytes]], count: int = 500
    ) -> list[list[tuple[bytes, Transcript | Closed]] | ResponseError]:
        """`read_results` for many sessions in one pipeline (one round trip); a command
        that failed gives its error in its place."""
        pipe = self.redis.pipeline(transaction=False)
        for sid, after_id in reads:
            pipe.xrange(keys.results(sid), min=b"(" + after_id, count=count)
        replies = await pipe.execute(raise_on_error=False)
        return [r if isinstance(r, ResponseError) else _results_of(r) for r in replies]

    async def alive_workers(self, alive_s: float) -> int:
        return int(await self.redis.zcount(keys.WORKERS, now_ms() - int(alive_s * 1000), "+inf"))

    # --- worker side ------------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the workers' consumer group on every dispatch lane (idempotent)."""
        for lane in keys.DISPATCH_LANES:
            try:
                await self.redis.xgroup_create(lane, keys.DISPATCH_GROUP, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def claim(
        self, sid: SessionId, wid: WorkerId, lease_s: float
    ) -> ClaimResult | Contested | None:
        """Take the session (bumping its epoch); None if it is unknown or closed."""
        reply = await self._claim(
            keys=[keys.meta(sid), keys.lease(sid)], args=[wid, int(lease_s * 1000)]
        )
        if int(reply[0]) == 0:
            return Contested(pttl_ms=max(0, int(reply[1])))
        if int(reply[0]) < 0:
            return None
        return ClaimResult(
            epoch=int(reply[0]),
            ckpt_entry=_s(reply[1]),
            ckpt_sample=int(reply[2]),
            finals=int(reply[3]),
            ckpt_base=int(reply[4]),
        )

    async def renew_many(
        self, leases: Sequence[tuple[SessionId, str]], lease_s: float
    ) -> list[bool]:
        """Renew the leases of many (session, token) pairs with `RENEW`, in one pipeline
        (one round trip, plus one to load the script if the server lost it); True where
        the lease was still held and is now renewed for `lease_s`."""
        if not leases:
            return []
        pipe = self.redis.pipeline(transaction=False)
        ms = int(lease_s * 1000)
        for sid, token in leases:
            await self._renew(keys=[keys.lease(sid)], args=[token, ms], client=pipe)  # queued
        return [bool(r) for r in await pipe.execute()]

    async def publish_interim(self, sid: SessionId, token: str, item: Transcript) -> bool:
        return bool(await self._run(self.interim_call(sid, token, item)))

    def interim_call(self, sid: SessionId, token: str, item: Transcript) -> ScriptCall:
        """`publish_interim` as a `publish_many` call: its reply is 1, or 0 when fenced."""
        return ScriptCall(
            self._interim,
            (keys.lease(sid),),
            (token, keys.events_channel(sid), envelope.encode(item)),
        )

    def final_call(
        self,
        sid: SessionId,
        token: str,
        item: Transcript,
        ckpt_entry: str,
        ckpt_sample: int,
        ckpt_base: int,
        language_locked: str = "",
    ) -> ScriptCall:
        """`publish_final` as a `publish_many` call: the same reply."""
        return ScriptCall(
            self._final,
            (keys.meta(sid), keys.lease(sid), keys.results(sid), keys.audio(sid)),
            (
                token,
                item.result_id,
                envelope.encode(item),
                keys.events_channel(sid),
                ckpt_entry,
                ckpt_sample,
                ckpt_base,
                language_locked,
            ),
        )

    async def publish_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run interim and final publishes of many sessions in one round trip: one
        pipeline (no MULTI) of EVALSHAs, each atomic by itself and on one session's keys.
        Returns each call's reply in order, or its `ResponseError` in its place; a
        connection error is raised (nothing is known about any call).

        Packed by hand on a connection kept for it (`KeptConnection`): through
        redis-py's Script objects each publish cost a pool take, a retry wrapper and its
        general packing, about a sixth of a null-engine worker at 500 sessions. A
        NOSCRIPT reply (the server lost its script cache) loads the script and sends just
        those calls again."""
        if not calls:
            return []
        replies = await self._script_pipeline(calls)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            for script in {id(calls[i].script): calls[i].script for i in missing}.values():
                script.sha = await self.redis.script_load(script.script)
            again = await self._script_pipeline([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _script_pipeline(self, calls: Sequence[ScriptCall]) -> list[Any]:
        packed = b"".join(_pack_evalsha(call) for call in calls)
        return await self._publish_conn.send(packed, len(calls))

    async def publish_final(
        self,
        sid: SessionId,
        token: str,
        item: Transcript,
        ckpt_entry: str,
        ckpt_sample: int,
        ckpt_base: int,
        language_locked: str = "",
    ) -> int:
        """Record and publish a final (and the language it fixed an `auto` session on, if
        any). Returns the new count; -1 fenced; -2 stale numbering."""
        call = self.final_call(
            sid, token, item, ckpt_entry, ckpt_sample, ckpt_base, language_locked
        )
        return int(await self._run(call))

    @staticmethod
    async def _run(call: ScriptCall) -> Any:
        """One `ScriptCall` on its own (redis-py's Script: loads it if the server lacks it)."""
        return await call.script(keys=list(call.keys), args=list(call.args))

    async def close_session(
        self, sid: SessionId, token: str, summary: Closed, ttl_s: float
    ) -> bool:
        rc = await self._close(
            keys=[keys.meta(sid), keys.lease(sid), keys.results(sid), keys.audio(sid)],
            args=[
                token,
                envelope.encode(summary),
                keys.events_channel(sid),
                max(1, int(ttl_s)),
                summary.reason,
            ],
        )
        return int(rc) == 1

    async def release(self, sid: SessionId, token: str) -> bool:
        return bool(await self._release(keys=[keys.lease(sid)], args=[token]))

    async def record_failure(self, sid: SessionId, why: str) -> None:
        """Note why a worker gave a session up; the dead-letter entry quotes the last one."""
        await self.redis.hset(keys.meta(sid), "last_error", why[:500])  # type: ignore[misc]

    async def hand_back(
        self, wid: WorkerId, lane: str, entry_ids: Sequence[bytes], idle_ms: int
    ) -> None:
        """Mark dispatch entries idle for `idle_ms` so another worker's XAUTOCLAIM takes
        them at once (a stopping worker's sessions; an entry read without a free slot).

        A hand-back is not a failure: the delivery counter is set one lower, so the
        XAUTOCLAIM that takes the entry over leaves it where it was and rolling restarts
        never push a session towards the dead-letter limit."""
        for entry_id in entry_ids:
            info = await self.redis.xpending_range(
                lane, keys.DISPATCH_GROUP, min=entry_id, max=entry_id, count=1
            )
            if not info:
                continue  # acknowledged meanwhile
            await self.redis.xclaim(
                lane,
                keys.DISPATCH_GROUP,
                wid,
                0,
                [entry_id],
                idle=idle_ms,
                retrycount=max(0, int(info[0]["times_delivered"]) - 1),
                justid=True,
            )

    async def read_audio(
        self, streams: Sequence[tuple[bytes, bytes]], count: int, block_ms: int | None
    ) -> list[tuple[bytes, list[tuple[bytes, list[bytes]]]]]:
        """`XREAD COUNT count BLOCK block_ms STREAMS key... id...` over (key, last ID)
        pairs: per stream with new entries, (key, [(entry ID, [field, value, ...])]).
        An empty list when nothing arrived within `block_ms` (None: no `BLOCK`, so an
        empty list at once when nothing is new).

        Packed by hand and sent on a connection kept for it (`KeptConnection`): the
        worker names every owned session's stream in each read, and redis-py's general
        packing, its reply callbacks (a dict per entry) and the pool's check on every
        take were a sixth of a null-engine worker's CPU at 500 sessions."""
        if not streams:
            return []
        parts = [
            b"*%d\r\n$5\r\nXREAD\r\n$5\r\nCOUNT\r\n"
            % (4 + 2 * len(streams) + (block_ms is not None) * 2),
            _bulk(b"%d" % count),
        ]
        if block_ms is not None:
            parts += [b"$5\r\nBLOCK\r\n", _bulk(b"%d" % block_ms)]
        parts.append(b"$7\r\nSTREAMS\r\n")
        parts += [_bulk(key) for key, _ in streams]
        parts += [_bulk(last) for _, last in streams]
        [reply] = await self._read_conn.send(b"".join(parts), 1)
        if isinstance(reply, ResponseError):
            raise reply
        if reply is None:
            return []
        if isinstance(reply, dict):  # RESP3: a map of stream to entries
            reply = list(reply.items())
        return [(key, [(eid, fields) for eid, fields in entries]) for key, entries in reply]

    async def ack_dispatch(self, lane: str, entry_id: bytes) -> None:
        await self.redis.xack(lane, keys.DISPATCH_GROUP, entry_id)

    async def heartbeat(self, wid: WorkerId, info: dict[str, Any], alive_s: float) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.WORKERS, {wid: now_ms()})
        pipe.hset(keys.worker_info(wid), mapping=info)
        pipe.expire(keys.worker_info(wid), max(1, int(alive_s * 3)))
        # Forget workers silent for a day: the set must not grow without bound.
        pipe.zremrangebyscore(keys.WORKERS, "-inf", now_ms() - 86_400_000)
        await pipe.execute()

    async def unregister(self, wid: WorkerId) -> None:
        await self.redis.zrem(keys.WORKERS, wid)
        await self.redis.delete(keys.worker_info(wid))
