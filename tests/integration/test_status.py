"""`streamscribe status` against a real Valkey with a real gateway and worker: every number
it reports is the one Redis holds."""

from __future__ import annotations

import asyncio
import io
import json
import socket
from collections.abc import Awaitable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from shared import keys
from shared.cli import build_parser, main
from shared.fleet import Fleet
from shared.keys import GatewayId, SessionId
from shared.protocol import SessionParams
from shared.status import (
    Query,
    collect,
    render,
    run_status,
)
from shared.status_model import (
    DeadLetterInfo,
    DetachedInfo,
    DispatchInfo,
    GatewaysInfo,
    ServerInfo,
    SessionInfo,
    WorkersInfo,
)
from shared.store import Store
from tests.conftest import ServiceFactory
from tests.helpers import fixture, hgetall, open_ws, started

ORPHAN = SessionId("0a" * 16)
WAITING = SessionId("0b" * 16)
DETACHED = SessionId("0c" * 16)
FAILED = SessionId("0d" * 16)
URGENT = SessionId("0e" * 16)
GONE_WORKER = "gone-worker-1"
DEAD_GATEWAY = GatewayId("gw-dead")


async def _read_one(redis: aioredis.Redis, consumer: str, sid: SessionId) -> bytes:
    """Deliver the next undelivered normal-lane entry to `consumer`; it must be `sid`'s."""
    reply = await redis.xreadgroup(keys.DISPATCH_GROUP, consumer, {keys.DISPATCH: ">"}, count=1)
    entry_id, fields = reply[0][1][0]
    assert fields[b"sid"] == sid.encode()
    return bytes(entry_id)


def _group(groups: list[dict[str, Any]]) -> dict[str, Any]:
    (group,) = groups
    return group


