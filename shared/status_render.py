"""`streamscribe status`: the renderers, pure functions from the collected values
(`shared/status_model.py`) to lines of text, and the report as JSON.

A renderer takes one section's value and Redis's clock (ms) and returns the section's lines;
`render_report` puts the sections of a report on one screen.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from shared import keys
from shared.config import Config
from shared.status_model import (
    DeadLetterInfo,
    DetachedInfo,
    DispatchInfo,
    GatewaysInfo,
    JobsInfo,
    QuotasInfo,
    Report,
    SectionError,
    ServerInfo,
    SessionInfo,
    UsageInfo,
    WorkerRow,
    WorkersInfo,
)

#: (collected value, now_ms) -> lines
Renderer = Callable[[Any, int], list[str]]

#: The worker settings the legends quote (a worker may run others).
_DEFAULTS = Config()


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


def _claiming(row: WorkerRow) -> str | None:
    """The NEW cell: the gate's state, with the spacing while probing."""
    if row.claiming == "probing" and row.claim_spacing_s is not None:
        return f"probing/{row.claim_spacing_s:.0f}s"
    return row.claiming


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
        busy = None if row.engine_busy is None else f"{row.engine_busy * 100:.0f}%"
        rows.append(
            [
                row.worker_id,
                "alive" if row.alive else "GONE",
                beat,
                _cell(row.slots),
                _cell(row.owned),
                str(row.pending),
                _cell(row.queued_decodes),
                _cell(busy),
                _cell(_claiming(row)),
                _cell(uncommitted),
                row.model or "-",
            ]
        )
    header = ["WORKER", "STATE", "HEARTBEAT", "SLOTS", "OWNED", "PENDING", "QUEUED", "BUSY"]
    lines += _table([*header, "NEW", "BEHIND", "MODEL"], rows)
    lines.append(
        "  PENDING: sessions it holds (XPENDING, every lane). QUEUED: decodes waiting in its "
        "scheduler."
    )
    lines.append(
        "  BUSY: share of its engine's decode capacity used over the last 4 s (interims thin "
        f"out above {_DEFAULTS.interim_busy_target:.0%} and stop at "
        f"{_DEFAULTS.interim_shed_busy:.0%} by default; near 100% its finals wait)."
    )
    lines.append(
        "  NEW: whether it takes new sessions: open; probing/S, one at a time, S seconds apart "
        f"(its finals use {_DEFAULTS.claim_probe_busy:.0%} of the engine by default); closed, "
        f"while a final waits over {_DEFAULTS.claim_max_final_wait_s:g} s by default."
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


def render_quotas(info: QuotasInfo, _now_ms: int) -> list[str]:
    if not info.keys:
        return ["quotas    no API key has sessions counted (max_sessions_per_key off or idle)"]
    lines = [f"quotas    {info.keys} API key(s) with sessions counted (max_sessions_per_key)"]
    lines += _table(["KEY ID", "SESSIONS"], [[r.key_id, str(r.counted)] for r in info.rows])
    if info.keys > len(info.rows):
        lines.append(f"  ... and {info.keys - len(info.rows)} more")
    return lines


def render_usage(info: UsageInfo, _now_ms: int) -> list[str]:
    if not info.hashes:
        return ["usage     no API key has audio stored (no api_keys, or none used yet)"]
    lines = [f"usage     audio stored per API key and window ({info.hashes} found)"]
    rows = [
        [
            r.key_id,
            datetime.datetime.fromtimestamp(r.window, datetime.UTC).strftime("%Y-%m-%d %H:%M"),
            f"{r.audio_s:.1f}",
            str(r.gateways),
        ]
        for r in info.rows
    ]
    lines += _table(["KEY ID", "WINDOW FROM (UTC)", "AUDIO S", "GATEWAYS"], rows)
    if info.hashes > len(info.rows):
        lines.append(f"  ... and {info.hashes - len(info.rows)} more")
    return lines


def render_jobs(info: JobsInfo, _now_ms: int) -> list[str]:
    if not info.unfinished:
        return [f"jobs      no file job waiting or running ({info.arq_queued} arq run(s) queued)"]
    lines = [
        f"jobs      {info.unfinished} file job(s) waiting or running, oldest first "
        f"({info.arq_queued} arq run(s) queued)"
    ]
    rows = [
        [
            r.job_id,
            r.state,
            r.name[:30],
            f"{r.done_s:.0f}/{r.audio_s:.0f}",
            f"{r.waited_ms / 1000:.0f}",
            r.worker or "-",
            str(r.runs),
        ]
        for r in info.rows
    ]
    lines += _table(["JOB", "STATE", "NAME", "DONE/AUDIO S", "AGE S", "WORKER", "RUNS"], rows)
    if info.unfinished > len(info.rows):
        lines.append(f"  ... and {info.unfinished - len(info.rows)} more")
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


def render_report(report: Report, renderers: Mapping[str, Renderer]) -> str:
    """The whole screen as text; a section without a renderer in `renderers` is left out."""
    stamp = datetime.datetime.fromtimestamp(report.now_ms / 1000, datetime.UTC)
    when = stamp.strftime("%Y-%m-%d %H:%M:%S UTC") if report.now_ms else "unknown time"
    lines = [f"streamscribe status  {report.url}  ({when})"]
    if report.error is not None:
        lines.append(f"redis     UNREACHABLE: {report.error}")
        return "\n".join(lines) + "\n"
    for name, value in report.sections.items():
        if isinstance(value, SectionError):
            lines.append(f"{name:<9} error: {value.error}")
        elif name in renderers:
            lines += renderers[name](value, report.now_ms)
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> dict[str, Any]:
    """The same data as `render_report` shows, as JSON-ready values."""
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
