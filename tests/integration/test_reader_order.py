"""The gateway takes most audio frames in the protocol callback and everything else
through its reader task (gateway/wsconn.py): audio and text must still be stored in the
order the client sent them, also while back-pressure sends frames the slow way."""

from __future__ import annotations

import json

import pytest
import redis.asyncio as aioredis

from gateway.wsconn import GatewayServerConnection
from tests.conftest import ServiceFactory
from tests.helpers import (
    await_ack,
    gateway_connections,
    indexed_frame,
    open_ws,
    started,
    stored_order,
)

frame = indexed_frame


@pytest.mark.parametrize("pending", [1, 4, 256])
async def test_audio_and_text_are_stored_in_the_order_sent(
    service_factory: ServiceFactory, redis: aioredis.Redis, pending: int
) -> None:
    # No worker: the stream keeps every entry. A small pending queue: back-pressure often,
    # and the reader often waits for room with a finalize while frames keep arriving.
    svc = await service_factory(with_worker=False, max_pending_frames=pending)
    ws = await open_ws(svc.url)
    sid = (await started(ws))["session_id"]
    sent: list[object] = []
    seq = 0
    for run in [10, 1, 5, 2, 10, 3] * 4:
        for _ in range(run):  # one burst, no waiting for acks
            await ws.send(frame(seq))
            sent.append(seq)
            seq += 1
        await ws.send(json.dumps({"type": "finalize"}))
        sent.append("finalize")
    await ws.send(frame(seq))  # the last finalize's mark is stored before this frame's ack
    sent.append(seq)
    seq += 1
    await await_ack(ws, seq - 1)
    stored = await stored_order(redis, sid)
    assert stored == sent
    # Both ways were taken: frames in the protocol callback, and frames (and the text)
    # through the reader task while the small queue was full.
    [conn] = gateway_connections(svc)
    assert isinstance(conn, GatewayServerConnection)
    assert conn.direct > 0, conn.direct
    if pending < 256:
        assert conn.received > 24, conn.received  # the 24 finalizes, and frames
    # The writer too: audio stored from callbacks while its task was parked, and by the
    # task once a finalize woke it (audio queued behind the finalize included).
    counters = svc.gateway.metrics.counters
    assert counters['audio_writes_total{path="callback"}'] > 0
    assert counters['audio_writes_total{path="task"}'] > 0
    await ws.close()
