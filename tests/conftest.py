"""Shared fixtures: a real Valkey (embedded) or the Redis at $REDIS_URL, flushed per test;
a real TLS certificate; in-process gateways and workers on 127.0.0.1:0."""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import settings

from gateway.server import Gateway
from shared.config import Config
from shared.devcert import ensure_dev_cert
from shared.embedded import EmbeddedValkey
from worker.engine import Engine, NullEngine
from worker.service import Worker

FIXTURES = Path(__file__).parent / "fixtures" / "audio"

# Property tests (hypothesis) draw the same examples on every run by default, so a CI run
# cannot fail on a draw the one before did not make; HYPOTHESIS_PROFILE=explore draws new
# ones, 20 times as many, to look for what the fixed ones miss.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=300)
settings.register_profile("explore", deadline=None, max_examples=6000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """The event loops a test runs on: the standard one, and for a test marked `uvloop`
    uvloop's too, the loop `streamscribe gateway` and `worker` run on (shared/cli.py).
    Their transports differ where the gateway depends on them: uvloop reads into a
    protocol's own buffer only for a protocol that is not an `asyncio.Protocol`."""
    loops: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
    if item.get_closest_marker("uvloop") is not None:
        try:
            import uvloop
        except ImportError:  # not installed where it is not a dependency (Windows)
            return loops
        loops["uvloop"] = uvloop.new_event_loop
    return loops


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis-protocol server for the whole test session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def dev_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return ensure_dev_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session")
def client_ssl(dev_cert: tuple[Path, Path]) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(dev_cert[0]))


def make_config(redis_url: str, **overrides: Any) -> Config:
    base: dict[str, Any] = {
        "redis_url": redis_url,
        "host": "127.0.0.1",
        "port": 0,
        "certfile": "none",
        "heartbeat_s": 0.5,
        "lease_s": 3.0,
        "reconcile_interval_s": 0.5,
        "read_block_ms": 50,
        "maintenance_interval_s": 1,
        "takeover_interval_s": 0.25,
        # A fixed number: the tests' engines are not measured (slots auto has its own tests).
        "slots": 8,
        # No claim gate: on a slow machine the model's decodes could hold back a test's
        # sessions for seconds (the gate has its own tests, test_claim_gate.py).
        "claim_max_final_wait_s": 0.0,
    }
    base.update(overrides)
    return Config(**base)


class Service:
    """A gateway and a worker running in the test's event loop."""

    def __init__(self, gateway: Gateway, worker: Worker | None) -> None:
        self.gateway = gateway
        self.worker = worker

    @property
    def url(self) -> str:
        return self.gateway.url


ServiceFactory = Callable[..., Awaitable[Service]]


@pytest.fixture
async def service_factory(
    redis: aioredis.Redis, redis_url: str, dev_cert: tuple[Path, Path]
) -> AsyncIterator[ServiceFactory]:
    started: list[Service] = []

    async def start(
        *,
        engine: Engine | None = None,
        with_worker: bool = True,
        tls: bool = False,
        **overrides: Any,
    ) -> Service:
        if tls:
            overrides.setdefault("certfile", str(dev_cert[0]))
            overrides.setdefault("keyfile", str(dev_cert[1]))
        config = make_config(redis_url, **overrides)
        worker = None
        if with_worker:
            worker = Worker(config, engine=engine or NullEngine())
            await worker.start()
        gateway = Gateway(config)
        await gateway.start()
        service = Service(gateway, worker)
        started.append(service)
        return service

    yield start
    for service in started:
        await service.gateway.shutdown()
        if service.worker is not None:
            await service.worker.shutdown()
