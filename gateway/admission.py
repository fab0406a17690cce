"""The I/O half of admission control: reads the dispatch lanes' state from Redis.

The decisions (queue position, 1013) are made in `shared.admission`, sans I/O.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared import keys
from shared.admission import LaneState, admit, queue_position
from shared.config import Config
from shared.protocol import PRIORITIES


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Admission:
    def __init__(self, redis: aioredis.Redis, config: Config) -> None:
        self.redis = redis
        self.config = config

    async def lanes(self) -> dict[str, LaneState]:
        pipe = self.redis.pipeline(transaction=False)
        for priority in PRIORITIES:
            pipe.xinfo_groups(keys.dispatch(priority))
            pipe.xlen(keys.dispatch(priority))
        replies = await pipe.execute(raise_on_error=False)
        out: dict[str, LaneState] = {}
        for i, priority in enumerate(PRIORITIES):
            groups, length = replies[2 * i], replies[2 * i + 1]
            out[priority] = await self._lane(priority, groups, length)
        return out

    async def _lane(self, priority: str, groups: Any, length: Any) -> LaneState:
        lane = keys.dispatch(priority)
        group = None
        if not isinstance(groups, ResponseError):
            group = next((g for g in groups if _s(g["name"]) == keys.DISPATCH_GROUP), None)
        if group is None:  # no worker has ever started: everything in the lane waits
            size = 0 if isinstance(length, ResponseError) else int(length)
            first = await self.redis.xrange(lane, count=1) if size else []
            return LaneState(added=size, read=0, head_ms=_ms(first))
        read = group.get("entries-read")
        lag = group.get("lag")
        last = _s(group["last-delivered-id"])
        if read is None or lag is None:
            # Redis cannot tell (e.g. entries deleted out of order): count the unread ones.
            unread = await self.redis.xrange(lane, min="(" + last, count=10_000)
            read, lag = 0, len(unread)
        first = await self.redis.xrange(lane, min="(" + last, count=1) if lag else []
        return LaneState(added=int(read) + int(lag), read=int(read), head_ms=_ms(first))

    async def now_ms(self) -> int:
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def check_new(self, priority: str) -> None:
        """Raise Overloaded (1013) if a new session of `priority` may not queue now."""
        admit(
            priority,
            await self.lanes(),
            await self.now_ms(),
            max_queue_length=self.config.max_queue_length,
            max_queue_wait_s=self.config.max_queue_wait_s,
        )

    async def position(self, priority: str, index: int) -> int:
        return queue_position(priority, index, await self.lanes())


def _ms(entries: list[Any]) -> int | None:
    if not entries:
        return None
    return int(_s(entries[0][0]).partition("-")[0])