async def test_status_numbers_match_redis(
    service_factory: ServiceFactory, redis: aioredis.Redis, redis_url: str
) -> None:
    """A fleet with one owned session, one of a stopped worker, one dead-lettered, sessions
    waiting for a worker in both lanes, one waiting for its client, a live gateway and a
    dead one: status reports exactly what Redis holds."""
    store = Store(redis)
    # Maintenance off: it would reap the dead gateway below while the test looks at it.
    svc = await service_factory(slots=1, maintenance="off")
    assert svc.worker is not None
    wid = svc.worker.worker_id
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    for frame in fixture("s1.wav").frames(100)[:20]:
        await ws.send(frame)
    await ws.send(json.dumps({"type": "finalize"}))
    while True:  # until the first final: the worker owns the session and has a checkpoint
        msg = json.loads(await ws.recv())
        if msg["type"] == "transcript" and msg["is_final"]:
            break
    # The worker's only slot is taken, so it neither claims nor takes over anything now.
    # A worker that claimed a session and then vanished: pending, no heartbeat.
    await store.create_session(ORPHAN, SessionParams(), "token", "conn-orphan")
    await _read_one(redis, GONE_WORKER, ORPHAN)
    # A session handed to three workers that each failed: dead-lettered (limit 2).
    await store.create_session(FAILED, SessionParams(), "token", "conn-failed")
    failed_entry = await _read_one(redis, "w-f1", FAILED)
    for consumer in ("w-f2", "w-f3"):
        await redis.xclaim(keys.DISPATCH, keys.DISPATCH_GROUP, consumer, 0, [failed_entry])
    await store.record_failure(FAILED, "RuntimeError: final decode failed")
    [dead] = await Fleet(redis).dead_letter_failing(max_attempts=2, ttl_s=60)
    assert dead.session_id == FAILED
    # These wait for a worker (one in the high lane); one also waits for its client.
    await store.create_session(WAITING, SessionParams(), "token", "conn-waiting")
    await store.create_session(DETACHED, SessionParams(), "token", "conn-detached")
    assert await store.detach(DETACHED, "conn-detached", grace_s=60)
    await store.create_session(URGENT, SessionParams(priority="high"), "token", "conn-urgent")
    # A gateway that stopped heartbeating long ago, still listed with one session.
    await Fleet(redis).gateway_holds(DEAD_GATEWAY, WAITING)
    await redis.zadd(keys.GATEWAYS, {DEAD_GATEWAY: 1})

    # Write the worker's heartbeat now (the loop runs every heartbeat_s), so that its hash
    # holds the settled numbers: one session owned, no decode queued.
    await svc.worker._heartbeat_once()
    report = await collect(redis, Query(url=redis_url, alive_s=15.0, session_id=sid))
    assert report.ok and report.error is None

    server = report.sections["server"]
    assert isinstance(server, ServerInfo) and server.server.split()[0] in ("valkey", "redis")

    dispatch = report.sections["dispatch"]
    assert isinstance(dispatch, DispatchInfo)
    high, normal = dispatch.lanes
    assert (high.stream, normal.stream) == keys.DISPATCH_LANES
    assert (high.priority, normal.priority) == ("high", "normal")
    for lane, length, lag, pending in ((high, 1, 1, 0), (normal, 5, 2, 2)):
        group = _group(await redis.xinfo_groups(lane.stream))
        assert lane.length == await redis.xlen(lane.stream) == length
        assert lane.lag == group["lag"] == lag
        assert lane.pending == group["pending"] == pending
        assert lane.consumers == group["consumers"]
        assert lane.entries_read == group["entries-read"]
        assert lane.last_delivered_id == group["last-delivered-id"].decode()
        first_waiting = await redis.xrange(lane.stream, min=b"(" + group["last-delivered-id"])
        enqueued_ms = int(first_waiting[0][0].decode().partition("-")[0])
        assert lane.oldest_waiting_ms == max(0, report.now_ms - enqueued_ms)
    assert dispatch.waiting == 3 and dispatch.pending == 2

    workers = report.sections["workers"]
    assert isinstance(workers, WorkersInfo)
    rows = {row.worker_id: row for row in workers.rows}
    assert set(rows) == {wid, GONE_WORKER} and workers.alive == 1
    live, gone = rows[wid], rows[GONE_WORKER]
    info = await hgetall(redis, keys.worker_info(keys.WorkerId(wid)))
    assert live.alive and live.heartbeat_age_ms is not None
    assert (
        (live.slots, live.owned, live.queued_decodes)
        == (
            int(info[b"slots"]),
            int(info[b"owned"]),
            int(info[b"queued_decodes"]),
        )
        == (1, 1, 0)
    )
    assert live.engine_busy == float(info[b"engine_busy"])
    assert live.claiming == info[b"claiming"].decode() == "open"
    assert live.claim_spacing_s == float(info[b"claim_spacing_s"]) == 0.0  # not probing
    assert live.pending == 1 and gone.pending == 1
    assert not gone.alive and gone.heartbeat_age_ms is None and gone.engine_busy is None
    meta = await hgetall(redis, keys.meta(sid))
    received = int(meta[b"audio_bytes"]) / 32000
    committed = int(meta[b"ckpt_sample"]) / 16000
    assert live.max_uncommitted_s is not None
    assert abs(live.max_uncommitted_s - max(0.0, received - committed)) < 1e-9
    assert workers.pending_scanned == workers.pending_total == 2

    gateways = report.sections["gateways"]
    assert isinstance(gateways, GatewaysInfo)
    by_id = {row.gateway_id: row for row in gateways.rows}
    gid = svc.gateway.gateway_id
    assert set(by_id) == {gid, DEAD_GATEWAY} and gateways.alive == 1
    assert by_id[gid].alive and by_id[gid].sessions == 1
    members = await cast(Awaitable[set[bytes]], redis.smembers(keys.gateway_sessions(gid)))
    assert members == {sid.encode()}
    assert not by_id[DEAD_GATEWAY].alive and by_id[DEAD_GATEWAY].sessions == 1
    assert by_id[DEAD_GATEWAY].heartbeat_age_ms == report.now_ms - 1

    detached = report.sections["detached"]
    assert isinstance(detached, DetachedInfo)
    assert detached.total == 1 and [r.session_id for r in detached.rows] == [DETACHED]
    score = await redis.zscore(keys.DETACHED, DETACHED)
    assert score is not None and detached.rows[0].deadline_in_ms == int(score) - report.now_ms

    deadletter = report.sections["deadletter"]
    assert isinstance(deadletter, DeadLetterInfo)
    [(entry_id, fields)] = await redis.xrange(keys.DEADLETTER)
    assert deadletter.total == 1
    [row] = deadletter.rows
    assert (row.entry_id, row.session_id, row.dispatch_id, row.attempts) == (
        entry_id.decode(),
        FAILED,
        failed_entry.decode(),
        3,
    )
    assert row.reason == fields[b"reason"].decode()
    assert "last error: RuntimeError: final decode failed" in row.reason
    assert row.age_ms == max(0, report.now_ms - int(fields[b"at_ms"]))

    session = report.sections["session"]
    assert isinstance(session, SessionInfo) and session.exists
    assert session.meta["state"] == "open" and session.meta["finals"] == meta[b"finals"].decode()
    lease = await redis.get(keys.lease(sid))
    assert lease is not None
    assert f"{session.lease_holder}:{session.lease_epoch}" == lease.decode()
    assert session.lease_holder == wid and session.lease_epoch == int(meta[b"epoch"])
    assert session.lease_ttl_ms is not None and session.lease_ttl_ms > 0
    assert session.audio_entries == await redis.xlen(keys.audio(sid))
    assert session.results_entries == await redis.xlen(keys.results(sid)) == int(meta[b"finals"])
    assert session.ttl_s is None
    assert session.received_s == received and session.committed_s == committed
    assert session.meta["claimed_ms"] == meta[b"claimed_ms"].decode()
    assert session.meta["priority"] == "normal" and session.dispatch_lane == keys.DISPATCH
    [pending] = await redis.xpending_range(
        keys.DISPATCH, keys.DISPATCH_GROUP, meta[b"dispatch_id"], meta[b"dispatch_id"], 1
    )
    assert session.dispatch_consumer == pending["consumer"].decode() == wid
    assert session.dispatch_deliveries == pending["times_delivered"] == 1
    assert session.queue_position is None

    text = render(report)
    states = {
        line.split()[0]: line.split()[1]
        for line in text.splitlines()
        if line.startswith("  ") and line.split()[1] in ("alive", "GONE", "DEAD")
    }
    assert states == {wid: "alive", GONE_WORKER: "GONE", gid: "alive", DEAD_GATEWAY: "DEAD"}
    assert "dispatch  3 session(s) waiting for a worker, 2 claimed and not closed" in text
    await ws.close()

    # The others, one at a time: queue positions across lanes, and the failed session.
    async def session_of(other: SessionId) -> SessionInfo:
        one = await collect(redis, Query(url=redis_url, alive_s=15.0, session_id=other))
        info = one.sections["session"]
        assert isinstance(info, SessionInfo)
        return info

    urgent, waiting = await session_of(URGENT), await session_of(WAITING)
    assert urgent.dispatch_lane == keys.DISPATCH_HIGH and urgent.queue_position == 1
    # Its lane's 4th entry, 3 entries read there, and one high-priority session ahead.
    assert waiting.meta["dispatch_index"] == "4" and waiting.queue_position == 1 + 1
    assert waiting.dispatch_consumer is None
    failed = await session_of(FAILED)
    assert failed.meta["closed_reason"] == "failed" and failed.dispatch_consumer is None
    assert failed.meta["failure"] == row.reason
    assert failed.meta["last_error"] == "RuntimeError: final decode failed"
    assert failed.ttl_s is not None and failed.ttl_s > 0


