"""`streamscribe status`: the collectors, which read Redis (redis-py, async) into the
values of `shared/status_model.py`.

Every key comes from `shared/keys.py`; no collector builds a key string itself. Ages and
deadlines are measured on Redis's clock (`Probe.now_ms`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared import keys
from shared.admission import LaneState, lanes_at_or_above, queue_position
from shared.fleet import Fleet
from shared.keys import GatewayId, SessionId, WorkerId
from shared.protocol import PRIORITIES
from shared.status_model import (
    DeadLetterInfo,
    DeadLetterRow,
    DetachedInfo,
    DetachedRow,
    DispatchInfo,
    GatewayRow,
    GatewaysInfo,
    JobRow,
    JobsInfo,
    LaneInfo,
    Query,
    QuotaRow,
    QuotasInfo,
    ServerInfo,
    SessionInfo,
    UsageInfo,
    UsageRow,
    WorkerRow,
    WorkersInfo,
    committed_seconds,
    countable_lane,
    received_seconds,
)

#: At most this many pending dispatch entries are resolved to sessions to measure how far
#: each worker is behind; the rest are counted but not inspected.
PENDING_SCAN_LIMIT = 1000


@dataclass(frozen=True, slots=True)
class Probe:
    """What a collector gets: the client, the query and Redis's clock."""

    redis: aioredis.Redis
    query: Query
    now_ms: int


def _s(value: object) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: object) -> int | None:
    try:
        return int(_s(value))
    except ValueError:
        return None


def _float(value: object) -> float | None:
    try:
        return float(_s(value))
    except ValueError:
        return None


def _decode_hash(raw: dict[bytes, bytes]) -> dict[str, str]:
    return {_s(k): _s(v) for k, v in raw.items()}


async def collect_server(p: Probe) -> ServerInfo:
    info: dict[str, Any] = {}
    for part in ("server", "persistence", "memory", "clients"):
        try:
            info.update(await p.redis.info(part))
        except ResponseError:  # INFO may be denied by ACLs on managed services
            continue
    if "valkey_version" in info:
        server = f"valkey {info['valkey_version']}"
    elif "redis_version" in info:
        server = f"redis {info['redis_version']}"
    else:
        server = "unknown server"
    return ServerInfo(
        server=server,
        aof_enabled=bool(int(info.get("aof_enabled", 0))),
        maxmemory_policy=str(info.get("maxmemory_policy", "unknown")),
        used_memory_human=str(info.get("used_memory_human", "?")),
        connected_clients=int(info.get("connected_clients", 0)),
    )


def _entry_ms(entry_id: object) -> int:
    """The Unix ms part of a stream entry ID (when Redis added the entry)."""
    return int(_s(entry_id).partition("-")[0])


async def _collect_lane(p: Probe, priority: str) -> LaneInfo:
    lane = keys.dispatch(priority)
    length = int(await p.redis.xlen(lane))
    try:
        groups = await p.redis.xinfo_groups(lane)
    except ResponseError:  # no such key: no session of this priority and no worker yet
        groups = []
    group = next((g for g in groups if _s(g.get("name")) == keys.DISPATCH_GROUP), None)
    if group is None:
        first = await p.redis.xrange(lane, count=1) if length else []
        oldest = p.now_ms - _entry_ms(first[0][0]) if first else None
        return LaneInfo(priority, lane, length, False, 0, length, 0, None, "-", oldest)
    lag = group.get("lag")
    entries_read = group.get("entries-read")
    last = _s(group.get("last-delivered-id"))
    oldest = None
    if lag is None or int(lag) > 0:
        first = await p.redis.xrange(lane, min="(" + last, count=1)
        oldest = p.now_ms - _entry_ms(first[0][0]) if first else None
    return LaneInfo(
        priority=priority,
        stream=lane,
        length=length,
        group_exists=True,
        consumers=int(group.get("consumers", 0)),
        lag=None if lag is None else int(lag),
        pending=int(group.get("pending", 0)),
        entries_read=None if entries_read is None else int(entries_read),
        last_delivered_id=last,
        oldest_waiting_ms=None if oldest is None else max(0, oldest),
    )


async def collect_dispatch(p: Probe) -> DispatchInfo:
    return DispatchInfo(tuple([await _collect_lane(p, priority) for priority in PRIORITIES]))


