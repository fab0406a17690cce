"""`streamscribe status` rendering: known data in, known text and JSON out (no Redis)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from shared import keys
from shared.errors import ConfigError
from shared.status import (
    DetachedInfo,
    DetachedRow,
    DispatchInfo,
    Report,
    SectionError,
    ServerInfo,
    SessionInfo,
    WorkerRow,
    WorkersInfo,
    committed_seconds,
    format_duration_ms,
    query_from_args,
    received_seconds,
    redact_url,
    render,
    to_json,
)

NOW_MS = 1_700_000_000_000
SID = "ab" * 16

SERVER = ServerInfo("valkey 8.1.1", True, "noeviction", "1.50M", 7)
DISPATCH = DispatchInfo(
    length=42,
    group_exists=True,
    consumers=3,
    lag=5,
    pending=11,
    entries_read=37,
    last_delivered_id="1700000000000-3",
)
WORKERS = WorkersInfo(
    alive_s=15.0,
    rows=(
        WorkerRow("w-alive", 400, True, 8, 8, 2, "tiny.en", 101, 8, 3.3),
        WorkerRow("w-dead", None, False, None, None, None, "", None, 3, None),
    ),
    pending_scanned=11,
    pending_total=11,
)
DETACHED = DetachedInfo(
    total=3,
    rows=(DetachedRow("cd" * 16, 42_000), DetachedRow("ef" * 16, -1_500)),
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
        "conn": "0123456789abcdef",
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
    }
    base.update(changes)
    return SessionInfo(**base)  # type: ignore[arg-type]


def _report(**sections: object) -> Report:
    return Report("redis://:***@redis:6379/0", NOW_MS, dict(sections))


def test_fleet_screen_answers_the_operator_questions() -> None:
    """Waiting sessions, claimed sessions, each worker's load and lag, orphans and detached
    sessions all appear with the numbers given."""
    text = render(_report(server=SERVER, dispatch=DISPATCH, workers=WORKERS, detached=DETACHED))
    assert "server    valkey 8.1.1, 1.50M used, 7 client(s)" in text
    assert "aof on, maxmemory-policy noeviction" in text
    assert f"{keys.DISPATCH}: 42 entries" in text
    assert "waiting for a worker (lag): 5" in text
    assert "claimed, not closed (pending): 11" in text
    assert "1 alive (heartbeat within 15 s), 1 not alive holding 3 orphaned session(s)" in text
    alive = next(line for line in text.splitlines() if line.strip().startswith("w-alive"))
    assert alive.split() == [
        *("w-alive", "alive", "0.4", "s", "ago", "8", "8", "8", "2", "3.3", "s", "tiny.en")
    ]
    dead = next(line for line in text.splitlines() if line.strip().startswith("w-dead"))
    assert dead.split() == ["w-dead", "GONE", "none", "-", "-", "3", "-", "-", "-"]
    assert "3 session(s) waiting for their client to resume" in text
    assert f"{'cd' * 16}  in 42 s" in text
    assert f"{'ef' * 16}  overdue by 1.5 s" in text
    assert "... and 1 more" in text


def test_missing_group_and_unknown_lag_are_said_plainly() -> None:
    """Before any worker started there is no consumer group; an unknown lag is not zero."""
    no_group = DispatchInfo(0, False, 0, None, 0, None, "-")
    assert f"no group {keys.DISPATCH_GROUP!r} yet" in render(_report(dispatch=no_group))
    unknown = DispatchInfo(3, True, 1, None, 1, None, "0-1")
    assert "waiting for a worker (lag): unknown" in render(_report(dispatch=unknown))


def test_risky_server_settings_are_flagged() -> None:
    """AOF off and an evicting memory policy both show up as warnings."""
    text = render(_report(server=ServerInfo("redis 7.2.4", False, "allkeys-lru", "1M", 1)))
    assert "aof OFF" in text
    assert "WARNING: an evicting policy may drop session streams" in text


def test_session_detail_shows_owner_progress_and_checkpoint() -> None:
    """`--session`: state, client, lease holder with epoch and TTL, received vs committed
    audio, finals and the checkpoint."""
    text = render(_report(session=_session()))
    lines = {line.split()[0]: line for line in text.splitlines()[1:] if line.startswith("  ")}
    assert "open; client attached (conn 0123456789abcdef), created 90 s ago" in lines["state"]
    assert "w-alive (lease epoch 3, expires in 8.2 s)" in lines["owner"]
    assert "next_seq 120, received 12.0 s, committed 10.1 s; 14 entries kept" in lines["audio"]
    assert "finals 4; 4 entries" in lines["results"]
    assert "entry 1700000000000-7, sample 161600, base 0" in lines["checkpoint"]
    assert "none (live)" in lines["expiry"]


def test_session_without_lease_or_client() -> None:
    """No lease on an open session means waiting or orphaned; a detached session shows its
    resume deadline; a closed one shows its reason and expiry."""
    waiting = render(
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
    assert "waiting in the dispatch stream, or orphaned" in waiting
    assert "no client attached, resume deadline in 30 s" in waiting
    assert "none yet (no final with words)" in waiting
    closed = render(
        _report(
            session=_session(
                lease_holder=None, ttl_s=3500, meta=_meta(state="closed", closed_reason="abandoned")
            )
        )
    )
    assert "closed (abandoned)" in closed and "nobody (closed)" in closed
    assert "keys expire in 3500 s" in closed


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
    """--json carries every collected value, in sections named like the screen's."""
    report = _report(
        server=SERVER, dispatch=DISPATCH, workers=WORKERS, detached=DETACHED, session=_session()
    )
    data = json.loads(json.dumps(to_json(report)))
    assert data["now_ms"] == NOW_MS and data["error"] is None
    assert data["dispatch"]["lag"] == 5 and data["dispatch"]["pending"] == 11
    assert data["workers"]["alive"] == 1
    assert [r["worker_id"] for r in data["workers"]["rows"]] == ["w-alive", "w-dead"]
    assert data["workers"]["rows"][0]["max_uncommitted_s"] == 3.3
    assert data["detached"]["rows"][1] == {"session_id": "ef" * 16, "deadline_in_ms": -1500}
    assert data["session"]["meta"]["finals"] == "4"
    assert data["session"]["lease_holder"] == "w-alive"


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
