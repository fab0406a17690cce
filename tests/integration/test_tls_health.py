"""TLS set up once; health, readiness and metrics over plain HTTP on the same port."""

from __future__ import annotations

import asyncio
import re
import ssl
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServiceFactory
from tests.helpers import await_ack, drain, indexed_frame, open_ws, started

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


async def test_tls_context_is_created_once(
    service_factory: ServiceFactory, client_ssl: ssl.SSLContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many clients connect, the gateway builds exactly one SSLContext (at start-up)."""
    created: list[Any] = []
    original_new = ssl.SSLContext.__new__

    def counting_new(cls: type[ssl.SSLContext], *args: Any, **kwargs: Any) -> ssl.SSLContext:
        created.append(cls)
        return original_new(cls, *args, **kwargs)

    monkeypatch.setattr(ssl.SSLContext, "__new__", counting_new)
    svc = await service_factory(tls=True)
    assert len(created) == 1, "the gateway builds its context at start-up"
    sockets = [await open_ws(svc.url, ssl_ctx=client_ssl) for _ in range(8)]
    for ws in sockets:
        await started(ws)
    assert len(created) == 1, "no context is built per connection"
    for ws in sockets:
        await ws.close()


def _get(url: str, ctx: ssl.SSLContext | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


async def test_healthz_and_readyz_with_a_worker(
    service_factory: ServiceFactory, client_ssl: ssl.SSLContext
) -> None:
    """/healthz is 200; /readyz is 200 when Redis answers and a worker is alive."""
    svc = await service_factory(tls=True)
    base = svc.url.replace("wss://", "https://").removesuffix("/v1/listen")
    assert await asyncio.to_thread(_get, base + "/healthz", client_ssl) == (200, "ok\n")
    status, body = await asyncio.to_thread(_get, base + "/readyz", client_ssl)
    assert status == 200 and "1 worker" in body
    status, body = await asyncio.to_thread(_get, base + "/nope", client_ssl)
    assert status == 404


async def test_readyz_is_503_without_workers(service_factory: ServiceFactory) -> None:
    """No worker alive: /readyz answers 503 and says why."""
    svc = await service_factory(with_worker=False)
    base = svc.url.replace("ws://", "http://").removesuffix("/v1/listen")
    status, body = await asyncio.to_thread(_get, base + "/readyz")
    assert status == 503 and "no worker" in body


async def test_metrics_count_sessions_and_errors(service_factory: ServiceFactory) -> None:
    """/metrics exposes counters in Prometheus text format."""
    svc = await service_factory()
    ws = await open_ws(svc.url)
    await started(ws)
    await ws.send("nope")
    await drain(ws)
    base = svc.url.replace("ws://", "http://").removesuffix("/v1/listen")
    status, body = await asyncio.to_thread(_get, base + "/metrics")
    assert status == 200
    assert "streamscribe_gateway_sessions_started_total 1" in body
    assert 'streamscribe_gateway_errors_total{code="protocol_violation"} 1' in body
    assert "streamscribe_gateway_relay_subscribed 1" in body
    assert "streamscribe_gateway_relay_reconnects 0" in body


async def test_every_metric_the_gateway_exposes_is_documented(
    service_factory: ServiceFactory,
) -> None:
    """After a session with audio, a finalize and a protocol error, each metric name in
    /metrics (labels included) is a row of docs/architecture.md's metrics table."""
    svc = await service_factory()
    ws = await open_ws(svc.url)
    await started(ws)
    for seq in range(3):
        await ws.send(indexed_frame(seq))
    await await_ack(ws, 2)
    await ws.send("nope")
    await drain(ws)
    base = svc.url.replace("ws://", "http://").removesuffix("/v1/listen")
    status, body = await asyncio.to_thread(_get, base + "/metrics")
    assert status == 200
    names = {
        line.split(" ", 1)[0].removeprefix("streamscribe_gateway_")
        for line in body.splitlines()
        if line and not line.startswith("#")
    }
    assert "audio_frames_total" in names and len(names) >= 10, names
    text = ARCHITECTURE.read_text()
    section = text[text.index("### Gateway metrics") :]
    section = section[: section.index("\n## ")]
    rows = re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE)
    documented = {row.split("{", 1)[0] for row in rows}  # a row stands for all its labels
    assert {"ingest_pipeline_seconds_count", "results_pipeline_seconds_count"} <= names
    figures = {
        line.split(" ", 1)[0].removeprefix("streamscribe_gateway_"): float(line.split(" ")[1])
        for line in body.splitlines()
        if line and not line.startswith("#")
    }
    # One wait per ack sent: one per stored batch of audio, by either path.
    writes = sum(v for k, v in figures.items() if k.startswith("audio_writes_total"))
    assert figures["ack_seconds_count"] == writes >= 1
    assert figures['ack_seconds_bucket{le="+Inf"}'] == writes

    def row_of(name: str) -> str:  # a histogram's row stands for its _bucket, _sum, _count
        base = name.split("{", 1)[0]
        for suffix in ("_bucket", "_sum", "_count"):
            if base.endswith(suffix) and base.removesuffix(suffix) in documented:
                return base.removesuffix(suffix)
        return base

    missing = {name for name in names if row_of(name) not in documented}
    assert not missing, f"metrics missing from docs/architecture.md: {sorted(missing)}"


async def test_gateway_gives_memory_back_after_connections_fall(
    service_factory: ServiceFactory, client_ssl: ssl.SSLContext
) -> None:
    """With heap_trim_drop 3, four TLS sessions that end are a fall of four from a peak
    of four: the next heartbeat hands the freed memory back (glibc malloc_trim), counted
    in /metrics; while they are open, nothing is trimmed."""
    from gateway.memory import trim_supported

    if not trim_supported():
        pytest.skip("malloc_trim needs glibc")
    svc = await service_factory(tls=True, heap_trim_drop=3)
    sockets = [await open_ws(svc.url, ssl_ctx=client_ssl) for _ in range(4)]
    for ws in sockets:
        await started(ws)
    assert svc.gateway.heap_trim.peak == 4
    assert svc.gateway.heap_trims == 0
    for ws in sockets:
        await ws.close()
    deadline = asyncio.get_running_loop().time() + 30
    while svc.gateway.heap_trims == 0:  # the heartbeat (0.5 s here) trims
        assert asyncio.get_running_loop().time() < deadline, "no trim after the fall"
        await asyncio.sleep(0.05)
    assert svc.gateway.heap_trims == 1 and svc.gateway.heap_trim.peak == 0
    last = svc.gateway.last_trim
    assert last is not None and (last.peak, last.open_now) == (4, 0)
    assert last.rss_before_mib is not None and last.rss_after_mib is not None
    base = svc.url.replace("wss://", "https://").removesuffix("/v1/listen")
    status, body = await asyncio.to_thread(_get, base + "/metrics", client_ssl)
    assert status == 200 and "streamscribe_gateway_heap_trims_total 1" in body
    assert "| `heap_trims_total` |" in ARCHITECTURE.read_text()
