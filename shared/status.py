"""`streamscribe status`: the fleet on one screen, read from Redis alone.

It answers what docs/redis-layout.md answers with `redis-cli` recipes: how many sessions
wait for a worker in each dispatch lane, which workers are alive and how much each holds,
how far each is behind, which gateways are alive or dead and how many sessions each holds,
which sessions wait for their client, which sessions were dead-lettered and why, and
(`--session ID`) who owns one session and where it stands.

The module has two halves:

- **collectors** (async, redis-py) read Redis through the names in `shared/keys.py` and
  return small frozen dataclasses; they never build key strings themselves;
- **renderers** (pure functions) turn those dataclasses into lines of text. `--json` prints
  the same dataclasses as JSON, so a script sees exactly what the screen shows.

A *section* is one collector and one renderer (`Section`). `FLEET_SECTIONS` lists the
sections shown on every run, in screen order; `SESSION_SECTION` is added by `--session`.
To show something new, write a dataclass, a collector and a renderer, and append one
`Section` to `FLEET_SECTIONS`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import sys
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from shared import keys
from shared.admission import LaneState, lanes_at_or_above, queue_position
from shared.config import env_name, flag_name, load_config
from shared.errors import ConfigError
from shared.fleet import Fleet
from shared.keys import GatewayId, SessionId, WorkerId
from shared.protocol import ENCODINGS, PRIORITIES

#: Checkpoint fields (`ckpt_sample`, `ckpt_base`) count samples at the model's rate.
MODEL_RATE_HZ = 16_000
#: At most this many pending dispatch entries are resolved to sessions to measure how far
#: each worker is behind; the rest are counted but not inspected.
PENDING_SCAN_LIMIT = 1000


# --- collected data (plain values; JSON-ready through dataclasses.asdict) ---------------


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What kind of Redis this is and whether it keeps data safe."""

    server: str  # e.g. "valkey 8.1.1" or "redis 7.2.4"
    aof_enabled: bool
    maxmemory_policy: str
    used_memory_human: str
    connected_clients: int


@dataclass(frozen=True, slots=True)
class LaneInfo:
    """One dispatch lane (a stream) and its consumer group (XLEN, XINFO GROUPS)."""

    priority: str  # `high` or `normal`
    stream: str  # the lane's key, e.g. ss:dispatch:high
    length: int
    group_exists: bool
    consumers: int
    # Sessions not yet delivered to any worker. Without a group: every entry (the group
    # starts at 0 when the first worker creates it). None: Redis cannot tell.
    lag: int | None
    pending: int  # sessions claimed and not yet closed, sessions awaiting takeover included
    entries_read: int | None
    last_delivered_id: str
    oldest_waiting_ms: int | None  # how long the oldest undelivered entry has waited


@dataclass(frozen=True, slots=True)
class DispatchInfo:
    """Every dispatch lane, highest priority first."""

    lanes: tuple[LaneInfo, ...]

    @property
    def waiting(self) -> int | None:
        """Sessions waiting for a worker in all lanes; None if a lane's lag is unknown."""
        lags = [lane.lag for lane in self.lanes]
        return None if None in lags else sum(lag or 0 for lag in lags)

    @property
    def pending(self) -> int:
        return sum(lane.pending for lane in self.lanes)


@dataclass(frozen=True, slots=True)
class WorkerRow:
    """One worker: from its heartbeat (ss:workers, ss:worker:<id>) and from XPENDING over
    every dispatch lane.

    A consumer of the dispatch group that holds sessions but has no heartbeat entry is
    listed too (`heartbeat_age_ms` None): it stopped (or unregistered at shutdown), and
    its sessions wait for another worker's takeover round.
    """

    worker_id: str
    heartbeat_age_ms: int | None
    alive: bool
    slots: int | None
    owned: int | None
    queued_decodes: int | None
    model: str
    pid: int | None
    pending: int  # dispatch entries pending for this consumer: the sessions it holds
    max_uncommitted_s: float | None  # largest received-minus-committed audio of its sessions


