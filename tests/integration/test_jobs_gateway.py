"""File jobs at the gateway, over real TLS: the upload (`GET /v1/jobs`, WebSocket), its
limits, and the result (`GET /v1/jobs/<job_id>`, plain HTTP on the same port).

No worker runs: the tests play its part with the real `JobStore` (start_run, progress,
finish) on the same Redis, and watch what the gateway tells the client."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Awaitable
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from gateway.connection import key_id
from shared import keys
from shared.envelope import Word
from shared.jobs import JobSegment, JobStore, arq_job_id
from shared.keys import JobId
from tests.conftest import Service, ServiceFactory
from tests.helpers import Outcome, drain, gateway_connections, hget, hgetall, open_ws
from tests.integration.test_takeover import until

# On uvloop too: the loop `streamscribe gateway` runs on (tests/conftest.py).
pytestmark = pytest.mark.uvloop

KEYS = ("k-one", "k-two")
SECOND = 32000  # bytes of one second of 16 kHz pcm_s16le mono
SEGMENTS = [
    JobSegment(0.0, 0.4, " Hello", (Word(" Hello", 0.0, 0.4, 0.9),)),
    JobSegment(0.5, 0.9, " world.", (Word(" world.", 0.5, 0.9, 0.8),)),
]


def audio(nbytes: int) -> bytes:
    """`nbytes` of audio whose every byte tells where it is (to check what is stored)."""
    return bytes(i % 251 for i in range(nbytes))


def jobs_url(svc: Service) -> str:
    return svc.url.removesuffix("/v1/listen") + "/v1/jobs"


def https_base(svc: Service) -> str:
    return svc.url.replace("wss://", "https://").removesuffix("/v1/listen")


async def start(service_factory: ServiceFactory, **overrides: Any) -> Service:
    """A gateway alone (no worker), with TLS; progress looked at every 50 ms."""
    overrides.setdefault("queue_update_s", 0.05)
    return await service_factory(with_worker=False, tls=True, **overrides)


async def open_job(
    svc: Service, ssl_ctx: ssl.SSLContext, query: str = "", api_key: str | None = None
) -> ClientConnection:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return await open_ws(jobs_url(svc), query, ssl_ctx=ssl_ctx, headers=headers)


async def message(ws: ClientConnection) -> dict[str, Any]:
    raw = await ws.recv()
    assert isinstance(raw, str), "the server only sends text frames"
    return dict(json.loads(raw))


async def created(ws: ClientConnection) -> JobId:
    msg = await message(ws)
    assert msg["type"] == "job.created", msg
    return JobId(msg["job_id"])


async def send_audio(ws: ClientConnection, data: bytes, piece: int = 10_000) -> None:
    """`data` in binary messages of `piece` bytes (the last one shorter)."""
    for at in range(0, len(data), piece):
        await ws.send(data[at : at + piece])


async def submit(ws: ClientConnection) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "submit"}))
    msg = await message(ws)
    assert msg["type"] == "job.queued", msg
    return msg


async def submitted_job(
    svc: Service,
    ssl_ctx: ssl.SSLContext,
    nbytes: int,
    api_key: str | None = None,
    query: str = "",
) -> tuple[ClientConnection, JobId, dict[str, Any]]:
    ws = await open_job(svc, ssl_ctx, query, api_key)
    jid = await created(ws)
    await send_audio(ws, audio(nbytes))
    return ws, jid, await submit(ws)


async def refused(ws: ClientConnection, code: int, error: str) -> Outcome:
    """Read until the server closes; it closed with `code` after one `error`."""
    out = await drain(ws)
    assert out.code == code, (out.code, out.reason, out.messages)
    (err,) = out.of_type("error")
    assert err["code"] == error and err["message"] and out.reason, out.messages
    return out


def _get(
    url: str, ctx: ssl.SSLContext, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=ctx) as resp:
            status, head, body = int(resp.status), dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, head, body = int(exc.code), dict(exc.headers), exc.read()
    if head.get("Content-Type") == "application/json":
        return status, head, json.loads(body)
    return status, head, body.decode()


async def get(
    svc: Service, ssl_ctx: ssl.SSLContext, path: str, api_key: str | None = None
) -> tuple[int, dict[str, str], Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    return await asyncio.to_thread(_get, https_base(svc) + path, ssl_ctx, headers)


async def queued(redis: aioredis.Redis) -> list[str]:
    return [m.decode() for m in await redis.zrange(keys.JOBS, 0, -1)]


async def arq_queued(redis: aioredis.Redis) -> list[str]:
    return [m.decode() for m in await redis.zrange(keys.JOBS_ARQ_QUEUE, 0, -1)]


async def state(redis: aioredis.Redis, jid: JobId) -> str:
    return (await hget(redis, keys.job(jid), "state") or b"").decode()


async def test_an_upload_is_stored_exactly_and_its_submit_queues_the_job(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """`job.created` comes first (with the limit), then audio in messages of any size
    (odd ones included, only the whole must be whole samples) and `submit` get
    `job.queued` with the job's length and place. The bytes are stored exactly, the
    job's hash is `queued` with no expiry, it is in the fleet's set of unfinished jobs,
    and its first arq run `file:<id>:0` is queued; the client may leave, the job stays."""
    svc = await start(service_factory, job_max_audio_s=10.0)
    ws = await open_job(svc, client_ssl, "name=call%201.wav&language=en")
    hello = await message(ws)
    assert hello == {"type": "job.created", "job_id": hello["job_id"], "max_audio_seconds": 10.0}
    jid = JobId(hello["job_id"])
    assert len(jid) == 32 and all(c in "0123456789abcdef" for c in jid)
    data = audio(3 * SECOND // 2)
    await send_audio(ws, data, piece=7_777)
    reply = await submit(ws)
    assert reply == {"type": "job.queued", "job_id": jid, "audio_seconds": 1.5, "position": 0}
    await ws.close()
    assert await redis.get(keys.job_audio(jid)) == data
    job = {k.decode(): v.decode() for k, v in (await hgetall(redis, keys.job(jid))).items()}
    assert (job["state"], job["audio_bytes"], job["name"], job["language"]) == (
        "queued",
        str(len(data)),
        "call 1.wav",
        "en",
    )
    assert job["key_id"] == ""  # no API keys configured
    assert await redis.ttl(keys.job(jid)) == -1 and await redis.ttl(keys.job_audio(jid)) == -1
    assert await queued(redis) == [jid]
    assert await arq_queued(redis) == [arq_job_id(jid, 0)] == [f"file:{jid}:0:0"]
    assert await redis.exists(f"arq:job:file:{jid}:0:0")
    status, _, body = await get(svc, client_ssl, "/metrics")
    assert status == 200
    assert "streamscribe_gateway_job_uploads_total 1" in body
    assert "streamscribe_gateway_jobs_submitted_total 1" in body


async def test_a_client_that_stays_is_told_the_progress_then_the_result(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """After `job.queued`, each change the worker makes is a `job.progress` (running,
    then half done), and the end is `job.done` with every segment and the text, then
    close 1000."""
    svc = await start(service_factory)
    ws, jid, _ = await submitted_job(svc, client_ssl, SECOND)
    store = JobStore(redis)
    run = await store.start_run(jid, "w-test")
    assert run is not None and run.done_bytes == 0
    running = await message(ws)
    assert running == {
        "type": "job.progress",
        "job_id": jid,
        "state": "running",
        "done_seconds": 0.0,
        "audio_seconds": 1.0,
        "position": 0,
    }
    assert await store.progress(
        jid, run.epoch, from_bytes=0, to_bytes=SECOND // 2, segments=SEGMENTS[:1]
    )
    half = await message(ws)
    assert (half["type"], half["state"], half["done_seconds"]) == ("job.progress", "running", 0.5)
    assert await store.progress(
        jid, run.epoch, from_bytes=SECOND // 2, to_bytes=SECOND, segments=SEGMENTS[1:]
    )
    assert await store.finish(jid, run.epoch, ttl_s=60)
    out = await drain(ws)
    assert out.code == 1000
    kinds = [m["type"] for m in out.messages]
    assert kinds[-1] == "job.done" and set(kinds[:-1]) <= {"job.progress"}, kinds
    done = out.messages[-1]
    assert (done["job_id"], done["state"], done["done_seconds"]) == (jid, "done", 1.0)
    assert done["text"] == "Hello world."
    assert done["segments"] == [s.to_json() for s in SEGMENTS]
    assert done["runs"] == 1 and done["finished_ms"] >= done["started_ms"] >= done["submitted_ms"]
    assert "position" not in done and "error" not in done


async def test_a_failed_job_is_reported_with_its_reason(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """A job the worker gives up on: `job.failed` with the error, then close 1000; the
    result reads the same over HTTP."""
    svc = await start(service_factory)
    ws, jid, _ = await submitted_job(svc, client_ssl, SECOND)
    store = JobStore(redis)
    run = await store.start_run(jid, "w-test")
    assert run is not None
    assert (await message(ws))["state"] == "running"
    assert await store.finish(jid, run.epoch, error="the audio could not be decoded", ttl_s=60)
    out = await drain(ws)
    assert out.code == 1000
    failed = out.messages[-1]
    assert failed["type"] == "job.failed"
    assert (failed["state"], failed["error"]) == ("failed", "the audio could not be decoded")
    assert "segments" not in failed
    status, _, body = await get(svc, client_ssl, f"/v1/jobs/{jid}")
    assert status == 200
    assert (body["state"], body["error"], body["segments"]) == (
        "failed",
        "the audio could not be decoded",
        [],
    )
    assert await queued(redis) == []


async def test_the_result_reads_queued_running_and_done(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """`GET /v1/jobs/<id>` answers JSON: queued with its place (second, behind another
    job), running with the segments so far, done with all of them and no place."""
    svc = await start(service_factory)
    first, _, _ = await submitted_job(svc, client_ssl, SECOND)
    ws, jid, reply = await submitted_job(svc, client_ssl, 2 * SECOND)
    assert reply["position"] == 1
    for client in (first, ws):
        await client.close()
    status, head, body = await get(svc, client_ssl, f"/v1/jobs/{jid}")
    assert (status, head["Content-Type"]) == (200, "application/json")
    assert body["submitted_ms"] > 0
    assert body == {
        "job_id": jid,
        "state": "queued",
        "name": "",
        "audio_seconds": 2.0,
        "done_seconds": 0.0,
        "submitted_ms": body["submitted_ms"],
        "started_ms": None,
        "finished_ms": None,
        "runs": 0,
        "position": 1,
        "text": "",
        "segments": [],
    }
    store = JobStore(redis)
    run = await store.start_run(jid, "w-test")
    assert run is not None
    assert await store.progress(jid, run.epoch, from_bytes=0, to_bytes=SECOND, segments=SEGMENTS)
    _, _, body = await get(svc, client_ssl, f"/v1/jobs/{jid}")
    assert (body["state"], body["done_seconds"], body["position"], body["runs"]) == (
        "running",
        1.0,
        1,
        1,
    )
    assert body["segments"] == [s.to_json() for s in SEGMENTS] and body["started_ms"]
    assert await store.finish(jid, run.epoch, ttl_s=60)
    _, _, body = await get(svc, client_ssl, f"/v1/jobs/{jid}")
    assert (body["state"], body["text"], len(body["segments"])) == ("done", "Hello world.", 2)
    assert "position" not in body and body["finished_ms"] >= body["started_ms"]


async def test_the_result_is_refused_with_the_documented_status(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """With API keys: 401 without a key or with a wrong one, 404 for another key's job,
    an unknown ID and a job still uploading, 400 for a malformed ID or an unknown
    parameter; the key works as a Bearer header and as `access_token`. Errors are JSON
    `{"error", "message"}`."""
    svc = await start(service_factory, api_keys=KEYS)
    ws, jid, _ = await submitted_job(svc, client_ssl, SECOND, api_key="k-one")
    await ws.close()
    assert await hget(redis, keys.job(jid), "key_id") == key_id("k-one").encode()
    pending = await open_job(svc, client_ssl, api_key="k-one")
    uploading = await created(pending)
    path = f"/v1/jobs/{jid}"
    cases: list[tuple[str, str | None, int, str]] = [
        (path, None, 401, "unauthorized"),
        (path, "nope", 401, "unauthorized"),
        (path, "k-two", 404, "not_found"),
        (f"/v1/jobs/{'0' * 32}", "k-one", 404, "not_found"),
        (f"/v1/jobs/{uploading}", "k-one", 404, "not_found"),
        ("/v1/jobs/not-a-job", "k-one", 400, "bad_request"),
        (f"/v1/jobs/{jid.upper()}", "k-one", 400, "bad_request"),
        ("/v1/jobs/", "k-one", 400, "bad_request"),
        (f"{path}?bogus=1", "k-one", 400, "bad_request"),
    ]
    for url, api_key, code, error in cases:
        status, head, body = await get(svc, client_ssl, url, api_key)
        assert (status, head["Content-Type"], body["error"]) == (
            code,
            "application/json",
            error,
        ), (url, api_key, body)
        assert body["message"]
        if code == 401:
            assert head["WWW-Authenticate"] == "Bearer"
    for url, api_key in ((path, "k-one"), (f"{path}?access_token=k-one", None)):
        status, _, body = await get(svc, client_ssl, url, api_key)
        assert (status, body["job_id"], body["state"]) == (200, jid, "queued")
    status, _, text = await get(svc, client_ssl, "/v1/nothing")
    assert status == 404 and "/v1/listen" in text and "/v1/jobs" in text
    await pending.close()


async def test_an_upload_needs_a_valid_api_key(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """With API keys, an upload without one or with a wrong one gets `unauthorized` and
    4401 before anything is stored; `access_token` in the query works as /v1/listen's."""
    svc = await start(service_factory, api_keys=KEYS)
    await refused(await open_job(svc, client_ssl), 4401, "unauthorized")
    await refused(await open_job(svc, client_ssl, api_key="nope"), 4401, "unauthorized")
    assert not await redis.keys(f"{keys.PREFIX}:job:*")
    ws = await open_job(svc, client_ssl, "access_token=k-two")
    jid = await created(ws)
    assert await hget(redis, keys.job(jid), "key_id") == key_id("k-two").encode()
    await ws.close()


