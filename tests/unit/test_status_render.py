"""`streamscribe status` rendering: known data in, known text and JSON out (no Redis)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from shared import keys
from shared.errors import ConfigError
from shared.status import (
    Report,
    SectionError,
    query_from_args,
    render,
    to_json,
)
from shared.status_model import (
    DeadLetterInfo,
    DeadLetterRow,
    DetachedInfo,
    DetachedRow,
    DispatchInfo,
    GatewayRow,
    GatewaysInfo,
    LaneInfo,
    ServerInfo,
    SessionInfo,
    WorkerRow,
    WorkersInfo,
    committed_seconds,
    countable_lane,
    received_seconds,
    redact_url,
)
from shared.status_render import format_duration_ms, render_report, render_server

NOW_MS = 1_700_000_000_000
SID = "ab" * 16

SERVER = ServerInfo("valkey 8.1.1", True, "noeviction", "1.50M", 7)
HIGH = LaneInfo(
    priority="high",
    stream=keys.DISPATCH_HIGH,
    length=6,
    group_exists=True,
    consumers=2,
    lag=2,
    pending=1,
    entries_read=4,
    last_delivered_id="1700000000000-9",
    oldest_waiting_ms=12_000,
)
NORMAL = LaneInfo(
    priority="normal",
    stream=keys.DISPATCH,
    length=42,
    group_exists=True,
    consumers=3,
    lag=5,
    pending=10,
    entries_read=37,
    last_delivered_id="1700000000000-3",
    oldest_waiting_ms=400,
)
DISPATCH = DispatchInfo((HIGH, NORMAL))
WORKERS = WorkersInfo(
    alive_s=15.0,
    rows=(
        WorkerRow("w-alive", 400, True, 8, 8, 2, "tiny.en", 101, 8, 3.3, 0.914, "probing", 9.6),
        WorkerRow("w-dead", None, False, None, None, None, "", None, 3, None),
    ),
    pending_scanned=11,
    pending_total=11,
)
DETACHED = DetachedInfo(
    total=3,
    rows=(DetachedRow("cd" * 16, 42_000), DetachedRow("ef" * 16, -1_500)),
)
GATEWAYS = GatewaysInfo(
    alive_s=15.0,
    rows=(GatewayRow("gw-a", 1_000, True, 5), GatewayRow("gw-b", 40_000, False, 3)),
)
DEADLETTER = DeadLetterInfo(
    total=2,
    rows=(
        DeadLetterRow(
            "1700000000000-0",
            "12" * 16,
            "1699999990000-0",
            6,
            "delivered to workers 6 times without finishing; last error: RuntimeError:\nboom",
            90_000,
        ),
    ),
)


def _meta(**extra: str) -> dict[str, str]:
    meta = {
        "state": "open",
        "created_ms": str(NOW_MS - 90_000),
        "sample_rate": "16000",
        "encoding": "pcm_s16le",
        "channels": "1",
        "language": "",
        "next_seq": "120",
        "finals": "4",
        "audio_bytes": str(32000 * 12),
        "epoch": "3",
        "owner": "w-alive",
        "claimed_ms": str(NOW_MS - 12_000),
        "conn": "gw-a/0123456789abcdef",
        "priority": "normal",
        "dispatch_id": "1700000000000-2",
        "dispatch_index": "17",
    }
    meta.update(extra)
    return meta


def _session(**changes: object) -> SessionInfo:
    base: dict[str, object] = {
        "session_id": SID,
        "exists": True,
        "meta": _meta(ckpt_entry="1700000000000-7", ckpt_sample="161600", ckpt_base="0"),
        "lease_holder": "w-alive",
        "lease_epoch": 3,
        "lease_ttl_ms": 8200,
        "ttl_s": None,
        "audio_entries": 14,
        "results_entries": 4,
        "detached_deadline_in_ms": None,
        "received_s": 12.0,
        "committed_s": 10.1,
        "dispatch_lane": keys.DISPATCH,
        "dispatch_consumer": "w-alive",
        "dispatch_idle_ms": 400,
        "dispatch_deliveries": 2,
    }
    base.update(changes)
    return SessionInfo(**base)  # type: ignore[arg-type]


def _report(**sections: object) -> Report:
    return Report("redis://:***@redis:6379/0", NOW_MS, dict(sections))


def test_fleet_screen_answers_the_operator_questions() -> None:
    """Waiting and claimed sessions per lane, each worker's load and lag, sessions awaiting
    takeover, gateways alive and dead, detached and dead-lettered sessions all appear with
    the numbers given."""
    text = render(
        _report(
            server=SERVER,
            dispatch=DISPATCH,
            workers=WORKERS,
            gateways=GATEWAYS,
            detached=DETACHED,
            deadletter=DEADLETTER,
        )
    )
    lines = text.splitlines()
    assert "server    valkey 8.1.1, 1.50M used, 7 client(s)" in text
    assert "aof on, maxmemory-policy noeviction" in text
    assert "dispatch  7 session(s) waiting for a worker, 11 claimed and not closed" in text
    high = next(line for line in lines if line.strip().startswith("high "))
    assert high.split() == [
        *("high", keys.DISPATCH_HIGH, "6", "2", "12", "s", "1", "2", "4", "1700000000000-9")
    ]
    normal = next(line for line in lines if line.strip().startswith("normal "))
    assert normal.split() == [
        *("normal", keys.DISPATCH, "42", "5", "0.4", "s", "10", "3", "37", "1700000000000-3")
    ]
    assert lines.index(high) < lines.index(normal), "highest priority first"
    assert "1 alive (heartbeat within 15 s), 1 not alive holding 3 session(s) awaiting" in text
    alive = next(line for line in lines if line.strip().startswith("w-alive"))
    assert alive.split() == [
        *("w-alive", "alive", "0.4", "s", "ago", "8", "8", "8", "2", "91%", "probing/10s"),
        *("3.3", "s"),
        "tiny.en",
    ]
    dead = next(line for line in lines if line.strip().startswith("w-dead"))
    assert dead.split() == ["w-dead", "GONE", "none", "-", "-", "3", "-", "-", "-", "-", "-"]
    assert "BUSY: share of its engine's decode capacity used over the last 4 s" in text
    assert "NEW: whether it takes new sessions: open; probing/S, one at a time" in text
    assert "gateways  1 alive (heartbeat within 15 s), 1 dead holding 3 session(s)" in text
    assert next(line for line in lines if "gw-a" in line).split() == [
        *("gw-a", "alive", "1.0", "s", "ago", "5")
    ]
    assert next(line for line in lines if "gw-b" in line).split() == [
        *("gw-b", "DEAD", "40", "s", "ago", "3")
    ]
    assert "next maintenance run detaches its sessions" in text
    assert "3 session(s) waiting for their client to resume" in text
    assert f"{'cd' * 16}  in 42 s" in text
    assert f"{'ef' * 16}  overdue by 1.5 s" in text
    assert "... and 1 more" in text
    assert f"deadletter 2 session(s) failed repeatedly ({keys.DEADLETTER})" in text
    failed = next(line for line in lines if line.strip().startswith("12" * 16))
    assert failed.split()[:5] == ["12" * 16, "6", "90", "s", "ago"]
    assert failed.endswith("last error: RuntimeError: boom"), "one line, newlines folded"
    assert "... and 1 older" in text


def test_missing_group_and_unknown_lag_are_said_plainly() -> None:
    """Before any worker started there is no consumer group and every entry waits; an
    unknown lag is not zero."""
    no_group = LaneInfo("high", keys.DISPATCH_HIGH, 2, False, 0, 2, 0, None, "-", 5_000)
    text = render(_report(dispatch=DispatchInfo((no_group, NORMAL))))
    assert f"{keys.DISPATCH_HIGH}: no group {keys.DISPATCH_GROUP!r} yet" in text
    assert "dispatch  7 session(s) waiting" in text
    unknown = LaneInfo("normal", keys.DISPATCH, 3, True, 1, None, 1, None, "0-1", None)
    text = render(_report(dispatch=DispatchInfo((HIGH, unknown))))
    assert "dispatch  unknown session(s) waiting for a worker, 2 claimed" in text
    assert f"{keys.DISPATCH}: Redis cannot tell the lag" in text


def test_queue_positions_only_from_trustworthy_counters() -> None:
    """A lane gives queue positions when its lag is known and its entries-read is known or
    nothing was ever read (new group, or no group yet)."""
    assert countable_lane(NORMAL)
    fresh = LaneInfo("high", keys.DISPATCH_HIGH, 1, True, 1, 1, 0, None, "0-0", 0)
    assert countable_lane(fresh)
    no_group = LaneInfo("high", keys.DISPATCH_HIGH, 1, False, 0, 1, 0, None, "-", 0)
    assert countable_lane(no_group)
    deleted = LaneInfo("normal", keys.DISPATCH, 9, True, 1, 3, 0, None, "1700000000000-3", 0)
    assert not countable_lane(deleted)
    assert not countable_lane(
        LaneInfo("normal", keys.DISPATCH, 9, True, 1, None, 0, 5, "1-0", None)
    )


def test_long_dead_letter_reasons_are_cut_on_screen() -> None:
    """A reason longer than the screen allows ends in '...'; JSON keeps it whole."""
    long_reason = "x" * 500
    info = DeadLetterInfo(1, (DeadLetterRow("1-0", "", "0-1", None, long_reason, None),))
    line = next(
        line for line in render(_report(deadletter=info)).splitlines() if line.startswith("  ?")
    )
    assert line.split()[:3] == ["?", "-", "-"]
    assert line.endswith("x" * 157 + "...")
    assert to_json(_report(deadletter=info))["deadletter"]["rows"][0]["reason"] == long_reason


def test_risky_server_settings_are_flagged() -> None:
    """AOF off and an evicting memory policy both show up as warnings."""
    text = render(_report(server=ServerInfo("redis 7.2.4", False, "allkeys-lru", "1M", 1)))
    assert "aof OFF" in text
    assert "WARNING: an evicting policy may drop session streams" in text


def _rows(text: str) -> dict[str, str]:
    """The session section's rows by name (the name is the first 11 characters)."""
    return {
        line[2:13].strip(): line[14:] for line in text.splitlines()[2:] if line.startswith("  ")
    }


