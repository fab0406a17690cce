"""One pub/sub connection per gateway, fanning session channels out to connections.

Pub/sub is at-most-once (a dropped or slow subscriber loses messages), so the relay is
only the fast path: each connection also re-reads its session's results stream when
`Delivery` reports a gap, and periodically (see gateway.connection).
"""

from __future__ import annotations

import asyncio
import logging
import random

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared import keys
from shared.keys import SessionId

log = logging.getLogger(__name__)

GATEWAYS_CHANNEL = keys.GATEWAYS_CHANNEL


class Relay:
    def __init__(self, redis: aioredis.Redis, queue_size: int = 1000) -> None:
        self._redis = redis
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        # Several connections of one session can be here at once (a resume replacing an
        # older connection on the same gateway): each gets every message.
        self._queues: dict[bytes, list[asyncio.Queue[bytes]]] = {}
        self._queue_size = queue_size
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    async def start(self) -> None:
        await self._pubsub.subscribe(GATEWAYS_CHANNEL)
        self._task = asyncio.create_task(self._run(), name="relay")

    async def subscribe(self, sid: SessionId) -> asyncio.Queue[bytes]:
        channel = keys.events_channel(sid).encode()
        queue: asyncio.Queue[bytes] = asyncio.Queue(self._queue_size)
        subscribers = self._queues.setdefault(channel, [])
        subscribers.append(queue)
        if len(subscribers) == 1:
            await self._pubsub.subscribe(channel)
        return queue

    async def unsubscribe(self, sid: SessionId, queue: asyncio.Queue[bytes]) -> None:
        channel = keys.events_channel(sid).encode()
        subscribers = self._queues.get(channel, [])
        if queue in subscribers:
            subscribers.remove(queue)
        if not subscribers and channel in self._queues:
            del self._queues[channel]
            try:
                await self._pubsub.unsubscribe(channel)
            except RedisError:
                log.debug("unsubscribe from %s failed; the connection will be reset", channel)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            try:
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                delay = 0.1
            except (RedisError, OSError) as exc:
                log.warning("pub/sub connection lost (%s); reconnecting in %.1fs", exc, delay)
                await asyncio.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 5.0)
                await self._resubscribe()
                continue
            if msg is None or msg.get("type") != "message":
                continue
            for queue in self._queues.get(msg["channel"], ()):
                try:
                    queue.put_nowait(msg["data"])
                except asyncio.QueueFull:
                    # The connection is behind; it catches up from the results stream.
                    self.dropped += 1

    async def _resubscribe(self) -> None:
        try:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(GATEWAYS_CHANNEL, *self._queues.keys())
        except (RedisError, OSError) as exc:
            log.debug("resubscribe failed: %s", exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        try:
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        except RedisError:
            pass
