"""`slots` auto against a real Valkey, gateway and WebSockets: the worker measures its engine
at start-up, advertises the slots it found in its heartbeat, and claims no more sessions
than that; the next one waits in the queue.

The engine is the null engine, which decodes the shipped clips at once; with
`auto_slots_factor` 1e6 any measured rate above 3e-6 audio seconds per second gives the
`auto_slots_max` of 3, so the slot count does not depend on the machine's speed."""

from __future__ import annotations

import logging

import pytest
import redis.asyncio as aioredis

from shared import keys
from shared.keys import WorkerId
from tests.conftest import ServiceFactory
from tests.helpers import hgetall, open_ws, started
from tests.integration.test_admission import epoch, finish, next_of, occupy


async def test_auto_slots_are_measured_advertised_and_honoured(
    service_factory: ServiceFactory, redis: aioredis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker.service")
    svc = await service_factory(
        slots=0, auto_slots_factor=1e6, auto_slots_max=3, queue_update_s=0.1
    )
    worker = svc.worker
    assert worker is not None and worker.slots == 3
    assert worker.calibration is not None and worker.calibration.rate > 0
    assert worker.calibration.words > 0  # the null engine "hears" a word a second
    info = await hgetall(redis, keys.worker_info(WorkerId(worker.worker_id)))
    assert int(info[b"slots"]) == 3
    assert float(info[b"slots_auto_rate"]) > 0
    assert any("-> 3 slots" in r.getMessage() for r in caplog.records)
    assert any("capped at auto_slots_max 3" in r.getMessage() for r in caplog.records)

    running = [await occupy(svc.url, redis) for _ in range(3)]
    ws = await open_ws(svc.url)
    sid = (await started(ws))["session_id"]
    assert (await next_of(ws, "queued"))["position"] == 1
    assert await epoch(redis, sid) == 0, "a fourth session must wait for a slot"
    assert (await finish(running[0][0])).code == 1000
    out = await finish(ws)
    assert out.code == 1000
    assert await epoch(redis, sid) >= 1
    for other, _ in running[1:]:
        assert (await finish(other)).code == 1000


async def test_fixed_slots_skip_the_measurement(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    svc = await service_factory(slots=2)
    assert svc.worker is not None and svc.worker.slots == 2
    assert svc.worker.calibration is None
    info = await hgetall(redis, keys.worker_info(WorkerId(svc.worker.worker_id)))
    assert int(info[b"slots"]) == 2 and info[b"slots_auto_rate"] == b""