def test_session_detail_shows_owner_progress_and_checkpoint() -> None:
    """`--session`: state, client, lease holder with epoch and TTL, the last claim and when,
    the dispatch entry with its worker and deliveries, received vs committed audio, finals
    and the checkpoint."""
    rows = _rows(render(_report(session=_session())))
    assert rows["state"] == "open; client attached (conn gw-a/0123456789abcdef), created 90 s ago"
    assert rows["owner"] == "w-alive (lease epoch 3, expires in 8.2 s)"
    assert rows["last claim"] == "w-alive (epoch 3), 12 s ago"
    assert rows["dispatch"] == (
        f"normal lane {keys.DISPATCH}, entry 1700000000000-2 (#17): pending on w-alive, "
        "delivered 2 time(s), idle 0.4 s"
    )
    assert rows["audio"] == "next_seq 120, received 12.0 s, committed 10.1 s; 14 entries kept"
    assert rows["results"] == "finals 4; 4 entries"
    assert rows["checkpoint"] == "entry 1700000000000-7, sample 161600, base 0"
    assert rows["expiry"] == "none (live)"
    assert "failure" not in rows and "last error" not in rows


def test_waiting_session_shows_its_queue_position() -> None:
    """Not yet claimed (epoch 0): nobody owns it, and the dispatch row gives its place in
    the fleet's queue, or says a worker is claiming it (position 0)."""
    waiting = _meta(epoch="0", owner="", priority="high", dispatch_index="3")
    del waiting["claimed_ms"]
    unclaimed = {
        "lease_holder": None,
        "lease_epoch": None,
        "lease_ttl_ms": None,
        "dispatch_lane": keys.DISPATCH_HIGH,
        "dispatch_consumer": None,
        "dispatch_idle_ms": None,
        "dispatch_deliveries": None,
        "meta": waiting,
    }
    rows = _rows(render(_report(session=_session(queue_position=2, **unclaimed))))
    assert rows["owner"] == "nobody yet: no worker has claimed it"
    assert rows["last claim"] == "none yet (epoch 0)"
    assert rows["dispatch"] == (
        f"high lane {keys.DISPATCH_HIGH}, entry 1700000000000-2 (#3): waiting for a worker, "
        "queue position 2"
    )
    rows = _rows(render(_report(session=_session(queue_position=0, **unclaimed))))
    assert rows["dispatch"].endswith("read by a worker, being claimed")