async def _pending_by_consumer(p: Probe) -> tuple[dict[str, int], int]:
    counts: dict[str, int] = {}
    total = 0
    for lane in keys.DISPATCH_LANES:
        try:
            summary = await p.redis.xpending(lane, keys.DISPATCH_GROUP)
        except ResponseError:  # no stream or no group yet
            continue
        for consumer in summary.get("consumers") or []:
            name = _s(consumer["name"])
            counts[name] = counts.get(name, 0) + int(consumer["pending"])
        total += int(summary.get("pending") or 0)
    return counts, total


async def _pending_sessions(p: Probe) -> tuple[list[tuple[str, SessionId]], int]:
    """(consumer, session) of up to PENDING_SCAN_LIMIT pending entries, lane by lane, and
    the number of entries looked at."""
    owners: list[tuple[str, SessionId]] = []
    budget = PENDING_SCAN_LIMIT
    for lane in keys.DISPATCH_LANES:
        if budget <= 0:
            break
        try:
            entries = await p.redis.xpending_range(lane, keys.DISPATCH_GROUP, "-", "+", budget)
        except ResponseError:
            continue
        if not entries:
            continue
        budget -= len(entries)
        pipe = p.redis.pipeline(transaction=False)
        for entry in entries:
            pipe.xrange(lane, entry["message_id"], entry["message_id"])
        found = await pipe.execute()
        for entry, rows in zip(entries, found, strict=True):
            sid = _s(rows[0][1].get(b"sid")) if rows else ""
            if keys.is_session_id(sid):
                owners.append((_s(entry["consumer"]), SessionId(sid)))
    return owners, PENDING_SCAN_LIMIT - budget


async def _uncommitted_by_consumer(p: Probe) -> tuple[dict[str, float], int]:
    """For each consumer, the largest received-minus-committed audio among its sessions;
    and how many pending entries were looked at."""
    owners, scanned = await _pending_sessions(p)
    if not owners:
        return {}, scanned
    pipe = p.redis.pipeline(transaction=False)
    for _, sid in owners:
        pipe.hgetall(keys.meta(sid))
    metas = await pipe.execute()
    behind: dict[str, float] = {}
    for (consumer, _), raw in zip(owners, metas, strict=True):
        meta = _decode_hash(raw)
        received = received_seconds(meta) if meta else None
        if received is None:
            continue
        lag_s = max(0.0, received - committed_seconds(meta))
        behind[consumer] = max(lag_s, behind.get(consumer, 0.0))
    return behind, scanned


async def collect_workers(p: Probe) -> WorkersInfo:
    members = await p.redis.zrange(keys.WORKERS, 0, -1, withscores=True)
    pipe = p.redis.pipeline(transaction=False)
    for member, _score in members:
        pipe.hgetall(keys.worker_info(WorkerId(_s(member))))
    infos = await pipe.execute() if members else []
    pending, pending_total = await _pending_by_consumer(p)
    behind, scanned = await _uncommitted_by_consumer(p)
    alive_ms = int(p.query.alive_s * 1000)
    rows: list[WorkerRow] = []
    for (member, score), raw in zip(members, infos, strict=True):
        wid = _s(member)
        info = _decode_hash(raw)
        age = max(0, p.now_ms - int(score))
        rows.append(
            WorkerRow(
                worker_id=wid,
                heartbeat_age_ms=age,
                alive=age <= alive_ms,
                slots=_int(info.get("slots")),
                owned=_int(info.get("owned")),
                queued_decodes=_int(info.get("queued_decodes")),
                model=info.get("model", ""),
                pid=_int(info.get("pid")),
                pending=pending.get(wid, 0),
                max_uncommitted_s=behind.get(wid),
                engine_busy=_float(info.get("engine_busy")),
                claiming=info.get("claiming"),
                claim_spacing_s=_float(info.get("claim_spacing_s")),
            )
        )
    known = {row.worker_id for row in rows}
    for consumer, count in sorted(pending.items()):
        if consumer not in known and count > 0:
            rows.append(
                WorkerRow(
                    consumer, None, False, None, None, None, "", None, count, behind.get(consumer)
                )
            )
    rows.sort(key=lambda row: (not row.alive, row.worker_id))
    return WorkersInfo(p.query.alive_s, tuple(rows), scanned, pending_total)


