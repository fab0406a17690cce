"""`redis_max_connections`: a process's Redis pool opens at most that many connections,
and a command that finds them all busy waits for one (`redis_pool_wait_s`), then fails
as an unreachable Redis would (shared/store.py `connect`; docs/redis-layout.md)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable
from typing import cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from shared.config import MIN_REDIS_CONNECTIONS, Config
from shared.errors import ConfigError
from shared.store import connect
from tests.conftest import ServiceFactory, make_config
from tests.helpers import fixture, stream_session
from tests.integration.test_takeover import until
from worker.service import Worker


def blpop(client: aioredis.Redis, key: str) -> Awaitable[tuple[bytes, bytes]]:
    """`BLPOP key 0`: redis-py types it `list`, but returns a (key, value) tuple (and
    never None without a timeout)."""
    return cast(Awaitable[tuple[bytes, bytes]], client.blpop([key], timeout=0))


async def named(redis: aioredis.Redis, name: str, cmd: str | None = None) -> int:
    """Connections named `name` (running `cmd`, if given) in `CLIENT LIST`."""
    clients = await redis.client_list()
    return sum(1 for c in clients if c.get("name") == name and (cmd is None or c.get("cmd") == cmd))


@pytest.mark.parametrize("limit", [2, 0], ids=["at most 2", "no limit"])
async def test_commands_beyond_the_limit_wait_for_a_connection(
    redis: aioredis.Redis, redis_url: str, limit: int
) -> None:
    """Four blocking reads at once: with a limit of 2 only two connections open, the
    other reads wait and run on those two once the first ones return; without a limit
    each read opens its own."""
    name = f"ss-test:{secrets.token_hex(4)}"
    client = connect(redis_url, name, max_connections=limit, pool_wait_s=30)
    lists = [f"ss-test:{name}:l{i}" for i in range(4)]
    try:
        reads = [asyncio.ensure_future(blpop(client, key)) for key in lists]
        first = 2 if limit else 4
        await until(lambda: _at_least(redis, name, first), f"{first} blocking reads")
        assert await named(redis, name) == first
        await cast(Awaitable[int], redis.rpush(lists[0], b"a"))
        await cast(Awaitable[int], redis.rpush(lists[1], b"b"))
        if limit:
            # The two that waited now block on the same two connections.
            await until(lambda: _at_least(redis, name, 2), "the waiting reads to block")
            assert await named(redis, name) == 2
        await cast(Awaitable[int], redis.rpush(lists[2], b"c"))
        await cast(Awaitable[int], redis.rpush(lists[3], b"d"))
        got = await asyncio.wait_for(asyncio.gather(*reads), 30)
        assert [value for _key, value in got] == [b"a", b"b", b"c", b"d"]
        assert await named(redis, name) == (2 if limit else 4)
    finally:
        await client.aclose()
        await redis.delete(*lists)


async def _at_least(redis: aioredis.Redis, name: str, count: int) -> bool:
    return await named(redis, name, "blpop") >= count


async def test_a_command_that_waits_too_long_fails_as_if_redis_were_down(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """With its only connection held by a blocking read, a command waits
    `pool_wait_s` and fails with redis-py's ConnectionError (which the gateway and
    worker treat as an outage); once the connection is free, it works."""
    name = f"ss-test:{secrets.token_hex(4)}"
    client = connect(redis_url, name, max_connections=1, pool_wait_s=0.2)
    key = f"ss-test:{name}:l"
    try:
        read = asyncio.ensure_future(blpop(client, key))
        await until(lambda: _at_least(redis, name, 1), "the blocking read")
        with pytest.raises(RedisConnectionError, match="No connection available"):
            await client.ping()
        await cast(Awaitable[int], redis.rpush(key, b"x"))
        assert await asyncio.wait_for(read, 30) == (key.encode(), b"x")
        assert await client.ping()
    finally:
        await client.aclose()
        await redis.delete(key)


async def test_a_service_at_the_smallest_limit_serves_sessions(
    service_factory: ServiceFactory,
) -> None:
    """Gateway and worker with `redis_max_connections` at its minimum serve two sessions
    at once, start to finish, the worker's maintenance job taking 4 of its 16 and its file
    jobs 2 (none for either when off); a limit under the minimum (other than 0) is
    refused, naming the flag, as is a wait that is not positive."""
    svc = await service_factory(redis_max_connections=MIN_REDIS_CONNECTIONS)
    audio = fixture("s1.wav")
    outs = await asyncio.wait_for(
        asyncio.gather(*(stream_session(svc.url, audio) for _ in range(2))), 120
    )
    for out in outs:
        assert out.code == 1000, (out.code, out.reason)
        assert out.of_type("session.closed")
    # The worker's maintenance job and file jobs share the limit: 4 and 2 of the 16.
    assert svc.worker is not None
    assert svc.worker.redis.connection_pool.max_connections == MIN_REDIS_CONNECTIONS - 6
    assert svc.worker.maintenance is not None
    assert svc.worker.maintenance.max_connections == 4
    assert svc.worker.filejobs is not None
    assert svc.worker.filejobs.max_connections == 2
    for maintenance, file_jobs, split in (
        ("on", "on", (10, 4, 2)),
        ("on", "off", (12, 4, 0)),
        ("off", "on", (14, 0, 2)),
        ("off", "off", (MIN_REDIS_CONNECTIONS, 0, 0)),
    ):
        alone = Worker(
            make_config(
                svc.worker.config.require_redis_url(),
                maintenance=maintenance,
                file_jobs=file_jobs,
                redis_max_connections=MIN_REDIS_CONNECTIONS,
            )
        )
        assert alone.redis_connections() == split
        await alone.redis.aclose()
    for bad in (1, MIN_REDIS_CONNECTIONS - 1, -1):
        with pytest.raises(ConfigError) as info:
            Config(redis_max_connections=bad)
        assert "--redis-max-connections" in str(info.value)
    Config(redis_max_connections=0)
    for wait in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError) as info:
            Config(redis_pool_wait_s=wait)
        assert "--redis-pool-wait-s" in str(info.value)