@dataclass(frozen=True, slots=True)
class WorkersInfo:
    alive_s: float
    rows: tuple[WorkerRow, ...]
    pending_scanned: int  # pending entries looked at for `max_uncommitted_s`
    pending_total: int

    @property
    def alive(self) -> int:
        return sum(1 for row in self.rows if row.alive)


@dataclass(frozen=True, slots=True)
class GatewayRow:
    """One gateway: its heartbeat (ss:gateways) and the sessions its clients hold
    (SCARD ss:gateway:<id>:sessions)."""

    gateway_id: str
    heartbeat_age_ms: int
    alive: bool
    sessions: int


@dataclass(frozen=True, slots=True)
class GatewaysInfo:
    """The gateway registry. A dead gateway (silent past `alive_s`) stays listed until the
    maintenance job detaches its sessions and forgets it."""

    alive_s: float
    rows: tuple[GatewayRow, ...]

    @property
    def alive(self) -> int:
        return sum(1 for row in self.rows if row.alive)


@dataclass(frozen=True, slots=True)
class DetachedRow:
    session_id: str
    deadline_in_ms: int  # negative: overdue, the next maintenance run abandons it


@dataclass(frozen=True, slots=True)
class DetachedInfo:
    """Sessions waiting for their client to resume (ss:detached), soonest deadline first."""

    total: int
    rows: tuple[DetachedRow, ...]


@dataclass(frozen=True, slots=True)
class DeadLetterRow:
    """One entry of ss:deadletter (fields written by the maintenance job)."""

    entry_id: str
    session_id: str  # empty if the dispatch entry named no readable session
    dispatch_id: str
    attempts: int | None  # times the session was delivered to workers
    reason: str  # includes the worker's last error, when one was recorded
    age_ms: int | None  # since it was dead-lettered (`at_ms`)


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """Sessions that kept failing (ss:deadletter), newest first."""

    total: int  # XLEN; the stream is capped near keys.DEADLETTER_MAXLEN
    rows: tuple[DeadLetterRow, ...]


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session: its meta hash, lease, dispatch entry, stream lengths and expiry."""

    session_id: str
    exists: bool
    meta: dict[str, str]
    lease_holder: str | None  # worker ID holding the lease now; None: nobody
    lease_epoch: int | None
    lease_ttl_ms: int | None
    ttl_s: int | None  # meta's TTL; None while the session lives (no expiry)
    audio_entries: int
    results_entries: int
    detached_deadline_in_ms: int | None
    received_s: float | None
    committed_s: float | None
    # Its dispatch entry (meta `priority`, `dispatch_id`): the lane, and from XPENDING the
    # worker it is pending on, its idle time and how often it was delivered. Consumer
    # None: the entry is not pending (not yet read, or acknowledged).
    dispatch_lane: str | None = None
    dispatch_consumer: str | None = None
    dispatch_idle_ms: int | None = None
    dispatch_deliveries: int | None = None
    # While no worker has claimed it (epoch 0): its place in the fleet's queue, as the
    # gateway computes it (shared/admission.py); 0: a worker has read it and is claiming.
    queue_position: int | None = None


@dataclass(frozen=True, slots=True)
class SectionError:
    """A section whose collection failed with a Redis error (e.g. WRONGTYPE, NOPERM)."""

    error: str


@dataclass(frozen=True, slots=True)
class Query:
    """What the operator asked for."""

    url: str
    alive_s: float = 15.0
    session_id: SessionId | None = None
    limit: int = 20  # rows per list (detached and dead-lettered sessions)


@dataclass(frozen=True, slots=True)
class Report:
    """Everything `status` prints. `error` set: Redis could not be reached at all."""

    url: str  # password removed
    now_ms: int
    sections: dict[str, object]
    error: str | None = None

    @property
    def ok(self) -> bool:
        if self.error is not None:
            return False
        session = self.sections.get(SESSION_SECTION.name)
        return not (isinstance(session, SessionInfo) and not session.exists)


@dataclass(frozen=True, slots=True)
class Probe:
    """What a collector gets: the client, the query and Redis's clock."""

    redis: aioredis.Redis
    query: Query
    now_ms: int