async def collect_detached(p: Probe) -> DetachedInfo:
    total = int(await p.redis.zcard(keys.DETACHED))
    members = await p.redis.zrange(keys.DETACHED, 0, p.query.limit - 1, withscores=True)
    rows = tuple(DetachedRow(_s(sid), int(score) - p.now_ms) for sid, score in members)
    return DetachedInfo(total, rows)


async def collect_quotas(p: Probe) -> QuotasInfo:
    """Every `ss:quota:*` key (SCAN) and how many of its sessions count now."""
    found = [_s(k) async for k in p.redis.scan_iter(match=keys.quota("*"), count=1000)]
    pipe = p.redis.pipeline(transaction=False)
    for key in found:
        pipe.zcount(key, p.now_ms, "+inf")
    counts = await pipe.execute() if found else []
    prefix = keys.quota("")
    rows = [
        QuotaRow(key.removeprefix(prefix), int(n))
        for key, n in zip(found, counts, strict=True)
        if int(n) > 0
    ]
    rows.sort(key=lambda row: (-row.counted, row.key_id))
    return QuotasInfo(len(rows), tuple(rows[: p.query.limit]))


async def collect_usage(p: Probe) -> UsageInfo:
    """Every `ss:usage:*` hash (SCAN): the audio each API key stored per window."""
    found = [_s(k) async for k in p.redis.scan_iter(match=keys.USAGE_PATTERN, count=1000)]
    pipe = p.redis.pipeline(transaction=False)
    for key in found:
        pipe.hvals(key)
    values = await pipe.execute() if found else []
    rows = []
    for key, fields in zip(found, values, strict=True):
        if not fields:
            continue  # expired between SCAN and HVALS
        key_id, window = keys.parse_usage_key(key)
        rows.append(UsageRow(key_id, window, sum(int(v) for v in fields) / 1e6, len(fields)))
    rows.sort(key=lambda row: (-row.window, -row.audio_s, row.key_id))
    return UsageInfo(len(rows), tuple(rows[: p.query.limit]))


async def collect_jobs(p: Probe) -> JobsInfo:
    """File jobs not yet finished, oldest first, with each one's progress."""
    from shared.jobs import JobParams
    from shared.keys import JobId

    pipe = p.redis.pipeline(transaction=False)
    pipe.zcard(keys.JOBS)
    pipe.zcard(keys.JOBS_ARQ_QUEUE)
    pipe.zrange(keys.JOBS, 0, p.query.limit - 1, withscores=True)
    unfinished, arq_queued, first = await pipe.execute()
    pipe = p.redis.pipeline(transaction=False)
    for jid, _ in first:
        pipe.hgetall(keys.job(JobId(_s(jid))))
    hashes = await pipe.execute() if first else []
    rows = []
    for (jid, submitted), raw in zip(first, hashes, strict=True):
        h = {_s(k): _s(v) for k, v in raw.items()}
        if not h:
            continue  # finished and expired between the two reads
        params = JobParams(
            sample_rate=_int(h.get("sample_rate")) or 16000,
            encoding=h.get("encoding") or "pcm_s16le",
            channels=_int(h.get("channels")) or 1,
        )
        rows.append(
            JobRow(
                job_id=_s(jid),
                state=h.get("state", "?"),
                name=h.get("name", ""),
                audio_s=params.seconds(_int(h.get("audio_bytes")) or 0),
                done_s=params.seconds(_int(h.get("done_bytes")) or 0),
                waited_ms=max(0, p.now_ms - int(submitted)),
                worker=h.get("worker", ""),
                runs=_int(h.get("runs")) or 0,
            )
        )
    return JobsInfo(int(unfinished), int(arq_queued), tuple(rows))


async def collect_gateways(p: Probe) -> GatewaysInfo:
    # Read directly rather than through Fleet.alive_gateways: ages are measured on Redis's
    # clock, like the workers' (see `collect`).
    members = await p.redis.zrange(keys.GATEWAYS, 0, -1, withscores=True)
    pipe = p.redis.pipeline(transaction=False)
    for member, _score in members:
        pipe.scard(keys.gateway_sessions(GatewayId(_s(member))))
    counts = await pipe.execute() if members else []
    alive_ms = int(p.query.alive_s * 1000)
    rows = []
    for (member, score), count in zip(members, counts, strict=True):
        age = max(0, p.now_ms - int(score))
        rows.append(GatewayRow(_s(member), age, age <= alive_ms, int(count)))
    rows.sort(key=lambda row: (not row.alive, row.gateway_id))
    return GatewaysInfo(p.query.alive_s, tuple(rows))