async def test_the_audio_limit_allows_exactly_job_max_audio_s(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """`job_max_audio_s` 1: 32000 bytes (exactly 1 s) are accepted; on another upload one
    sample frame more gets `bad_request` and 4400 naming the limit, and nothing of the
    message that passed it is stored."""
    svc = await start(service_factory, job_max_audio_s=1.0)
    ws, jid, reply = await submitted_job(svc, client_ssl, SECOND)
    assert reply["audio_seconds"] == 1.0
    await ws.close()
    over = await open_job(svc, client_ssl)
    refused_jid = await created(over)
    await send_audio(over, audio(SECOND))
    await over.send(b"\x00\x00")
    out = await refused(over, 4400, "bad_request")
    assert "job_max_audio_s" in out.of_type("error")[0]["message"]
    assert "job_max_audio_s" in out.reason
    assert await redis.strlen(keys.job_audio(refused_jid)) == SECOND
    assert await queued(redis) == [jid]


async def test_past_job_max_queued_a_submit_is_refused_and_nothing_of_it_is_queued(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """`job_max_queued` 2: an upload opened while there was room but submitted third
    gets `overloaded` and 1013 with the reason; its upload stays (to expire), out of
    the queue and with no arq run. Once the queue is full, a new upload is refused at
    once, before any audio is sent."""
    svc = await start(service_factory, job_max_queued=2)
    jids = []
    ws, jid, _ = await submitted_job(svc, client_ssl, SECOND)
    jids.append(jid)
    await ws.close()
    third = await open_job(svc, client_ssl)  # opened with one job queued: room for it
    extra = await created(third)
    ws, jid, _ = await submitted_job(svc, client_ssl, SECOND)
    jids.append(jid)
    await ws.close()
    await send_audio(third, audio(SECOND))
    await third.send(json.dumps({"type": "submit"}))
    out = await refused(third, 1013, "overloaded")
    message = out.of_type("error")[0]["message"]
    assert "2 file jobs are waiting or running (job_max_queued 2); try again later" in message
    assert not out.of_type("job.queued")
    assert sorted(await queued(redis)) == sorted(jids)
    assert sorted(await arq_queued(redis)) == sorted(arq_job_id(j, 0) for j in jids)
    assert not await redis.exists(f"arq:job:{arq_job_id(extra, 0)}")
    assert await state(redis, extra) == "uploading"
    assert await redis.ttl(keys.job(extra)) > 0
    assert svc.gateway.metrics.counters['jobs_refused_total{reason="queue_full"}'] == 1
    late = await refused(await open_job(svc, client_ssl), 1013, "overloaded")
    assert not late.of_type("job.created")
    assert "(job_max_queued 2); try again later" in late.of_type("error")[0]["message"]
    assert svc.gateway.metrics.counters['jobs_refused_total{reason="queue_full"}'] == 2


async def test_past_job_max_uploads_a_new_upload_is_refused_until_one_ends(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """`job_max_uploads` 2: a third upload at once gets `overloaded` and 1013 before any
    audio (no job made for it); once one upload is submitted and another dropped, two
    more are taken again."""
    svc = await start(service_factory, job_max_uploads=2)
    first = await open_job(svc, client_ssl)
    await created(first)
    second = await open_job(svc, client_ssl)
    await created(second)
    out = await refused(await open_job(svc, client_ssl), 1013, "overloaded")
    assert not out.of_type("job.created")
    message = out.of_type("error")[0]["message"]
    assert "2 uploads in progress on this gateway (job_max_uploads 2)" in message
    assert len(await redis.keys(f"{keys.PREFIX}:job:*")) == 2
    await send_audio(first, audio(SECOND))
    await submit(first)  # submitted: no longer an upload
    await second.close()
    await until(lambda: _no_connections_but(svc, 1), "the gateway to end the dropped upload")
    for _ in range(2):
        await created(await open_job(svc, client_ssl))
    assert svc.gateway.metrics.counters['jobs_refused_total{reason="uploads"}'] == 1


@pytest.mark.parametrize(
    ("sends", "code", "error"),
    [
        pytest.param([], 4400, "bad_request", id="submit-without-audio"),
        pytest.param([b"\x00\x00\x00"], 4400, "bad_request", id="odd-byte-count"),
        pytest.param(['{"type": "finalize"}'], 1008, "protocol_violation", id="unknown-type"),
        pytest.param(["not json"], 1008, "protocol_violation", id="not-json"),
        pytest.param(['{"type": "keepalive"}'], 4400, "bad_request", id="keepalive-no-audio"),
    ],
)
async def test_bad_uploads_are_refused_and_nothing_is_queued(
    service_factory: ServiceFactory,
    redis: aioredis.Redis,
    client_ssl: ssl.SSLContext,
    sends: list[str | bytes],
    code: int,
    error: str,
) -> None:
    """A submit with no audio, or with a byte count that is not whole sample frames, is
    `bad_request` 4400 (keepalive is ignored); a text message other than `submit` and
    `keepalive` is `protocol_violation` 1008. No job is queued."""
    svc = await start(service_factory)
    ws = await open_job(svc, client_ssl)
    await created(ws)
    for item in sends:
        await ws.send(item)
    try:
        await ws.send(json.dumps({"type": "submit"}))
    except ConnectionClosed:
        pass  # the server closed already (a bad text message)
    await refused(ws, code, error)
    assert await queued(redis) == [] and await arq_queued(redis) == []


async def test_audio_or_a_second_submit_after_submit_is_a_protocol_violation(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """After `job.queued`, `keepalive` is fine but audio gets `protocol_violation` and
    1008, as does another `submit`; the job stays queued as it was."""
    svc = await start(service_factory)
    for late in (b"\x00\x00", json.dumps({"type": "submit"})):
        ws, jid, _ = await submitted_job(svc, client_ssl, SECOND)
        await ws.send(json.dumps({"type": "keepalive"}))
        await ws.send(late)
        await refused(ws, 1008, "protocol_violation")
        assert await state(redis, jid) == "queued"
        assert await redis.strlen(keys.job_audio(jid)) == SECOND


@pytest.mark.parametrize(
    "query",
    ["sample_rate=4000", "encoding=mp3", "channels=3", "bogus=1", "interim_results=false"],
)
async def test_a_bad_query_is_refused_before_any_upload(
    service_factory: ServiceFactory,
    redis: aioredis.Redis,
    client_ssl: ssl.SSLContext,
    query: str,
) -> None:
    """Invalid or unknown query parameters (the listen endpoint's `interim_results` is
    not one of /v1/jobs') get `bad_request` and 4400 before `job.created`."""
    svc = await start(service_factory)
    out = await refused(await open_job(svc, client_ssl, query), 4400, "bad_request")
    assert not out.of_type("job.created")
    assert not await redis.keys(f"{keys.PREFIX}:job:*")


async def test_a_connection_dropped_before_submit_leaves_the_upload_to_expire(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """The client goes after sending audio, without `submit`: nothing is queued, the hash
    stays `uploading`, and both it and the audio expire idle_timeout_s + 60 s after the
    last message (`job_upload_ttl_s`), not after `job_ttl_s`."""
    svc = await start(service_factory, job_ttl_s=3000.0, idle_timeout_s=40.0)
    ws = await open_job(svc, client_ssl)
    jid = await created(ws)
    await send_audio(ws, audio(SECOND))
    await until(
        lambda: _audio_bytes_are(redis, jid, SECOND), "the gateway to store the whole upload"
    )
    await ws.close()
    await until(lambda: _no_connections(svc), "the gateway to end the connection")
    assert await state(redis, jid) == "uploading"
    for key in (keys.job(jid), keys.job_audio(jid)):
        assert 0 < await redis.pttl(key) <= 100_000
    assert await queued(redis) == [] and await arq_queued(redis) == []


async def _no_connections_but(svc: Service, n: int) -> bool:
    return len(gateway_connections(svc)) == n


async def _audio_bytes_are(redis: aioredis.Redis, jid: JobId, nbytes: int) -> bool:
    return await hget(redis, keys.job(jid), "audio_bytes") == str(nbytes).encode()


async def _no_connections(svc: Service) -> bool:
    return not gateway_connections(svc)


async def test_a_draining_gateway_closes_uploads_with_1012(
    service_factory: ServiceFactory, client_ssl: ssl.SSLContext
) -> None:
    """Shutdown asks every client to go elsewhere, uploads too: 1012, no error."""
    svc = await start(service_factory)
    ws = await open_job(svc, client_ssl)
    await created(ws)
    await send_audio(ws, audio(SECOND))
    await svc.gateway.shutdown()
    out = await drain(ws)
    assert out.code == 1012 and not out.of_type("error")


async def test_a_job_is_counted_against_the_keys_audio_budget(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """`audio_budget_s` 1: a 1.5 s job is refused with `rate_limited` and 4429 naming
    the budget; a 0.6 s job is queued and its audio counted under the key; a 0.5 s job
    no longer fits, while another key's 1 s job does."""
    svc = await start(service_factory, api_keys=KEYS, audio_budget_s=1.0)
    ws = await open_job(svc, client_ssl, api_key="k-one")
    await created(ws)
    await send_audio(ws, audio(3 * SECOND // 2))
    await ws.send(json.dumps({"type": "submit"}))
    out = await refused(ws, 4429, "rate_limited")
    assert "audio_budget_s" in out.of_type("error")[0]["message"] and "audio_budget_s" in out.reason
    assert await queued(redis) == []
    ok, jid, _ = await submitted_job(svc, client_ssl, 6 * SECOND // 10, api_key="k-one")
    await ok.close()
    usage = svc.gateway.ctx.usage
    assert usage is not None
    await svc.gateway.ctx.sync_usage()
    name = keys.usage(key_id("k-one"), usage.window())
    totals = cast(Awaitable[dict[bytes, bytes]], redis.hgetall(name))
    assert await totals == {svc.gateway.gateway_id.encode(): b"600000"}
    late = await open_job(svc, client_ssl, api_key="k-one")
    await created(late)
    await send_audio(late, audio(SECOND // 2))
    await late.send(json.dumps({"type": "submit"}))
    await refused(late, 4429, "rate_limited")
    other, other_jid, _ = await submitted_job(svc, client_ssl, SECOND, api_key="k-two")
    await other.close()
    assert sorted(await queued(redis)) == sorted([jid, other_jid])
    assert svc.gateway.metrics.counters['jobs_refused_total{reason="audio_budget"}'] == 2


async def test_a_message_over_max_frame_bytes_is_too_large(
    service_factory: ServiceFactory, client_ssl: ssl.SSLContext
) -> None:
    """Uploads keep the gateway's message limit: a larger binary message gets
    `frame_too_large` and 1009, as on /v1/listen."""
    svc = await start(service_factory, max_frame_bytes=4096)
    ws = await open_job(svc, client_ssl)
    await created(ws)
    await ws.send(audio(4096))
    await ws.send(audio(4098))
    await refused(ws, 1009, "frame_too_large")
    await until(lambda: _too_large_counted(svc), "the handler to count the error")


async def _too_large_counted(svc: Service) -> bool:
    return svc.gateway.metrics.counters['errors_total{code="frame_too_large"}'] == 1


async def test_an_upload_with_nothing_arriving_is_dropped_after_idle_timeout_s(
    service_factory: ServiceFactory, redis: aioredis.Redis, client_ssl: ssl.SSLContext
) -> None:
    """A client that neither sends nor leaves does not hold its connection: after
    `idle_timeout_s` without a message it gets `protocol_violation` and 1008 naming the
    setting; its upload is not queued."""
    svc = await start(service_factory, idle_timeout_s=0.2)
    ws = await open_job(svc, client_ssl)
    jid = await created(ws)
    with contextlib.suppress(ConnectionClosed):  # on a slow machine it may be over already
        await ws.send(audio(SECOND))
    out = await refused(ws, 1008, "protocol_violation")
    assert "idle_timeout_s" in out.reason
    assert await state(redis, jid) == "uploading" and await queued(redis) == []
