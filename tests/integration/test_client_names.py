"""Every Redis connection of a gateway and a worker carries its process's client name, so
`CLIENT LIST` tells whose each one is (docs/redis-layout.md, *Client connections*)."""

from __future__ import annotations

import redis.asyncio as aioredis

from tests.conftest import ServiceFactory
from tests.helpers import drain, fixture, open_ws, started
from tests.integration.test_takeover import until


async def test_gateway_and_worker_connections_carry_their_names(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    svc = await service_factory()
    assert svc.worker is not None
    ws = await open_ws(svc.url)
    await started(ws)
    for frame in fixture("s1.wav").frames(100)[:20]:
        await ws.send(frame)
    await ws.send('{"type": "close_stream"}')
    assert (await drain(ws)).code == 1000  # a session went through both processes
    clients = await redis.client_list()
    names = [c["name"] for c in clients]
    gateway = f"ss-gateway:{svc.gateway.gateway_id}"
    worker = f"ss-worker:{svc.worker.worker_id}"
    # The pub/sub connection, the audio path's kept connection, and the pool's others.
    assert names.count(gateway) >= 2
    assert names.count(worker) >= 2
    # The worker's maintenance job and file jobs (arq) have pools of their own, named too.
    maintenance = f"ss-maintenance:{svc.worker.worker_id}"
    await until(lambda: _named(redis, maintenance), "the maintenance pool to connect")
    filejobs = f"ss-filejobs:{svc.worker.worker_id}"
    await until(lambda: _named(redis, filejobs), "the file jobs' pool to connect")
    # Only the test's own client is unnamed.
    others = {n for n in names if n not in (gateway, worker, maintenance, filejobs)}
    assert others <= {""}, others


async def _named(redis: aioredis.Redis, name: str) -> bool:
    return any(c["name"] == name for c in await redis.client_list())