def test_session_without_lease_or_client() -> None:
    """No lease on a claimed open session means it awaits takeover; a detached session
    shows its resume deadline; a closed one shows its reason and expiry."""
    orphaned = render(
        _report(
            session=_session(
                lease_holder=None,
                lease_epoch=None,
                lease_ttl_ms=None,
                detached_deadline_in_ms=30_000,
                meta=_meta(conn=""),
            )
        )
    )
    assert "awaiting another worker's takeover" in orphaned
    assert "no client attached, resume deadline in 30 s" in orphaned
    assert "none yet (no final with words)" in orphaned
    closed = render(
        _report(
            session=_session(
                lease_holder=None,
                ttl_s=3500,
                dispatch_consumer=None,
                meta=_meta(state="closed", closed_reason="abandoned"),
            )
        )
    )
    assert "closed (abandoned)" in closed and "nobody (closed)" in closed
    assert "(#17): not pending (acknowledged)" in closed
    assert "keys expire in 3500 s" in closed


def test_dead_lettered_session_shows_why() -> None:
    """A dead-lettered session shows reason `failed`, the maintenance job's `failure` text
    and the worker's `last_error`, each on one line."""
    meta = _meta(
        state="closed",
        closed_reason="failed",
        failure="delivered to workers 6 times without finishing; last error: E: x",
        last_error="E:\nx",
    )
    rows = _rows(
        render(_report(session=_session(lease_holder=None, dispatch_consumer=None, meta=meta)))
    )
    assert rows["state"].startswith("closed (failed)")
    assert rows["failure"] == meta["failure"]
    assert rows["last error"] == "E: x"