@dataclass(frozen=True, slots=True)
class Section:
    name: str
    collect: Callable[[Probe], Awaitable[object]]
    render: Callable[[Any, int], list[str]]  # (collected value, now_ms) -> lines


# --- small pure helpers ------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL without its password (user names stay: they help tell ACL users apart)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def format_duration_ms(ms: float) -> str:
    """A short human duration: 0.4 s, 42 s, 3.5 min, 2.0 h, 1.5 d."""
    s = abs(ms) / 1000
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 172_800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86_400:.1f} d"


def received_seconds(meta: dict[str, str]) -> float | None:
    """Seconds of audio stored for the session, from its meta hash; None if unreadable."""
    try:
        per_second = (
            ENCODINGS[meta.get("encoding", "pcm_s16le")]
            * int(meta.get("channels", "1"))
            * int(meta.get("sample_rate", "16000"))
        )
        return int(meta.get("audio_bytes", "0")) / per_second
    except (KeyError, ValueError, ZeroDivisionError):
        return None


def committed_seconds(meta: dict[str, str]) -> float:
    """Seconds before the checkpoint: everything earlier has been transcribed for good."""
    try:
        return int(meta.get("ckpt_sample", "0")) / MODEL_RATE_HZ
    except ValueError:
        return 0.0


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [indent + "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    for row in rows:
        lines.append(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    return [line.rstrip() for line in lines]


# --- renderers (pure) --------------------------------------------------------------------


def render_server(info: ServerInfo, _now_ms: int) -> list[str]:
    aof = "aof on" if info.aof_enabled else "aof OFF (a restart loses sessions)"
    lines = [
        f"server    {info.server}, {info.used_memory_human} used, "
        f"{info.connected_clients} client(s)",
        f"          {aof}, maxmemory-policy {info.maxmemory_policy}",
    ]
    if info.maxmemory_policy not in ("noeviction", "unknown"):
        lines.append("          WARNING: an evicting policy may drop session streams")
    return lines


def render_dispatch(info: DispatchInfo, _now_ms: int) -> list[str]:
    waiting = "unknown" if info.waiting is None else str(info.waiting)
    lines = [
        f"dispatch  {waiting} session(s) waiting for a worker, "
        f"{info.pending} claimed and not closed"
    ]
    if not info.lanes:
        return lines
    rows = []
    for lane in info.lanes:
        oldest = None
        if lane.oldest_waiting_ms is not None:
            oldest = format_duration_ms(lane.oldest_waiting_ms)
        rows.append(
            [
                lane.priority,
                lane.stream,
                str(lane.length),
                "unknown" if lane.lag is None else str(lane.lag),
                _cell(oldest),
                str(lane.pending),
                str(lane.consumers) if lane.group_exists else "-",
                _cell(lane.entries_read),
                lane.last_delivered_id if lane.group_exists else "-",
            ]
        )
    header = ["LANE", "STREAM", "ENTRIES", "WAITING", "OLDEST", "PENDING", "CONSUMERS"]
    lines += _table([*header, "ENTRIES-READ", "LAST-DELIVERED-ID"], rows)
    lines.append(
        "  WAITING: not yet delivered to a worker (group lag). OLDEST: how long the first of "
        "them has waited."
    )
    lines.append("  PENDING: claimed and not closed (XPENDING).")
    for lane in info.lanes:
        if not lane.group_exists:
            lines.append(
                f"  {lane.stream}: no group {keys.DISPATCH_GROUP!r} yet (no worker has "
                "started); every entry waits"
            )
        elif lane.lag is None:
            lines.append(f"  {lane.stream}: Redis cannot tell the lag (entries deleted)")
    return lines


def render_workers(info: WorkersInfo, _now_ms: int) -> list[str]:
    gone = [row for row in info.rows if not row.alive]
    orphaned = sum(row.pending for row in gone)
    head = (
        f"workers   {info.alive} alive (heartbeat within {info.alive_s:g} s), {len(gone)} not alive"
    )
    if orphaned:
        head += f" holding {orphaned} session(s) awaiting takeover"
    lines = [head]
    if not info.rows:
        return lines
    rows = []
    for row in info.rows:
        if row.heartbeat_age_ms is None:
            beat = "none"
        else:
            beat = format_duration_ms(row.heartbeat_age_ms) + " ago"
        uncommitted = None if row.max_uncommitted_s is None else f"{row.max_uncommitted_s:.1f} s"
        rows.append(
            [
                row.worker_id,
                "alive" if row.alive else "GONE",
                beat,
                _cell(row.slots),
                _cell(row.owned),
                str(row.pending),
                _cell(row.queued_decodes),
                _cell(uncommitted),
                row.model or "-",
            ]
        )
    header = ["WORKER", "STATE", "HEARTBEAT", "SLOTS", "OWNED", "PENDING", "QUEUED", "BEHIND"]
    lines += _table([*header, "MODEL"], rows)
    lines.append(
        "  PENDING: sessions it holds (XPENDING, every lane). QUEUED: decodes waiting in its "
        "scheduler."
    )
    lines.append(
        "  BEHIND: largest received-minus-committed audio of its sessions (includes the open "
        "utterance)."
    )
    if info.pending_scanned < info.pending_total:
        lines.append(
            f"  BEHIND looked at the first {info.pending_scanned} of "
            f"{info.pending_total} pending sessions."
        )
    return lines


def render_gateways(info: GatewaysInfo, _now_ms: int) -> list[str]:
    dead = [row for row in info.rows if not row.alive]
    head = f"gateways  {info.alive} alive (heartbeat within {info.alive_s:g} s), {len(dead)} dead"
    held = sum(row.sessions for row in dead)
    if held:
        head += f" holding {held} session(s)"
    lines = [head]
    if not info.rows:
        return lines
    rows = [
        [
            row.gateway_id,
            "alive" if row.alive else "DEAD",
            format_duration_ms(row.heartbeat_age_ms) + " ago",
            str(row.sessions),
        ]
        for row in info.rows
    ]
    lines += _table(["GATEWAY", "STATE", "HEARTBEAT", "SESSIONS"], rows)
    lines.append("  SESSIONS: sessions with a client connected to it.")
    if dead:
        lines.append(
            "  DEAD: the next maintenance run detaches its sessions (their resume grace "
            "starts) and forgets it."
        )
    return lines


def render_detached(info: DetachedInfo, _now_ms: int) -> list[str]:
    lines = [f"detached  {info.total} session(s) waiting for their client to resume"]
    if not info.rows:
        return lines
    rows = []
    for row in info.rows:
        if row.deadline_in_ms >= 0:
            when = "in " + format_duration_ms(row.deadline_in_ms)
        else:
            when = "overdue by " + format_duration_ms(row.deadline_in_ms)
        rows.append([row.session_id, when])
    lines += _table(["SESSION", "RESUME DEADLINE"], rows)
    if info.total > len(info.rows):
        lines.append(f"  ... and {info.total - len(info.rows)} more")
    return lines


#: Longest dead-letter reason shown on screen (--json has it whole).
REASON_CHARS = 160


def render_deadletter(info: DeadLetterInfo, _now_ms: int) -> list[str]:
    lines = [f"deadletter {info.total} session(s) failed repeatedly ({keys.DEADLETTER})"]
    if not info.rows:
        return lines
    rows = []
    for row in info.rows:
        reason = " ".join(row.reason.split())  # one line, whatever the worker's error held
        if len(reason) > REASON_CHARS:
            reason = reason[: REASON_CHARS - 3] + "..."
        when = None if row.age_ms is None else format_duration_ms(row.age_ms) + " ago"
        rows.append([row.session_id or "?", _cell(row.attempts), _cell(when), reason])
    lines += _table(["SESSION", "ATTEMPTS", "WHEN", "REASON"], rows)
    if info.total > len(info.rows):
        lines.append(f"  ... and {info.total - len(info.rows)} older")
    return lines


def _session_owner(info: SessionInfo, state: str) -> str:
    if info.lease_holder is not None:
        ttl = "" if info.lease_ttl_ms is None else f", expires in {info.lease_ttl_ms / 1000:.1f} s"
        return f"{info.lease_holder} (lease epoch {_cell(info.lease_epoch)}{ttl})"
    if state == "closed":
        return "nobody (closed)"
    if info.meta.get("epoch", "0") == "0":
        return "nobody yet: no worker has claimed it"
    return "nobody: its worker stopped or gave it up; awaiting another worker's takeover"


def _session_claim(meta: dict[str, str], now_ms: int) -> str:
    epoch = meta.get("epoch", "0")
    if epoch == "0":
        return "none yet (epoch 0)"
    claimed = meta.get("claimed_ms", "")
    when = f", {format_duration_ms(now_ms - int(claimed))} ago" if claimed.isdigit() else ""
    return f"{meta.get('owner') or '-'} (epoch {epoch}){when}"


def _session_dispatch(info: SessionInfo) -> str:
    meta = info.meta
    lane = f"{meta.get('priority') or 'normal'} lane {info.dispatch_lane or '?'}"
    entry_id = meta.get("dispatch_id")
    if not entry_id:
        return f"{lane}, entry not recorded"
    entry = f"{lane}, entry {entry_id} (#{meta.get('dispatch_index', '?')})"
    if info.dispatch_consumer is not None:
        idle = "?" if info.dispatch_idle_ms is None else format_duration_ms(info.dispatch_idle_ms)
        return (
            f"{entry}: pending on {info.dispatch_consumer}, delivered "
            f"{_cell(info.dispatch_deliveries)} time(s), idle {idle}"
        )
    if meta.get("epoch", "0") == "0" and meta.get("state") != "closed":
        if info.queue_position is None:
            return f"{entry}: waiting for a worker (queue position unknown)"
        if info.queue_position == 0:
            return f"{entry}: read by a worker, being claimed"
        return f"{entry}: waiting for a worker, queue position {info.queue_position}"
    if meta.get("state") == "closed":
        return f"{entry}: not pending (acknowledged)"
    return f"{entry}: not pending"


def render_session(info: SessionInfo, now_ms: int) -> list[str]:
    lines = [f"session   {info.session_id}"]
    if not info.exists:
        lines.append("  unknown or expired (no meta hash)")
        return lines
    meta = info.meta
    state = meta.get("state", "?")
    shown_state = state
    if state == "closed":
        shown_state += f" ({meta.get('closed_reason') or 'no reason recorded'})"
    conn = meta.get("conn", "")
    client = f"client attached (conn {conn})" if conn else "no client attached"
    if info.detached_deadline_in_ms is not None:
        client += f", resume deadline in {format_duration_ms(info.detached_deadline_in_ms)}"
        if info.detached_deadline_in_ms < 0:
            client = client.replace("deadline in", "deadline overdue by")
    received = "?" if info.received_s is None else f"{info.received_s:.1f} s"
    committed = "-" if info.committed_s is None else f"{info.committed_s:.1f} s"
    created = meta.get("created_ms", "")
    age = f", created {format_duration_ms(now_ms - int(created))} ago" if created.isdigit() else ""
    rows = [
        ("state", f"{shown_state}; {client}{age}"),
        ("owner", _session_owner(info, state)),
        ("last claim", _session_claim(meta, now_ms)),
        ("dispatch", _session_dispatch(info)),
        (
            "audio",
            f"next_seq {meta.get('next_seq', '0')}, received {received}, committed "
            f"{committed}; {info.audio_entries} entries kept",
        ),
        ("results", f"finals {meta.get('finals', '0')}; {info.results_entries} entries"),
        (
            "format",
            f"{meta.get('encoding', '?')} {meta.get('sample_rate', '?')} Hz "
            f"x{meta.get('channels', '?')}, language {meta.get('language') or 'default'}",
        ),
    ]
    if "ckpt_entry" in meta:
        rows.append(
            (
                "checkpoint",
                f"entry {meta['ckpt_entry']}, sample {meta.get('ckpt_sample', '?')}, "
                f"base {meta.get('ckpt_base', '?')}",
            )
        )
    else:
        rows.append(("checkpoint", "none yet (no final with words)"))
    # `failure`: why the maintenance job dead-lettered it; `last_error`: the last worker
    # failure (it may have recovered since). One line each, whatever the error text held.
    for name, field_name in (("failure", "failure"), ("last error", "last_error")):
        if meta.get(field_name):
            rows.append((name, " ".join(meta[field_name].split())))
    expiry = "none (live)" if info.ttl_s is None else f"keys expire in {info.ttl_s} s"
    rows.append(("expiry", expiry))
    lines += [f"  {name:<11} {value}" for name, value in rows]
    return lines


def render(report: Report, sections: Sequence[Section] | None = None) -> str:
    """The whole screen as text."""
    stamp = datetime.datetime.fromtimestamp(report.now_ms / 1000, datetime.UTC)
    when = stamp.strftime("%Y-%m-%d %H:%M:%S UTC") if report.now_ms else "unknown time"
    lines = [f"streamscribe status  {report.url}  ({when})"]
    if report.error is not None:
        lines.append(f"redis     UNREACHABLE: {report.error}")
        return "\n".join(lines) + "\n"
    by_name = {s.name: s for s in (sections or (*FLEET_SECTIONS, SESSION_SECTION))}
    for name, value in report.sections.items():
        if isinstance(value, SectionError):
            lines.append(f"{name:<9} error: {value.error}")
        elif name in by_name:
            lines += by_name[name].render(value, report.now_ms)
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> dict[str, Any]:
    """The same data as `render` shows, as JSON-ready values."""
    out: dict[str, Any] = {"url": report.url, "now_ms": report.now_ms, "error": report.error}
    for name, value in report.sections.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            data = dataclasses.asdict(value)
            # Totals the screen shows are properties; JSON carries them too.
            for prop in _DERIVED.get(type(value), ()):
                data[prop] = getattr(value, prop)
            out[name] = data
        else:
            out[name] = value
    return out


_DERIVED: dict[type, tuple[str, ...]] = {
    DispatchInfo: ("waiting", "pending"),
    WorkersInfo: ("alive",),
    GatewaysInfo: ("alive",),
}


# --- collectors (async) ------------------------------------------------------------------


def _s(value: object) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: object) -> int | None:
    try:
        return int(_s(value))
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


def countable_lane(lane: LaneInfo) -> bool:
    """Whether the lane's counters give queue positions: its lag is known, and so is how
    many entries were read (Redis reports entries-read as null until the first read, or
    after entries were deleted out of order; only the first case means none was read)."""
    if lane.lag is None:
        return False
    return lane.entries_read is not None or lane.last_delivered_id in ("-", "0-0")


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


FLEET_SECTIONS: tuple[Section, ...] = (
    Section("server", collect_server, render_server),
    Section("dispatch", collect_dispatch, render_dispatch),
    Section("workers", collect_workers, render_workers),
    Section("gateways", collect_gateways, render_gateways),
    Section("detached", collect_detached, render_detached),
    Section("deadletter", collect_deadletter, render_deadletter),
)
SESSION_SECTION = Section("session", collect_session, render_session)


def sections_for(query: Query) -> tuple[Section, ...]:
    if query.session_id is None:
        return FLEET_SECTIONS
    return (*FLEET_SECTIONS, SESSION_SECTION)


async def collect(redis: aioredis.Redis, query: Query) -> Report:
    """Read every section; a Redis that cannot be reached gives a report with `error`."""
    url = redact_url(query.url)
    try:
        seconds, micros = await redis.time()
    except (RedisError, OSError) as exc:
        return Report(url, 0, {}, error=str(exc) or type(exc).__name__)
    # Redis's clock, not this machine's: heartbeats and deadlines are compared with one
    # clock whichever host the operator runs `status` on.
    probe = Probe(redis, query, int(seconds) * 1000 + int(micros) // 1000)
    sections: dict[str, object] = {}
    for section in sections_for(query):
        try:
            sections[section.name] = await section.collect(probe)
        except ResponseError as exc:
            sections[section.name] = SectionError(str(exc))
        except (RedisError, OSError) as exc:  # the connection went away mid-way
            return Report(url, probe.now_ms, sections, error=str(exc) or type(exc).__name__)
    return Report(url, probe.now_ms, sections)


async def collect_from_url(query: Query) -> Report:
    from shared.store import connect

    redis = connect(query.url)
    try:
        return await collect(redis, query)
    finally:
        await redis.aclose()


# --- command line ------------------------------------------------------------------------


def add_status_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = subparsers.add_parser(
        "status",
        help="show queues, workers and sessions from Redis on one screen",
        description="Show Redis, both dispatch lanes (sessions waiting for a worker, how "
        "long the oldest has waited, sessions claimed), workers (heartbeat, sessions held, "
        "how far behind), gateways (alive or dead, sessions held), sessions waiting for "
        "their client, dead-lettered sessions with the reason, and with --session one "
        "session's state, owner, dispatch entry (or queue position) and failures. Without "
        "--redis-url, uses the Redis of `streamscribe up` on this machine. Exit code 1: "
        "Redis unreachable or the session unknown.",
    )
    for name, metavar, text in (
        ("redis_url", "URL", "Redis/Valkey to inspect"),
        ("state_dir", "DIR", "where `up` wrote up.json (used without a Redis URL)"),
        (
            "worker_alive_s",
            "SECONDS",
            "a worker or gateway is alive if it reported within this many s",
        ),
    ):
        st.add_argument(
            flag_name(name),
            dest=name,
            metavar=metavar,
            default=argparse.SUPPRESS,
            help=f"{text} [env {env_name(name)}]",
        )
    st.add_argument("--session", metavar="ID", help="also show this session in detail")
    st.add_argument("--json", action="store_true", help="print the report as JSON")
    st.add_argument(
        "--limit",
        type=int,
        default=20,
        help="rows of long lists (detached, dead-lettered sessions) to show (default 20)",
    )


def _redis_url_from_up(state_dir: str) -> str:
    path = Path(state_dir).expanduser() / "up.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        raise ConfigError(
            f"no {flag_name('redis_url')} or {env_name('redis_url')} given, and no running "
            f"`streamscribe up` found ({path} missing or unreadable)"
        ) from None
    url = info.get("redis_url") if isinstance(info, dict) else None
    if not isinstance(url, str):
        raise ConfigError(f"{path} names no redis_url")
    return url


def query_from_args(args: argparse.Namespace) -> Query:
    given = {
        k: v for k, v in vars(args).items() if k in ("redis_url", "state_dir", "worker_alive_s")
    }
    config = load_config(given)
    url = config.redis_url or _redis_url_from_up(config.state_dir)
    sid = args.session
    if sid is not None and not keys.is_session_id(sid):
        raise ConfigError(f"--session: not a session ID (32 lowercase hex characters): {sid!r}")
    if args.limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {args.limit}")
    return Query(
        url=url,
        alive_s=config.worker_alive_s,
        session_id=None if sid is None else SessionId(sid),
        limit=args.limit,
    )


def run_status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`streamscribe status`: 0 when printed, 1 when Redis is unreachable or the session
    is unknown. Raises ConfigError for bad arguments."""
    query = query_from_args(args)
    report = asyncio.run(collect_from_url(query))
    stream = out if out is not None else sys.stdout
    if args.json:
        stream.write(json.dumps(to_json(report), indent=2) + "\n")
    else:
        stream.write(render(report))
    return 0 if report.ok else 1