async def collect_deadletter(p: Probe) -> DeadLetterInfo:
    total = int(await p.redis.xlen(keys.DEADLETTER))
    rows = []
    for entry in await Fleet(p.redis).dead_letters(count=p.query.limit):
        at_ms = _int(entry.get("at_ms"))
        rows.append(
            DeadLetterRow(
                entry_id=entry["id"],
                session_id=entry.get("sid", ""),
                dispatch_id=entry.get("dispatch_id", ""),
                attempts=_int(entry.get("attempts")),
                reason=entry.get("reason", ""),
                age_ms=None if at_ms is None else max(0, p.now_ms - at_ms),
            )
        )
    return DeadLetterInfo(total, tuple(rows))


async def _dispatch_entry(p: Probe, meta: dict[str, str]) -> dict[str, Any]:
    """The SessionInfo fields about the session's dispatch entry (see SessionInfo)."""
    try:
        lane = keys.dispatch(meta.get("priority") or "normal")
    except ValueError:  # a priority this version does not know
        return {}
    out: dict[str, Any] = {"dispatch_lane": lane}
    entry_id = meta.get("dispatch_id")
    if entry_id:
        try:
            pending = await p.redis.xpending_range(lane, keys.DISPATCH_GROUP, entry_id, entry_id, 1)
        except ResponseError:  # no group yet
            pending = []
        if pending:
            out["dispatch_consumer"] = _s(pending[0]["consumer"])
            out["dispatch_idle_ms"] = int(pending[0]["time_since_delivered"])
            out["dispatch_deliveries"] = int(pending[0]["times_delivered"])
    index = _int(meta.get("dispatch_index"))
    waiting = meta.get("epoch") == "0" and meta.get("state") != "closed"
    if "dispatch_consumer" not in out and waiting and index is not None:
        lanes = {lane.priority: lane for lane in (await collect_dispatch(p)).lanes}
        priority = meta.get("priority") or "normal"
        if all(countable_lane(lanes[q]) for q in lanes_at_or_above(priority)):
            states = {
                q: LaneState(
                    added=(info.entries_read or 0) + (info.lag or 0), read=info.entries_read or 0
                )
                for q, info in lanes.items()
            }
            out["queue_position"] = queue_position(priority, index, states)
    return out


async def collect_session(p: Probe) -> SessionInfo:
    sid = p.query.session_id
    assert sid is not None, "the session section runs only with --session"
    pipe = p.redis.pipeline(transaction=False)
    pipe.hgetall(keys.meta(sid))
    pipe.get(keys.lease(sid))
    pipe.pttl(keys.lease(sid))
    pipe.ttl(keys.meta(sid))
    pipe.xlen(keys.audio(sid))
    pipe.xlen(keys.results(sid))
    pipe.zscore(keys.DETACHED, sid)
    raw_meta, lease, lease_pttl, ttl, audio_len, results_len, deadline = await pipe.execute()
    meta = _decode_hash(raw_meta)
    holder: str | None = None
    epoch: int | None = None
    if lease is not None:
        holder, _, epoch_text = _s(lease).rpartition(":")
        epoch = _int(epoch_text)
    return SessionInfo(
        session_id=sid,
        exists=bool(meta),
        meta=meta,
        lease_holder=holder,
        lease_epoch=epoch,
        lease_ttl_ms=int(lease_pttl) if lease is not None and int(lease_pttl) >= 0 else None,
        ttl_s=int(ttl) if int(ttl) >= 0 else None,
        audio_entries=int(audio_len),
        results_entries=int(results_len),
        detached_deadline_in_ms=None if deadline is None else int(deadline) - p.now_ms,
        received_s=received_seconds(meta) if meta else None,
        committed_s=committed_seconds(meta) if "ckpt_sample" in meta else None,
        **(await _dispatch_entry(p, meta) if meta else {}),
    )