async def test_unknown_session_and_command_exit_codes(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """The command prints the report and exits 0; an unknown session exits 1; an empty
    Redis (no worker ever started) is reported, not an error."""
    out = io.StringIO()
    args = ["status", "--redis-url", redis_url, "--json"]
    assert await asyncio.to_thread(run_status, build_parser().parse_args(args), out) == 0
    data = json.loads(out.getvalue())
    assert [lane["group_exists"] for lane in data["dispatch"]["lanes"]] == [False, False]
    assert [lane["length"] for lane in data["dispatch"]["lanes"]] == [0, 0]
    assert data["dispatch"]["waiting"] == 0 and data["dispatch"]["pending"] == 0
    assert data["workers"]["rows"] == [] and data["detached"]["total"] == 0
    assert data["gateways"]["rows"] == [] and data["deadletter"]["total"] == 0

    missing = "f" * 32
    out = io.StringIO()
    parsed = build_parser().parse_args([*args[:-1], "--session", missing])
    assert await asyncio.to_thread(run_status, parsed, out) == 1
    assert "unknown or expired" in out.getvalue()


async def test_unreachable_redis_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """No Redis at the URL: the report says so, and the exit status is 1."""
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = await asyncio.to_thread(main, ["status", "--redis-url", f"redis://127.0.0.1:{port}/0"])
    assert code == 1
    assert (
        f"redis     UNREACHABLE: Error 111 connecting to 127.0.0.1:{port}"
        in capsys.readouterr().out
    )
