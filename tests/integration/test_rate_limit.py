"""max_audio_rate: a connection sending audio faster than allowed gets `rate_limited` and
4429; what it sent before was stored and acknowledged, and the session resumes."""

from __future__ import annotations

import json
import time

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
    assert acked <= reply["next_seq"] <= sent
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
