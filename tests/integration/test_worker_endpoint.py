"""The worker's HTTP endpoint (`worker_metrics`, worker/endpoint.py) on real loopback TCP:
/metrics shows the heartbeat's figures and the latency histograms in Prometheus text,
/healthz answers without Redis, and anything else gets a clear status."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from shared import keys
from shared.cli import worker_metrics_of
from shared.config import Config, host_port
from shared.errors import ConfigError
from shared.metrics import Histogram
from tests.conftest import ServiceFactory, make_config
from tests.helpers import fixture, hgetall, stream_session
from tests.integration.test_takeover import until
from worker.endpoint import COUNTERS, MAX_CLIENTS, MAX_HEAD_BYTES, Endpoint, render
from worker.engine import NullEngine
from worker.service import Worker

DOCS = Path(__file__).resolve().parents[2] / "docs"
LAYOUT = DOCS / "redis-layout.md"
ARCHITECTURE = DOCS / "architecture.md"
HISTOGRAM_SAMPLES = ("_bucket", "_sum", "_count")

LABEL = r'[a-z_]+="(?:[^"\\]|\\.)*"'
SAMPLE = re.compile(rf"^(streamscribe_worker_[a-z_]+)(\{{{LABEL}(?:,{LABEL})*\}})? (\S+)$")


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], str]:
    """Send `raw` to 127.0.0.1:`port`; the status, headers and body of the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 30)  # the server closes after one
    finally:
        writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body.decode()


def heartbeat_fields() -> set[str]:
    """The fields docs/redis-layout.md names for the worker's heartbeat hash."""
    text = LAYOUT.read_text()
    section = text[text.index("### `ss:worker:<worker_id>` (hash)") :]
    section = section[: section.index("```")]
    return set(re.findall(r"`([a-z_]+)`", section))


def documented_histograms() -> set[str]:
    """The histograms docs/architecture.md's *Worker metrics* section has a row for."""
    text = ARCHITECTURE.read_text()
    section = text[text.index("### Worker metrics") :]
    section = section[: section.index("\n## ")]
    rows = re.findall(r"^\| `([a-z_]+)(?:\{[^`]*\})?` \| histogram \|", section, re.MULTILINE)
    return set(rows)


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: w\r\n\r\n".encode()


def types(text: str) -> dict[str, str]:
    """Each metric's type, from its `# TYPE` line."""
    return {
        name: kind for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE)
    }