def test_unknown_session_makes_the_report_fail() -> None:
    """An unknown session is reported as such and the exit status says so."""
    report = _report(session=_session(exists=False, meta={}))
    assert "unknown or expired" in render(report)
    assert not report.ok
    assert _report(session=_session()).ok


def test_unreachable_redis_and_section_errors() -> None:
    """An unreachable Redis is the whole report; one failing section does not hide others."""
    down = Report("redis://h:6379/0", 0, {}, error="Connection refused")
    assert "UNREACHABLE: Connection refused" in render(down) and not down.ok
    partial = _report(server=SERVER, workers=SectionError("WRONGTYPE wrong kind of value"))
    text = render(partial)
    assert "workers   error: WRONGTYPE wrong kind of value" in text
    assert "valkey 8.1.1" in text


def test_json_has_the_same_numbers() -> None:
    """--json carries every collected value and the screen's totals, in sections named
    like the screen's."""
    report = _report(
        server=SERVER,
        dispatch=DISPATCH,
        workers=WORKERS,
        gateways=GATEWAYS,
        detached=DETACHED,
        deadletter=DEADLETTER,
        session=_session(),
    )
    data = json.loads(json.dumps(to_json(report)))
    assert data["now_ms"] == NOW_MS and data["error"] is None
    assert data["dispatch"]["waiting"] == 7 and data["dispatch"]["pending"] == 11
    assert [lane["stream"] for lane in data["dispatch"]["lanes"]] == list(keys.DISPATCH_LANES)
    assert data["dispatch"]["lanes"][0]["oldest_waiting_ms"] == 12_000
    assert data["workers"]["alive"] == 1
    assert [r["worker_id"] for r in data["workers"]["rows"]] == ["w-alive", "w-dead"]
    assert data["workers"]["rows"][0]["max_uncommitted_s"] == 3.3
    assert data["gateways"]["alive"] == 1
    assert data["gateways"]["rows"][1] == {
        "gateway_id": "gw-b",
        "heartbeat_age_ms": 40_000,
        "alive": False,
        "sessions": 3,
    }
    assert data["detached"]["rows"][1] == {"session_id": "ef" * 16, "deadline_in_ms": -1500}
    assert data["deadletter"]["total"] == 2 and data["deadletter"]["rows"][0]["attempts"] == 6
    assert data["session"]["meta"]["finals"] == "4"
    assert data["session"]["lease_holder"] == "w-alive"
    assert data["session"]["dispatch_deliveries"] == 2


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://redis:6379/0", "redis://redis:6379/0"),
        ("redis://:secret@redis:6379/0", "redis://:***@redis:6379/0"),
        ("rediss://default:secret@db.example:6380/1", "rediss://default:***@db.example:6380/1"),
        ("redis://u:secret@[::1]:6379", "redis://u:***@[::1]:6379"),
    ],
)
def test_password_never_printed(url: str, shown: str) -> None:
    """The Redis password is replaced; host, port, user and database stay."""
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("ms", "text"),
    [(400, "0.4 s"), (42_000, "42 s"), (210_000, "3.5 min"), (7_200_000, "2.0 h")],
)
def test_durations(ms: int, text: str) -> None:
    """Durations are short and carry their unit."""
    assert format_duration_ms(ms) == text


def test_audio_seconds_from_meta() -> None:
    """Received audio follows the session's format; committed audio is at 16 kHz."""
    stereo_f32 = {"encoding": "pcm_f32le", "channels": "2", "sample_rate": "48000"}
    assert received_seconds({**stereo_f32, "audio_bytes": str(48000 * 8 * 3)}) == 3.0
    assert received_seconds({"encoding": "opus", "audio_bytes": "10"}) is None
    assert committed_seconds({"ckpt_sample": "24000"}) == 1.5
    assert committed_seconds({}) == 0.0


