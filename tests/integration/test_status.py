"""`streamscribe status` against a real Valkey with a real gateway and worker: every number
it reports is the one Redis holds."""

from __future__ import annotations

import asyncio
import io
import json
import socket

import pytest
import redis.asyncio as aioredis

from shared import keys
from shared.cli import build_parser, main
from shared.keys import SessionId
from shared.protocol import SessionParams
from shared.status import (
    DetachedInfo,
    DispatchInfo,
    Query,
    ServerInfo,
    SessionInfo,
    WorkersInfo,
    collect,
    render,
    run_status,
)
from shared.store import Store
from tests.conftest import ServiceFactory
from tests.helpers import fixture, open_ws, started

ORPHAN = SessionId("0a" * 16)
WAITING = SessionId("0b" * 16)
DETACHED = SessionId("0c" * 16)
GONE_WORKER = "gone-worker-1"


async def test_status_numbers_match_redis(
    service_factory: ServiceFactory, redis: aioredis.Redis, redis_url: str
) -> None:
    """A fleet with one owned session, an orphan of a stopped worker, sessions waiting for a
    worker and one waiting for its client: status reports exactly what Redis holds."""
    store = Store(redis)
    svc = await service_factory(slots=1)
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
    claimed = await redis.xreadgroup(
        keys.DISPATCH_GROUP, GONE_WORKER, {keys.DISPATCH: ">"}, count=1
    )
    assert claimed[0][1][0][1][b"sid"] == ORPHAN.encode()
    # These two wait for a worker; one also waits for its client.
    await store.create_session(WAITING, SessionParams(), "token", "conn-waiting")
    await store.create_session(DETACHED, SessionParams(), "token", "conn-detached")
    assert await store.detach(DETACHED, "conn-detached", grace_s=60)

    # Write the worker's heartbeat now (the loop runs every heartbeat_s), so that its hash
    # holds the settled numbers: one session owned, no decode queued.
    await svc.worker._heartbeat_once()
    report = await collect(redis, Query(url=redis_url, alive_s=15.0, session_id=sid))
    assert report.ok and report.error is None

    server = report.sections["server"]
    assert isinstance(server, ServerInfo) and server.server.split()[0] in ("valkey", "redis")

    dispatch = report.sections["dispatch"]
    assert isinstance(dispatch, DispatchInfo)
    (group,) = await redis.xinfo_groups(keys.DISPATCH)
    assert dispatch.length == await redis.xlen(keys.DISPATCH) == 4
    assert dispatch.lag == group["lag"] == 2
    assert dispatch.pending == group["pending"] == 2
    assert dispatch.consumers == group["consumers"] == 2

    workers = report.sections["workers"]
    assert isinstance(workers, WorkersInfo)
    rows = {row.worker_id: row for row in workers.rows}
    assert set(rows) == {wid, GONE_WORKER} and workers.alive == 1
    live, gone = rows[wid], rows[GONE_WORKER]
    info = await redis.hgetall(keys.worker_info(keys.WorkerId(wid)))
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
    assert live.pending == 1 and gone.pending == 1
    assert not gone.alive and gone.heartbeat_age_ms is None
    meta = await redis.hgetall(keys.meta(sid))
    received = int(meta[b"audio_bytes"]) / 32000
    committed = int(meta[b"ckpt_sample"]) / 16000
    assert live.max_uncommitted_s is not None
    assert abs(live.max_uncommitted_s - max(0.0, received - committed)) < 1e-9
    assert workers.pending_scanned == workers.pending_total == 2

    detached = report.sections["detached"]
    assert isinstance(detached, DetachedInfo)
    assert detached.total == 1 and [r.session_id for r in detached.rows] == [DETACHED]
    score = await redis.zscore(keys.DETACHED, DETACHED)
    assert score is not None and detached.rows[0].deadline_in_ms == int(score) - report.now_ms

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

    text = render(report)
    states = {
        line.split()[0]: line.split()[1]
        for line in text.splitlines()
        if "  GONE" in line or "  alive" in line
    }
    assert states == {wid: "alive", GONE_WORKER: "GONE"}
    assert "waiting for a worker (lag): 2" in text
    await ws.close()


async def test_unknown_session_and_command_exit_codes(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """The command prints the report and exits 0; an unknown session exits 1; an empty
    Redis (no worker ever started) is reported, not an error."""
    out = io.StringIO()
    args = ["status", "--redis-url", redis_url, "--json"]
    assert await asyncio.to_thread(run_status, build_parser().parse_args(args), out) == 0
    data = json.loads(out.getvalue())
    assert data["dispatch"]["group_exists"] is False and data["dispatch"]["length"] == 0
    assert data["workers"]["rows"] == [] and data["detached"]["total"] == 0

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