def samples(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text body by name (and labels); each line must parse,
    and each metric has one `# TYPE` line, before its samples (a histogram's are its
    `_bucket`, `_sum` and `_count`)."""
    out: dict[str, float] = {}
    typed: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("counter", "gauge", "histogram"), line
            assert name not in (n for n, _ in typed), f"a second # TYPE: {line!r}"
            typed.append((name, kind))
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample: {line!r}"
        assert typed, f"no # TYPE before {line!r}"
        name, kind = typed[-1]
        names = [name + s for s in HISTOGRAM_SAMPLES] if kind == "histogram" else [name]
        assert match.group(1) in names, f"not a sample of {name} ({kind}): {line!r}"
        out[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return out


def check_histograms(text: str) -> None:
    """What Prometheus needs of each histogram series, beyond its lines parsing (the text
    parser of prometheus_client is lax): buckets rise with `le` and end at `+Inf`, whose
    count is `_count`; and every family has a type (a sample that strayed from its
    family would come back as an untyped one) and comes once."""
    families = list(text_string_to_metric_families(text))
    assert all(f.type != "unknown" and f.type != "untyped" for f in families), families
    assert len({f.name for f in families}) == len(families)
    for family in families:
        if family.type != "histogram":
            continue
        series: dict[tuple[tuple[str, str], ...], list[tuple[float, float]]] = {}
        counts: dict[tuple[tuple[str, str], ...], float] = {}
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
            if s.name.endswith("_bucket"):
                series.setdefault(labels, []).append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                counts[labels] = s.value
        assert series and series.keys() == counts.keys(), family
        for labels, buckets in series.items():
            bounds = [le for le, _ in buckets]
            values = [v for _, v in buckets]
            assert bounds == sorted(bounds) and bounds[-1] == float("inf"), (labels, bounds)
            assert values == sorted(values) and values[-1] == counts[labels], (labels, values)


async def test_metrics_show_the_heartbeat_after_a_session(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """After one session, /metrics counts its final decodes as a counter, shows the slots
    and the claim state as gauges, names the worker, and agrees with the heartbeat hash."""
    svc = await service_factory(worker_metrics="127.0.0.1:0")
    worker = svc.worker
    assert worker is not None and worker.endpoint is not None
    port = worker.endpoint.port
    assert port > 0 and worker.endpoint.url == f"http://127.0.0.1:{port}/metrics"
    out = await asyncio.wait_for(stream_session(svc.url, fixture("s1.wav")), 120)
    assert out.code == 1000, (out.code, out.reason)
    status, headers, body = await request(port, get("/metrics"))
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert int(headers["Content-Length"]) == len(body.encode())
    check_histograms(body)
    figures = samples(body)
    finals = len(out.finals)
    assert finals >= 1
    assert figures["streamscribe_worker_decodes_final_total"] >= finals
    assert "# TYPE streamscribe_worker_decodes_final_total counter" in body
    assert "# TYPE streamscribe_worker_slots gauge" in body
    assert figures["streamscribe_worker_slots"] == 8
    assert figures['streamscribe_worker_claiming{state="open"}'] == 1
    assert figures['streamscribe_worker_claiming{state="closed"}'] == 0
    model = worker.stats()["model"]
    info = f'streamscribe_worker_info{{worker_id="{worker.worker_id}",model="{model}"}}'
    assert figures[info] == 1
    documented = heartbeat_fields()
    histograms = {
        name.removeprefix("streamscribe_worker_")
        for name, kind in types(body).items()
        if kind == "histogram"
    }
    assert histograms and histograms <= documented_histograms(), "not in architecture.md"
    for name in figures:
        field = name.split("{", 1)[0].removeprefix("streamscribe_worker_")
        if any(field.removesuffix(s) in histograms for s in HISTOGRAM_SAMPLES):
            continue  # not a heartbeat field: checked against architecture.md above
        if field not in ("info", "claiming"):
            assert field.removesuffix("_total") in documented, f"{field} not in redis-layout.md"
    await worker._heartbeat_once()
    stored = await hgetall(redis, keys.worker_info(worker.worker_id))
    _, _, body = await request(port, get("/metrics"))
    assert samples(body)["streamscribe_worker_slots"] == float(stored[b"slots"])
    assert samples(body)["streamscribe_worker_decodes_final_total"] == float(
        stored[b"decodes_final"]
    )


async def test_healthz_and_everything_else(service_factory: ServiceFactory) -> None:
    """/healthz is 200 while the worker serves and 503 once it stops; HEAD has no body;
    other methods get 405 with Allow, other paths 404, a garbled request line 400, a
    request head past MAX_HEAD_BYTES 431, a connection past MAX_CLIENTS 503; the endpoint
    keeps serving after each."""
    svc = await service_factory(worker_metrics="127.0.0.1:0")
    assert svc.worker is not None and svc.worker.endpoint is not None
    port = svc.worker.endpoint.port
    assert (await request(port, get("/healthz")))[::2] == (200, "ok\n")
    assert (await request(port, get("/healthz?verbose=1")))[0] == 200
    status, headers, body = await request(port, get("/metrics", "HEAD"))
    assert (status, body) == (200, "") and int(headers["Content-Length"]) > 0
    status, headers, _ = await request(port, get("/metrics", "POST"))
    assert (status, headers["Allow"]) == (405, "GET, HEAD")
    assert (await request(port, get("/")))[0] == 404
    assert (await request(port, b"nonsense\r\n\r\n"))[0] == 400
    assert (await request(port, b"GET / SMTP/1.0\r\n\r\n"))[0] == 400
    at_limit = get("/healthz")[:-2] + b"X: " + b"a" * (MAX_HEAD_BYTES - 40) + b"\r\n\r\n"
    assert len(at_limit) <= MAX_HEAD_BYTES
    assert (await request(port, at_limit))[0] == 200
    too_big = get("/healthz")[:-2] + b"X: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n"
    assert (await request(port, too_big))[0] == 431
    assert (await request(port, get("/healthz")))[0] == 200
    # Connections that send nothing hold their places until HEAD_TIMEOUT_S; past
    # MAX_CLIENTS of them a new one is answered 503 at once, and once they are gone the
    # endpoint answers again.
    idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CLIENTS)]
    endpoint = svc.worker.endpoint
    await until(lambda: _clients(endpoint, MAX_CLIENTS), "the idle connections to be served")
    assert (await request(port, get("/healthz")))[::2] == (503, "too many connections\n")
    for _, writer in idle:
        writer.close()
    await until(lambda: _clients(endpoint, 0), "the idle connections to end")
    assert (await request(port, get("/healthz")))[0] == 200
    svc.worker._closing.set()  # what shutdown sets first; /healthz must follow it
    assert (await request(port, get("/healthz")))[::2] == (503, "stopping\n")


async def _clients(endpoint: Endpoint, count: int) -> bool:
    return endpoint.clients == count


async def test_no_endpoint_unless_asked(service_factory: ServiceFactory) -> None:
    """By default (`worker_metrics` empty) a worker listens on nothing."""
    svc = await service_factory()
    assert svc.worker is not None and svc.worker.endpoint is None


async def test_a_port_in_use_stops_the_worker_before_it_claims_anything(
    redis: aioredis.Redis, redis_url: str
) -> None:
    """A worker whose endpoint cannot listen fails to start with an error naming the
    flag and the address, before it has registered or claimed anything."""
    taken = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = taken.sockets[0].getsockname()[1]
    worker = Worker(make_config(redis_url, worker_metrics=f"127.0.0.1:{port}"), engine=NullEngine())
    try:
        with pytest.raises(ConfigError) as info:
            await worker.start()
        assert f"--worker-metrics 127.0.0.1:{port}: cannot listen there" in str(info.value)
        assert await redis.zscore(keys.WORKERS, worker.worker_id) is None
        assert not worker.owned and not worker._tasks
    finally:
        taken.close()
        await taken.wait_closed()
        await worker.redis.aclose()


async def test_histograms_count_the_sessions_finals_and_decodes(
    service_factory: ServiceFactory,
) -> None:
    """After one session, /metrics' histograms agree with the counters and with what the
    client got: one `final_seconds` per final it received (a decode without words
    publishes nothing), one queue wait per final decode, and one engine call per decode
    of each kind. One session asks for one decode at a time, so no call holds two of its
    requests (checked: no packs, no batches); with several sessions a pack or a batch
    is one call for several decodes (tests/unit/test_packing.py, test_batching.py)."""
    svc = await service_factory(worker_metrics="127.0.0.1:0")
    worker = svc.worker
    assert worker is not None and worker.endpoint is not None
    port = worker.endpoint.port
    _, _, before = await request(port, get("/metrics"))
    empty = samples(before)
    assert empty["streamscribe_worker_final_seconds_count"] == 0
    assert empty['streamscribe_worker_final_seconds_bucket{le="+Inf"}'] == 0
    out = await asyncio.wait_for(stream_session(svc.url, fixture("s1.wav")), 120)
    assert out.code == 1000, (out.code, out.reason)
    _, _, body = await request(port, get("/metrics"))
    check_histograms(body)
    assert types(body)["streamscribe_worker_engine_call_seconds"] == "histogram"
    assert body.count("# TYPE streamscribe_worker_engine_call_seconds ") == 1
    m = {name.removeprefix("streamscribe_worker_"): v for name, v in samples(body).items()}
    finals = len(out.finals)
    assert finals >= 1
    assert m["final_seconds_count"] == finals
    assert m['final_seconds_bucket{le="+Inf"}'] == finals
    assert m["final_seconds_sum"] > 0
    assert m["packs_total"] == 0 and m["batches_total"] == 0
    assert m["final_queue_wait_seconds_count"] == m["decodes_final_total"] >= finals
    # One per answered pipeline of publishes (finals and interims, several per pipeline).
    assert m["publish_pipeline_seconds_count"] == worker.publisher.pipelines >= 1
    for kind in ("final", "interim"):
        calls = m[f'engine_call_seconds_count{{kind="{kind}"}}']
        assert calls == m[f"decodes_{kind}_total"], kind
        assert m[f'engine_call_seconds_bucket{{kind="{kind}",le="+Inf"}}'] == calls


def test_render_shows_histograms_with_their_labels() -> None:
    """`render` puts each histogram after the heartbeat's figures, labels and all."""
    call = Histogram((0.1, 1.0))
    call.observe(0.1)
    text = render(
        "w-1",
        {"model": "null", "claiming": "open", "slots": 2},
        {'engine_call_seconds{kind="final"}': call, "final_seconds": Histogram((1.0,))},
    )
    check_histograms(text)
    figures = samples(text)
    assert figures['streamscribe_worker_engine_call_seconds_bucket{kind="final",le="0.1"}'] == 1
    assert figures['streamscribe_worker_engine_call_seconds_bucket{kind="final",le="1"}'] == 1
    assert figures['streamscribe_worker_engine_call_seconds_sum{kind="final"}'] == 0.1
    assert figures['streamscribe_worker_final_seconds_bucket{le="+Inf"}'] == 0
    assert figures["streamscribe_worker_final_seconds_count"] == 0
    assert figures["streamscribe_worker_slots"] == 2
    assert types(text)["streamscribe_worker_final_seconds"] == "histogram"


def test_render_types_and_skips() -> None:
    """Running totals are counters with `_total`, the rest gauges; text fields and an
    empty `slots_auto_rate` (fixed slots) are left out; label values are escaped."""
    stats = {
        "model": 'odd"name',
        "slots": 4,
        "slots_auto_rate": "",
        "claiming": "probing",
        "engine_busy": 0.5,
        "decodes_final": 7,
        "pid": 123,
    }
    figures = samples(render("w-1", stats))
    assert figures == {
        'streamscribe_worker_info{worker_id="w-1",model="odd\\"name"}': 1,
        'streamscribe_worker_claiming{state="open"}': 0,
        'streamscribe_worker_claiming{state="probing"}': 1,
        'streamscribe_worker_claiming{state="closed"}': 0,
        "streamscribe_worker_slots": 4,
        "streamscribe_worker_engine_busy": 0.5,
        "streamscribe_worker_decodes_final_total": 7,
    }
    assert "decodes_final" in COUNTERS and "engine_busy" not in COUNTERS


def test_worker_metrics_setting(redis_url: str) -> None:
    """HOST:PORT (IPv6 in brackets) or empty; anything else is refused naming the flag.
    `up --workers N` gives worker i PORT+i, keeps port 0, and refuses a range past 65535."""
    assert host_port("0.0.0.0:9101", "worker_metrics") == ("0.0.0.0", 9101)
    assert host_port("[::1]:0", "worker_metrics") == ("::1", 0)
    Config(worker_metrics="")
    for bad in ("9101", ":9101", "host:", "host:port", "host:65536", "host:-1", "host:\uff19"):
        with pytest.raises(ConfigError) as info:
            Config(worker_metrics=bad)
        assert "--worker-metrics" in str(info.value)
    three = make_config(redis_url, workers=3, worker_metrics="127.0.0.1:9101")
    assert [worker_metrics_of(three, i) for i in range(3)] == [
        "127.0.0.1:9101",
        "127.0.0.1:9102",
        "127.0.0.1:9103",
    ]
    v6 = make_config(redis_url, workers=2, worker_metrics="[::1]:9101")
    assert worker_metrics_of(v6, 1) == "[::1]:9102"
    anyport = make_config(redis_url, workers=2, worker_metrics="127.0.0.1:0")
    assert worker_metrics_of(anyport, 1) == "127.0.0.1:0"
    assert worker_metrics_of(make_config(redis_url, workers=2), 1) == ""
    with pytest.raises(ConfigError, match="65535"):
        worker_metrics_of(make_config(redis_url, workers=2, worker_metrics="h:65535"), 0)
    assert worker_metrics_of(make_config(redis_url, workers=1, worker_metrics="h:65535"), 0)
