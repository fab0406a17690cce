"""The I/O half of admission control: reads the dispatch lanes' state from Redis.

The decisions (queue position, 1013) are made in `shared.admission`, sans I/O.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from shared import keys, scripts
from shared.admission import LaneState, admit, queue_position
from shared.config import Config
from shared.protocol import PRIORITIES


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class Admission:
    """Reads every dispatch lane's state (and, for a new session, the server's clock) in
    one round trip: a script per lane (`scripts.LANE_STATE`), pipelined. Each new
    session asks once and each queued one every `queue_update_s`, so during a ramp of
    hundreds of sessions a second this is on the gateway's busiest path."""

    def __init__(self, redis: aioredis.Redis, config: Config) -> None:
        self.redis = redis
        self.config = config
        self._lane_state = redis.register_script(scripts.LANE_STATE)

    async def lanes(self) -> dict[str, LaneState]:
        lanes, _ = await self._read(with_time=False)
        return lanes

    async def _read(self, *, with_time: bool) -> tuple[dict[str, LaneState], int]:
        """The lanes' states, and the server's time in unix ms (0 unless `with_time`)."""
        replies = await self._pipeline(with_time)
        if any(isinstance(r, NoScriptError) for r in replies):
            # The server lost its script cache (restart, SCRIPT FLUSH): load it, ask again.
            self._lane_state.sha = await self.redis.script_load(scripts.LANE_STATE)
            replies = await self._pipeline(with_time)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        lanes = {p: _lane_state(r) for p, r in zip(PRIORITIES, replies, strict=False)}
        now_ms = 0
        if with_time:
            seconds, micros = replies[-1]
            now_ms = int(seconds) * 1000 + int(micros) // 1000
        return lanes, now_ms

    async def _pipeline(self, with_time: bool) -> list[Any]:
        pipe = self.redis.pipeline(transaction=False)
        for priority in PRIORITIES:
            pipe.evalsha(self._lane_state.sha, 1, keys.dispatch(priority), keys.DISPATCH_GROUP)
        if with_time:
            pipe.time()
        return list(await pipe.execute(raise_on_error=False))

    async def check_new(self, priority: str) -> None:
        """Raise Overloaded (1013) if a new session of `priority` may not queue now."""
        lanes, now_ms = await self._read(with_time=True)
        admit(
            priority,
            lanes,
            now_ms,
            max_queue_length=self.config.max_queue_length,
            max_queue_wait_s=self.config.max_queue_wait_s,
        )

    async def position(self, priority: str, index: int) -> int:
        return queue_position(priority, index, await self.lanes())


def _lane_state(reply: Any) -> LaneState:
    """LANE_STATE's reply {added, read, head_id} as a LaneState."""
    added, read, head = reply
    head_id = _s(head)
    return LaneState(
        added=int(added),
        read=int(read),
        head_ms=int(head_id.partition("-")[0]) if head_id else None,
    )
