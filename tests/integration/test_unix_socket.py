"""`redis_url` may name a Unix socket (unix://): the gateway, the worker and its
maintenance jobs all connect through it. A co-located Valkey needs no TCP port."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.server import Gateway
from shared import keys
from shared.embedded import EmbeddedValkey
from shared.keys import SessionId
from shared.store import connect
from tests.conftest import make_config
from tests.helpers import fixture, stream_session
from worker.engine import NullEngine
from worker.service import Worker


@pytest.fixture
def unix_valkey() -> Iterator[EmbeddedValkey]:
    # A short directory of its own: a Unix socket path has a limit of about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="ss-") as tmp:
        server = EmbeddedValkey(Path(tmp), unixsocket=Path(tmp) / "valkey.sock")
        server.start()
        try:
            yield server
        finally:
            server.stop()


async def test_a_session_runs_over_a_unix_socket(unix_valkey: EmbeddedValkey) -> None:
    url = unix_valkey.url
    assert url.startswith("unix://")
    config = make_config(url, vad="energy")
    worker = Worker(config, engine=NullEngine())
    await worker.start()
    gateway = Gateway(config)
    await gateway.start()
    try:
        out = await stream_session(gateway.url, fixture("s1.wav"))
    finally:
        await gateway.shutdown()
        await worker.shutdown()
    assert out.code == 1000
    assert out.messages[-1]["type"] == "session.closed"
    assert out.messages[-1]["final_results"] == len(out.finals) >= 1
    # The service was given only the socket: its keys are in that server.
    client = connect(url)
    try:
        assert len(await client.keys(keys.meta(SessionId("*")))) == 1
    finally:
        await client.aclose()
