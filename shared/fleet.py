"""Fleet-wide bookkeeping: the gateway registry and the maintenance operations.

Gateways register themselves (`ss:gateways`) and the sessions their clients hold
(`ss:gateway:<id>:sessions`), so that the sessions of a gateway that died without a word
still get their resume grace and are finally reaped. The maintenance job (worker/
maintenance.py, on arq) calls the `Fleet` methods below; each is safe to run from several
processes at once and safe to repeat.
"""

from __future__ import annotations

from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared import envelope, keys, scripts
from shared.envelope import Closed
from shared.keys import GatewayId, SessionId
from shared.store import Store, now_ms

GATEWAY_SET_TTL_S = 86_400


def _s(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def next_stream_id(entry_id: str) -> str:
    """The smallest stream ID greater than `entry_id`."""
    ms, _, seq = entry_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def stream_id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class DeadLettered:
    session_id: SessionId
    entry_id: str
    attempts: int
    why: str


class Fleet:
    def __init__(self, redis: aioredis.Redis) -> None:
        self.redis = redis
        self.store = Store(redis)
        self._detach_gateway = redis.register_script(scripts.DETACH_GATEWAY)
        self._dead_letter = redis.register_script(scripts.DEAD_LETTER)

    # --- gateway registry (called by gateways) ---------------------------------------------

    async def gateway_heartbeat(self, gid: GatewayId) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(keys.GATEWAYS, {gid: now_ms()})
        pipe.expire(keys.gateway_sessions(gid), GATEWAY_SET_TTL_S)
        await pipe.execute()

    async def gateway_holds(self, gid: GatewayId, sid: SessionId) -> None:
        await cast(Awaitable[int], self.redis.sadd(keys.gateway_sessions(gid), sid))

    async def gateway_released(self, gid: GatewayId, sid: SessionId) -> None:
        await cast(Awaitable[int], self.redis.srem(keys.gateway_sessions(gid), sid))

    async def gateway_gone(self, gid: GatewayId) -> None:
        """A gateway that stops cleanly forgets itself (its clients were told to resume)."""
        await self.redis.zrem(keys.GATEWAYS, gid)
        await self.redis.delete(keys.gateway_sessions(gid))

    async def alive_gateways(self, alive_s: float) -> list[GatewayId]:
        raw = await self.redis.zrangebyscore(keys.GATEWAYS, now_ms() - int(alive_s * 1000), "+inf")
        return [GatewayId(_s(g)) for g in raw]

    # --- maintenance (called by the arq job) -----------------------------------------------

    async def reap_dead_gateways(
        self, alive_s: float, grace_s: float
    ) -> dict[GatewayId, list[SessionId]]:
        """Detach the sessions of gateways silent for `alive_s`, starting their resume
        grace; a client that resumes elsewhere meanwhile keeps its session."""
        dead = await self.redis.zrangebyscore(keys.GATEWAYS, "-inf", now_ms() - int(alive_s * 1000))
        out: dict[GatewayId, list[SessionId]] = {}
        for raw in dead:
            gid = GatewayId(_s(raw))
            detached: list[SessionId] = []
            members = await cast(
                Awaitable[set[bytes]], self.redis.smembers(keys.gateway_sessions(gid))
            )
            for member in members:
                sid = SessionId(_s(member))
                if await self._detach_gateway(keys=[keys.meta(sid)], args=[f"{gid}/"]):
                    await self.redis.zadd(keys.DETACHED, {sid: now_ms() + int(grace_s * 1000)})
                    detached.append(sid)
            # Forget the gateway only after its sessions are handled: a crash in between
            # leaves it in the registry for the next run.
            await self.redis.delete(keys.gateway_sessions(gid))
            await self.redis.zrem(keys.GATEWAYS, gid)
            out[gid] = detached
        return out

    async def dispatch_trim_point(self, lane: str = keys.DISPATCH) -> str | None:
        """The lowest dispatch entry ID anybody may still need, or None (no group yet).

        Order matters: the group's last-delivered ID is read before the pending list.
        Entries delivered later are newer than that ID; entries pending later were
        pending already (XCLAIM only moves pending entries) or are newer.
        """
        try:
            groups = await self.redis.xinfo_groups(lane)
        except ResponseError:
            return None  # no stream yet
        group = next((g for g in groups if _s(g["name"]) == keys.DISPATCH_GROUP), None)
        if group is None:
            return None
        point = next_stream_id(_s(group["last-delivered-id"]))
        pending = await self.redis.xpending(lane, keys.DISPATCH_GROUP)
        if pending["pending"] and pending["min"] is not None:
            oldest = _s(pending["min"])
            if stream_id_key(oldest) < stream_id_key(point):
                point = oldest
        return point

    async def trim_dispatch(self) -> int:
        """Trim acknowledged history off every dispatch lane; never a pending or
        undelivered entry. Returns the number of entries removed."""
        removed = 0
        for lane in keys.DISPATCH_LANES:
            point = await self.dispatch_trim_point(lane)
            if point is not None:
                removed += int(await self.redis.xtrim(lane, minid=point, approximate=False))
        return removed

    async def dead_letter_failing(
        self, max_attempts: int, ttl_s: float, limit: int = 1000
    ) -> list[DeadLettered]:
        """Move sessions delivered to workers more than `max_attempts` times to
        `ss:deadletter`, close them (reason failed) and acknowledge their dispatch entry."""
        out: list[DeadLettered] = []
        for lane in keys.DISPATCH_LANES:
            start = "-"
            while len(out) < limit:
                try:
                    page: list[dict[str, Any]] = await self.redis.xpending_range(
                        lane, keys.DISPATCH_GROUP, min=start, max="+", count=200
                    )
                except ResponseError:
                    break  # no such lane or group yet
                if not page:
                    break
                for item in page:
                    if int(item["times_delivered"]) > max_attempts:
                        out.append(
                            await self._dead_letter_entry(
                                lane, _s(item["message_id"]), int(item["times_delivered"]), ttl_s
                            )
                        )
                start = "(" + _s(page[-1]["message_id"])
        return out

    async def _dead_letter_entry(
        self, lane: str, entry_id: str, attempts: int, ttl_s: float
    ) -> DeadLettered:
        entries = await self.redis.xrange(lane, min=entry_id, max=entry_id)
        sid: SessionId | None = None
        if entries:
            try:
                item = envelope.decode_entry(entries[0][1])
            except ValueError:
                item = None
            if isinstance(item, envelope.Dispatch):
                sid = SessionId(item.session_id)
        why = f"delivered to workers {attempts} times without finishing"
        meta = await self.store.load_meta(sid) if sid is not None else None
        if sid is not None and meta is not None:
            last_error = _s(await self.redis.hget(keys.meta(sid), "last_error"))  # type: ignore[misc]
            if last_error:
                why += f"; last error: {last_error}"
            summary = Closed(
                reason="failed", audio_seconds=meta.audio_seconds, final_results=meta.finals
            )
            await self._dead_letter(
                keys=[keys.meta(sid), keys.lease(sid), keys.results(sid), keys.audio(sid)],
                args=[envelope.encode(summary), keys.events_channel(sid), max(1, int(ttl_s)), why],
            )
        await self.redis.xadd(
            keys.DEADLETTER,
            {
                "sid": sid or "",
                "dispatch_id": entry_id,
                "attempts": attempts,
                "reason": why,
                "at_ms": now_ms(),
            },
            maxlen=keys.DEADLETTER_MAXLEN,
            approximate=True,
        )
        await self.redis.xack(lane, keys.DISPATCH_GROUP, entry_id)
        return DeadLettered(SessionId(sid or ""), entry_id, attempts, why)

    async def dead_letters(self, count: int = 100) -> list[dict[str, str]]:
        """The newest dead-letter entries, newest first (for `status` and tests)."""
        entries = await self.redis.xrevrange(keys.DEADLETTER, count=count)
        return [
            {_s(k): _s(v) for k, v in fields.items()} | {"id": _s(entry_id)}
            for entry_id, fields in entries
        ]