def _args(**values: object) -> argparse.Namespace:
    base: dict[str, object] = {"session": None, "json": False, "limit": 20}
    base.update(values)
    return argparse.Namespace(**base)


def test_arguments_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A malformed session ID or limit is refused; --redis-url beats the environment."""
    monkeypatch.setenv("STREAMSCRIBE_REDIS_URL", "redis://from-env:6379/0")
    assert query_from_args(_args()).url == "redis://from-env:6379/0"
    query = query_from_args(_args(redis_url="redis://flag:6379/0", session=SID))
    assert query.url == "redis://flag:6379/0" and query.session_id == SID
    with pytest.raises(ConfigError, match="--session"):
        query_from_args(_args(session="not-a-session"))
    with pytest.raises(ConfigError, match="--limit"):
        query_from_args(_args(limit=0))


def test_without_url_uses_up_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No Redis URL anywhere: the one `streamscribe up` recorded is used, else a clear error."""
    monkeypatch.delenv("STREAMSCRIBE_REDIS_URL", raising=False)
    with pytest.raises(ConfigError, match="no running `streamscribe up`"):
        query_from_args(_args(state_dir=str(tmp_path)))
    (tmp_path / "up.json").write_text(json.dumps({"redis_url": "redis://127.0.0.1:4242/0"}))
    assert query_from_args(_args(state_dir=str(tmp_path))).url == "redis://127.0.0.1:4242/0"


def test_empty_fleet_is_one_line_per_section() -> None:
    """With nothing to list, each section is its headline alone: no table, no legend."""
    text = render(
        _report(
            dispatch=DispatchInfo(()),
            workers=WorkersInfo(15.0, (), 0, 0),
            gateways=GatewaysInfo(15.0, ()),
            detached=DetachedInfo(0, ()),
            deadletter=DeadLetterInfo(0, ()),
        )
    )
    assert text.splitlines()[1:] == [
        "dispatch  0 session(s) waiting for a worker, 0 claimed and not closed",
        "workers   0 alive (heartbeat within 15 s), 0 not alive",
        "gateways  0 alive (heartbeat within 15 s), 0 dead",
        "detached  0 session(s) waiting for their client to resume",
        f"deadletter 0 session(s) failed repeatedly ({keys.DEADLETTER})",
    ]


def test_partial_lag_scan_is_admitted() -> None:
    """When only some pending sessions were looked at, BEHIND says how many."""
    row = WorkerRow("w", 5, True, 1, 1, 0, "m", 1, 4, 0.25)
    text = render(_report(workers=WorkersInfo(2.5, (row,), 3, 9)))
    assert "workers   1 alive (heartbeat within 2.5 s), 0 not alive\n" in text
    assert "  BEHIND looked at the first 3 of 9 pending sessions.\n" in text
    full = render(_report(workers=WorkersInfo(2.5, (row,), 9, 9)))
    assert "BEHIND looked at" not in full


def test_render_report_uses_only_the_renderers_given() -> None:
    """A section without a renderer is left out; a failed section is shown by name anyway;
    the header carries the (redacted) URL and Redis's time in UTC."""
    report = _report(server=SERVER, dispatch=DISPATCH, odd=SectionError("NOPERM no"))
    text = render_report(report, {"server": render_server})
    assert text == (
        "streamscribe status  redis://:***@redis:6379/0  (2023-11-14 22:13:20 UTC)\n"
        + "\n".join(render_server(SERVER, NOW_MS))
        + "\nodd       error: NOPERM no\n"
    )
    assert to_json(report)["odd"] == {"error": "NOPERM no"}


def test_session_dispatch_row_without_entry_or_owner() -> None:
    """The dispatch row says when no entry was recorded, when the queue position is
    unknown, and when a claimed entry is no longer pending; an overdue resume deadline
    reads as overdue."""
    unowned: dict[str, object] = {"lease_holder": None, "dispatch_consumer": None}
    rows = _rows(render(_report(session=_session(meta=_meta(dispatch_id=""), **unowned))))
    assert rows["dispatch"] == f"normal lane {keys.DISPATCH}, entry not recorded"
    waiting = _meta(epoch="0")
    rows = _rows(render(_report(session=_session(meta=waiting, **unowned))))
    assert rows["dispatch"].endswith("(#17): waiting for a worker (queue position unknown)")
    rows = _rows(render(_report(session=_session(detached_deadline_in_ms=-2_000, **unowned))))
    assert rows["dispatch"].endswith("(#17): not pending")
    assert "resume deadline overdue by 2.0 s" in rows["state"]
