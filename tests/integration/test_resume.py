"""Resume over a real gateway: replay of missed finals, next_seq, 4409 for the old socket."""

from __future__ import annotations

import json

import pytest

from tests.conftest import ServiceFactory
from tests.helpers import drain, fixture, open_ws, started

# On uvloop too: the loop `streamscribe gateway` and `worker` run on (tests/conftest.py).
pytestmark = pytest.mark.uvloop


def _resume(sid: str, token: str, last_result_id: int) -> str:
    return json.dumps(
        {
            "type": "resume",
            "session_id": sid,
            "resume_token": token,
            "last_result_id": last_result_id,
        }
    )


async def test_resume_replays_missed_finals_and_continues(service_factory: ServiceFactory) -> None:
    """A client that drops after sending audio resumes: session.resumed with next_seq equal
    to the frames stored, every final after last_result_id, then the rest of the session."""
    svc = await service_factory()
    frames = fixture("s1.wav").frames(100)
    ws = await open_ws(svc.url)
    first = await started(ws)
    half = len(frames) // 2
    for frame in frames[:half]:
        await ws.send(frame)
    acked = -1
    while acked < half - 1:
        msg = json.loads(await ws.recv())
        if msg["type"] == "ack":
            acked = msg["seq"]
    await ws.close()
    ws2 = await open_ws(svc.url, f"session_id={first['session_id']}")
    await ws2.send(_resume(first["session_id"], first["resume_token"], -1))
    resumed = json.loads(await ws2.recv())
    assert resumed == {
        "type": "session.resumed",
        "session_id": first["session_id"],
        "next_seq": half,
    }
    for frame in frames[half:]:
        await ws2.send(frame)
    await ws2.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws2)
    assert out.code == 1000
    assert [f["result_id"] for f in out.finals] == list(range(len(out.finals)))
    assert out.messages[-1]["final_results"] == len(out.finals) >= 2
    assert out.of_type("ack")[-1]["seq"] == len(frames) - 1


async def test_resume_of_a_closed_session_replays_then_closes(
    service_factory: ServiceFactory,
) -> None:
    """Resuming a session that already closed replays the missed finals, then
    session.closed, then close 1000."""
    svc = await service_factory()
    ws = await open_ws(svc.url)
    first = await started(ws)
    for frame in fixture("s2.wav").frames(100):
        await ws.send(frame)
    await ws.send(json.dumps({"type": "close_stream"}))
    original = await drain(ws)
    ws2 = await open_ws(svc.url, f"session_id={first['session_id']}")
    await ws2.send(_resume(first["session_id"], first["resume_token"], 0))
    out = await drain(ws2)
    assert out.code == 1000
    assert out.messages[0]["type"] == "session.resumed"
    assert [f["result_id"] for f in out.finals] == [f["result_id"] for f in original.finals[1:]]
    assert out.messages[-1]["type"] == "session.closed"


async def test_newer_connection_replaces_older_with_4409(service_factory: ServiceFactory) -> None:
    """A resume while the old connection is still open: the old one is closed with 4409."""
    svc = await service_factory()
    ws = await open_ws(svc.url)
    first = await started(ws)
    ws2 = await open_ws(svc.url, f"session_id={first['session_id']}")
    await ws2.send(_resume(first["session_id"], first["resume_token"], -1))
    assert json.loads(await ws2.recv())["type"] == "session.resumed"
    old = await drain(ws)
    assert old.code == 4409 and old.reason
    assert not old.of_type("error")
    await ws2.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws2)
    assert out.code == 1000


async def test_resume_of_a_closed_session_claiming_unsent_finals_is_4400(
    service_factory: ServiceFactory,
) -> None:
    """A closed session has all its finals stored: a `last_result_id` at or past their
    number was never sent, and is refused with bad_request."""
    svc = await service_factory()
    ws = await open_ws(svc.url)
    first = await started(ws)
    for frame in fixture("s2.wav").frames(100):
        await ws.send(frame)
    await ws.send(json.dumps({"type": "close_stream"}))
    original = await drain(ws)
    count = len(original.finals)
    assert count >= 1
    ws2 = await open_ws(svc.url, f"session_id={first['session_id']}")
    await ws2.send(_resume(first["session_id"], first["resume_token"], count))
    out = await drain(ws2)
    assert out.code == 4400
    errors = out.of_type("error")
    assert errors and errors[-1]["code"] == "bad_request"
    assert "never sent" in errors[-1]["message"]
    ws3 = await open_ws(svc.url, f"session_id={first['session_id']}")
    await ws3.send(_resume(first["session_id"], first["resume_token"], count - 1))
    out = await drain(ws3)  # one below: the last final it has, accepted
    assert out.messages[0]["type"] == "session.resumed" and out.code == 1000


async def test_resume_of_an_open_session_ahead_of_redis_skips_those_finals(
    service_factory: ServiceFactory,
) -> None:
    """After a Redis crash that lost writes, a client may hold a final the session no
    longer has. Its resume is accepted while the session is open; the final, made again
    from the re-sent audio, is not sent a second time, and later ones are."""
    svc = await service_factory()
    frames = fixture("s1.wav").frames(100)
    ws = await open_ws(svc.url)
    first = await started(ws)
    for frame in frames[:3]:  # no utterance has ended yet: no final stored
        await ws.send(frame)
    acked = -1
    while acked < 2:
        msg = json.loads(await ws.recv())
        if msg["type"] == "ack":
            acked = msg["seq"]
    await ws.close()
    ws2 = await open_ws(svc.url, f"session_id={first['session_id']}")
    await ws2.send(_resume(first["session_id"], first["resume_token"], 0))
    resumed = json.loads(await ws2.recv())
    assert resumed["type"] == "session.resumed" and resumed["next_seq"] == 3
    for frame in frames[3:]:
        await ws2.send(frame)
    await ws2.send(json.dumps({"type": "close_stream"}))
    out = await drain(ws2)
    assert out.code == 1000
    total = out.messages[-1]["final_results"]
    assert total >= 2  # s1 holds two sentences
    assert [f["result_id"] for f in out.finals] == list(range(1, total))
