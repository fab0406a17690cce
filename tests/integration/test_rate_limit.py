"""max_audio_rate: a connection sending audio faster than allowed gets `rate_limited` and
4429; what it sent before was stored and acknowledged, and the session resumes."""

from __future__ import annotations

import json
import time

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.conftest import ServiceFactory
from tests.helpers import drain, open_ws, started

FRAME = b"\x00\x00" * 1600  # 100 ms at 16 kHz


async def test_audio_faster_than_the_limit_closes_4429(service_factory: ServiceFactory) -> None:
    svc = await service_factory(max_audio_rate=1.0, audio_burst_s=1.0)
    ws = await open_ws(svc.url)
    first = await started(ws)
    t0 = time.monotonic()
    sent = 0
    try:
        for _ in range(100):  # 10 s of audio as fast as the socket takes it
            await ws.send(FRAME)
            sent += 1
    except ConnectionClosed:
        pass
    out = await drain(ws)
    elapsed = time.monotonic() - t0
    assert out.code == 4429, (out.code, out.reason)
    errors = out.of_type("error")
    assert errors and errors[-1]["code"] == "rate_limited"
    assert "max_audio_rate" in errors[-1]["message"]
    acked = max((m["seq"] for m in out.of_type("ack")), default=-1) + 1
    # At most the burst plus what real time allowed meanwhile was taken, and not all of
    # the 10 s (the socket took frames far faster than real time).
    assert acked * 0.1 <= 1.0 + 1.0 * elapsed + 1e-9
    assert acked < 100
    # Nothing stored is lost: the session resumes at (or after) the last acknowledged frame.
    sid = first["session_id"]
    ws2 = await open_ws(svc.url, f"session_id={sid}")
    resume = {"session_id": sid, "resume_token": first["resume_token"], "last_result_id": -1}
    await ws2.send(json.dumps({"type": "resume", **resume}))
    reply = json.loads(await ws2.recv())
    assert reply["type"] == "session.resumed"
    # Every frame taken before the one over the limit was stored and acknowledged
    # before the error: the last ack is exactly where the session resumes.
    assert reply["next_seq"] == acked <= sent
    await ws2.close()


async def test_no_limit_by_default(service_factory: ServiceFactory) -> None:
    """The default (0) takes audio as fast as it comes: 10 s in one burst, all acked."""
    svc = await service_factory()
    ws = await open_ws(svc.url)
    await started(ws)
    for _ in range(100):
        await ws.send(FRAME)
    await ws.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws)
    assert out.code == 1000
    assert max(m["seq"] for m in out.of_type("ack")) == 99


async def _send_acked(ws: ClientConnection, frames: int) -> tuple[int, str | None]:
    """Send frames one at a time, each after the previous one's ack; (frames acked, the
    error code that stopped it or None)."""
    acked = 0
    for _ in range(frames):
        await ws.send(FRAME)
        while True:
            msg = json.loads(await ws.recv())
            if msg["type"] == "ack":
                acked += 1
                break
            if msg["type"] == "error":
                return acked, str(msg["code"])
    return acked, None


async def test_resuming_does_not_refill_the_burst(service_factory: ServiceFactory) -> None:
    """A session that used its burst and resumes at once gets what it has left (burst +
    rate * age - stored), not a new burst: reconnecting does not reset the limit."""
    svc = await service_factory(max_audio_rate=1.0, audio_burst_s=3.0)
    t0 = time.monotonic()  # before the session exists: its age is at most time since t0
    ws = await open_ws(svc.url)
    first = await started(ws)
    assert await _send_acked(ws, 30) == (30, None)  # the whole 3 s burst, stored
    await ws.close()  # dropped without close_stream: the session waits to be resumed
    sid = first["session_id"]
    ws2 = await open_ws(svc.url, f"session_id={sid}")
    resume = {"session_id": sid, "resume_token": first["resume_token"], "last_result_id": -1}
    await ws2.send(json.dumps({"type": "resume", **resume}))
    reply = json.loads(await ws2.recv())
    assert reply == {"type": "session.resumed", "session_id": sid, "next_seq": 30}
    acked, error = await _send_acked(ws2, 100)
    age = time.monotonic() - t0
    await drain(ws2)
    assert error == "rate_limited"
    # All it had left was what real time gave it since t0. Without the session's own
    # count the new connection took a whole new burst: 30 frames.
    assert acked * 0.1 <= 1.0 * age + 1e-9, (acked, age)
