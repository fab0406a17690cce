"""One pub/sub connection per gateway, fanning session channels out to connections.

Pub/sub is at-most-once (a dropped or slow subscriber loses messages), so the relay is
only the fast path: each connection also re-reads its session's results stream when
`Delivery` reports a gap, and when the relay tells it to with `RECONCILE`: to every
subscriber that got no message during a whole `reconcile_interval_s`, and to every
subscriber at once after the pub/sub connection was lost (see gateway.connection).

One gateway-wide timer does what a timeout on every connection's `get` did (a task and a
timer per result message, per connection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.keys import SessionId

log = logging.getLogger(__name__)

GATEWAYS_CHANNEL = keys.GATEWAYS_CHANNEL
#: Put in a subscriber's queue instead of a message: re-read the results stream. Never a
#: real message (every envelope is a non-empty msgpack map).
RECONCILE = b""
#: The subscribers are split into this many slices, and one slice is looked at every
#: `reconcile_interval_s / TICK_SLICES`: each subscriber still once per interval, but the
#: re-reads it triggers are spread over the interval instead of all coming at once (at
#: 450 sessions that burst of XRANGEs every second showed in the ack latency's tail).
TICK_SLICES = 10


class Relay:
    def __init__(
        self, redis: aioredis.Redis, reconcile_interval_s: float, queue_size: int = 1000
    ) -> None:
        if reconcile_interval_s <= 0:
            raise ValueError(f"reconcile_interval_s must be > 0, got {reconcile_interval_s}")
        self._redis = redis
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        # Several connections of one session can be here at once (a resume replacing an
        # older connection on the same gateway): each gets every message.
        self._queues: dict[bytes, list[asyncio.Queue[bytes]]] = {}
        self._queue_size = queue_size
        self._reconcile_s = reconcile_interval_s
        #: Subscribers that got a message (or were told to reconcile) since their slice's
        #: last tick.
        self._heard: set[asyncio.Queue[bytes]] = set()
        self._slices: list[set[asyncio.Queue[bytes]]] = [set() for _ in range(TICK_SLICES)]
        self._next_slice = 0  # where the next subscriber goes: round robin
        self._tick_slice = 0  # the slice the next tick looks at
        self._task: asyncio.Task[None] | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.dropped = 0
        self.resubscribe_failures = 0  # attempts to subscribe again that Redis refused
        self.reconnects = 0  # times the pub/sub connection was lost
        self.subscribed = False  # False until started, and while reconnecting

    async def start(self) -> None:
        await self._pubsub.subscribe(GATEWAYS_CHANNEL)
        self.subscribed = True
        self._task = asyncio.create_task(self._run(), name="relay")
        self._ticker = asyncio.create_task(self._tick_loop(), name="relay-reconcile")

    async def subscribe(self, sid: SessionId) -> asyncio.Queue[bytes]:
        channel = keys.events_channel(sid).encode()
        queue: asyncio.Queue[bytes] = asyncio.Queue(self._queue_size)
        subscribers = self._queues.setdefault(channel, [])
        subscribers.append(queue)
        self._heard.add(queue)  # its first reconcile comes after a whole interval
        self._slices[self._next_slice].add(queue)
        self._next_slice = (self._next_slice + 1) % TICK_SLICES
        if len(subscribers) == 1:
            await self._pubsub.subscribe(channel)
        return queue

    async def unsubscribe(self, sid: SessionId, queue: asyncio.Queue[bytes]) -> None:
        channel = keys.events_channel(sid).encode()
        subscribers = self._queues.get(channel, [])
        if queue in subscribers:
            subscribers.remove(queue)
        self._heard.discard(queue)
        for part in self._slices:
            part.discard(queue)
        if not subscribers and channel in self._queues:
            del self._queues[channel]
            try:
                await self._pubsub.unsubscribe(channel)
            except RedisError:
                log.debug("unsubscribe from %s failed; the connection will be reset", channel)

    async def _run(self) -> None:
        while True:
            try:
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost (%s); reconnecting", exc)
                self.subscribed = False
                self.reconnects += 1
                # Anything published from now on is only in the results streams.
                self.reconcile_all()
                await self._reconnect()
                continue
            if msg is None or msg.get("type") != "message":
                continue
            for queue in self._queues.get(msg["channel"], ()):
                self._heard.add(queue)
                try:
                    queue.put_nowait(msg["data"])
                except asyncio.QueueFull:
                    # The connection is behind; it catches up from the results stream.
                    self.dropped += 1

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._reconcile_s / TICK_SLICES)
            self.tick_slice()

    def tick_slice(self) -> None:
        """Tell each subscriber of the next slice that got nothing since that slice's
        last tick to reconcile."""
        part = self._slices[self._tick_slice]
        self._tick_slice = (self._tick_slice + 1) % TICK_SLICES
        for queue in part:
            if queue in self._heard:
                self._heard.discard(queue)
            else:
                self._reconcile(queue)

    def tick(self) -> None:
        """A whole interval's ticks at once: every slice once."""
        for _ in range(TICK_SLICES):
            self.tick_slice()

    def _reconcile(self, queue: asyncio.Queue[bytes]) -> None:
        # A full queue is being drained; a later tick reaches it.
        with contextlib.suppress(asyncio.QueueFull):
            queue.put_nowait(RECONCILE)

    def reconcile_all(self) -> None:
        """After the pub/sub connection was lost: anything may have been missed."""
        for subscribers in self._queues.values():
            for queue in subscribers:
                self._heard.add(queue)
                self._reconcile(queue)

    async def _reconnect(self) -> None:
        """Subscribe again on a new connection, retrying with backoff until Redis answers.

        Only then does `_run` read again: a pub/sub object whose subscribe failed has no
        connection, and reading it raises RuntimeError (redis-py), which ended this task
        for good after any outage longer than one retry."""
        delay = 0.1
        attempts = 0
        while True:
            await asyncio.sleep(delay * (1 + random.random()))
            attempts += 1
            if await self._resubscribe():
                log.info("pub/sub subscribed again (%d attempt(s))", attempts)
                return
            delay = min(delay * 2, 5.0)

    async def _resubscribe(self) -> bool:
        """A new pub/sub connection subscribed to every channel; False if Redis refused."""
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._pubsub.subscribe(GATEWAYS_CHANNEL, *self._queues.keys())
        except (RedisError, OSError) as exc:
            log.debug("resubscribe failed: %s", exc)
            self.resubscribe_failures += 1
            return False
        # Subscribed again: what was published meanwhile is only in the results streams.
        self.subscribed = True
        self.reconcile_all()
        return True

    async def close(self) -> None:
        for task in (self._task, self._ticker):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        try:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        except RedisError:
            pass
