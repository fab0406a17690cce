"""The SDK (`shared.client.StreamingSession`) under faults: backoff with jitter and a cap,
giving up early on errors retrying cannot fix, noticing a dead link, keepalives, re-sending
from `next_seq`, buffering while disconnected, and cleaning up after itself.

Most tests script the server side with `FakeGateway`, a real WebSocket server in its own
thread and event loop (so the test's loop holds only the SDK's own tasks); the dead-link
and end-to-end tests use the real in-process gateway and worker (null engine)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import wave
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from shared.client import (
    AudioBufferFull,
    SessionError,
    StreamingSession,
    backoff_delay,
)
from shared.envelope import Closed, Transcript
from tests.conftest import ServiceFactory
from tests.faults.harness import TcpProxy, wait_for
from tests.helpers import fixture

TOKEN = "tok-" + "x" * 28
SID = "ab" * 16


@dataclass
class FakeConn:
    """One connection the fake gateway accepted, and what it received."""

    index: int
    ws: ServerConnection
    query: str
    received: list[bytes | str] = field(default_factory=list)

    async def start_session(self) -> None:
        await self.ws.send(
            json.dumps(
                {
                    "type": "session.started",
                    "session_id": SID,
                    "resume_token": TOKEN,
                    "protocol": 1,
                    "sample_rate": 16000,
                }
            )
        )

    async def recv(self) -> bytes | str:
        msg = await self.ws.recv()
        self.received.append(msg)
        return msg

    async def expect_resume(self) -> dict[str, Any]:
        msg = json.loads(await self.recv())
        assert msg["type"] == "resume" and msg["resume_token"] == TOKEN, msg
        return dict(msg)

    async def resumed(self, next_seq: int) -> None:
        await self.ws.send(
            json.dumps({"type": "session.resumed", "session_id": SID, "next_seq": next_seq})
        )

    async def refuse(self, close_code: int, error: str = "forbidden") -> None:
        await self.ws.send(json.dumps({"type": "error", "code": error, "message": "no"}))
        await self.ws.close(close_code, "refused")

    @property
    def audio(self) -> list[bytes]:
        return [m for m in self.received if isinstance(m, bytes)]

    @property
    def texts(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.received if isinstance(m, str)]


Script = Callable[[FakeConn], Awaitable[None]]


class FakeGateway:
    """A scripted protocol-v1 server on 127.0.0.1 in a thread of its own."""

    def __init__(self, script: Script, http_status: Callable[[int], int | None] | None = None):
        self.script = script
        self.http_status = http_status  # connection index -> refuse the upgrade with it
        self.conns: list[FakeConn] = []
        self.attempts = 0
        self.open = 0
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="fake-gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/listen"

    def __enter__(self) -> FakeGateway:
        self._thread.start()
        assert self._ready.wait(10), "fake gateway did not start"
        return self

    def __exit__(self, *exc_info: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(
            self._handle, "127.0.0.1", 0, process_request=self._process, ping_interval=None
        ) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    def _process(self, ws: ServerConnection, request: Request) -> Response | None:
        index = self.attempts
        self.attempts += 1
        status = self.http_status(index) if self.http_status else None
        return ws.respond(status, "refused\n") if status else None

    async def _handle(self, ws: ServerConnection) -> None:
        query = ws.request.path.partition("?")[2] if ws.request else ""
        conn = FakeConn(len(self.conns), ws, query)
        self.conns.append(conn)
        self.open += 1
        try:
            await self.script(conn)
        except ConnectionClosed:
            pass
        finally:
            self.open -= 1


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeGateway]]:
    started: list[FakeGateway] = []

    def start(script: Script, **kwargs: Any) -> FakeGateway:
        gateway = FakeGateway(script, **kwargs)
        started.append(gateway.__enter__())
        return gateway

    yield start
    for gateway in started:
        gateway.__exit__(None, None, None)


async def serve_audio(conn: FakeConn, *, ack: bool = True) -> None:
    """Acknowledge every audio frame (seqs counted on this connection from `first`)."""
    while True:
        msg = await conn.recv()
        if isinstance(msg, bytes) and ack:
            await conn.ws.send(json.dumps({"type": "ack", "seq": len(conn.audio) - 1}))


def frames(n: int) -> list[bytes]:
    return [bytes([i]) * 320 for i in range(n)]


def instant(delays: list[float]) -> Callable[[float], Awaitable[None]]:
    async def sleep(delay: float) -> None:
        delays.append(delay)

    return sleep


# --- backoff ---------------------------------------------------------------------------


def test_backoff_doubles_with_equal_jitter_up_to_the_cap() -> None:
    """Delays double per attempt from backoff_s, never exceed max_backoff_s, and jitter
    moves each within the upper half of its step."""
    low = [backoff_delay(a, 0.2, 5.0, 0.0) for a in range(1, 9)]
    high = [backoff_delay(a, 0.2, 5.0, 0.999999) for a in range(1, 9)]
    assert low == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.5, 2.5, 2.5])
    assert high == pytest.approx([0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0], rel=1e-5)
    assert backoff_delay(10_000, 0.2, 5.0, 0.5) == pytest.approx(3.75)


async def test_reconnects_back_off_and_stop_at_the_cap(
    fake: Callable[..., FakeGateway],
) -> None:
    """A server that drains (1012) and then refuses every resume with 1011: the SDK makes
    exactly max_reconnects attempts with growing, jittered delays, then fails the session
    with a clear error, in results() and in send_audio()."""

    async def script(conn: FakeConn) -> None:
        if conn.index == 0:
            await conn.start_session()
            await conn.ws.close(1012, "draining")
            return
        await conn.expect_resume()
        await conn.refuse(1011, "internal")

    gw = fake(script)
    delays: list[float] = []
    session = StreamingSession(gw.url, max_reconnects=4, backoff_s=0.2, max_backoff_s=0.5)
    session.backoff_sleep = instant(delays)
    session.jitter = lambda: 0.5
    async with session:
        with pytest.raises(SessionError, match="could not reconnect after 4 attempts"):
            async for _ in session.results():
                pass
        with pytest.raises(SessionError):
            await session.send_audio(b"\0\0")
    assert delays == pytest.approx([0.15, 0.3, 0.375, 0.375])
    assert len(gw.conns) == 1 + 4
    assert session.last_error is not None and session.last_error.code == "internal"


# --- errors retrying cannot fix --------------------------------------------------------


@pytest.mark.parametrize("close_code", [4400, 4401, 4403, 4404])
async def test_resume_refusal_that_retrying_cannot_fix_ends_at_once(
    fake: Callable[..., FakeGateway], close_code: int
) -> None:
    """A resume refused with 4400/4401/4403/4404 is not retried: one attempt, then
    SessionError with that close code and the server's error code."""

    async def script(conn: FakeConn) -> None:
        if conn.index == 0:
            await conn.start_session()
            await conn.ws.close(1012, "draining")
            return
        await conn.expect_resume()
        await conn.refuse(close_code)

    gw = fake(script)
    delays: list[float] = []
    async with StreamingSession(gw.url, max_reconnects=8) as session:
        session.backoff_sleep = instant(delays)
        with pytest.raises(SessionError) as caught:
            async for _ in session.results():
                pass
    assert caught.value.close_code == close_code and caught.value.code == "forbidden"
    assert len(delays) == 1 and len(gw.conns) == 2


async def test_http_401_on_resume_ends_at_once(fake: Callable[..., FakeGateway]) -> None:
    """An upgrade refused with HTTP 401 counts as 4401: no second attempt."""

    async def script(conn: FakeConn) -> None:
        await conn.start_session()
        await conn.ws.close(1012, "draining")

    gw = fake(script, http_status=lambda i: 401 if i > 0 else None)
    delays: list[float] = []
    async with StreamingSession(gw.url, max_reconnects=8) as session:
        session.backoff_sleep = instant(delays)
        with pytest.raises(SessionError) as caught:
            async for _ in session.results():
                pass
    assert caught.value.close_code == 4401
    assert gw.attempts == 2 and len(delays) == 1


@pytest.mark.parametrize("close_code", [4409, 1008])
async def test_fatal_close_of_a_live_connection_is_not_retried(
    fake: Callable[..., FakeGateway], close_code: int
) -> None:
    """4409 (another connection resumed the session) and 1008 end the session without any
    reconnect attempt: reconnecting would fight the newer connection or repeat the error."""

    async def script(conn: FakeConn) -> None:
        await conn.start_session()
        await conn.ws.close(close_code, "replaced")

    gw = fake(script)
    async with StreamingSession(gw.url) as session:
        with pytest.raises(SessionError) as caught:
            async for _ in session.results():
                pass
    assert caught.value.close_code == close_code
    assert session.reconnects == 0 and gw.attempts == 1


async def test_refused_first_connection_raises_with_the_close_code(
    service_factory: ServiceFactory,
) -> None:
    """A wrong API key against the real gateway: connect() raises SessionError carrying
    4401 and `unauthorized`, and nothing is left running."""
    svc = await service_factory(with_worker=False, api_keys=("right",))
    session = StreamingSession(svc.url, api_key="wrong")
    with pytest.raises(SessionError) as caught:
        await session.connect()
    assert caught.value.close_code == 4401 and caught.value.code == "unauthorized"
    await session.aclose()


# --- connection state, keepalive, re-sending -------------------------------------------


async def test_keepalives_flow_while_no_audio_does(fake: Callable[..., FakeGateway]) -> None:
    """With no audio to send, the SDK sends `keepalive` messages so idle links stay up."""

    async def script(conn: FakeConn) -> None:
        await conn.start_session()
        await serve_audio(conn)

    gw = fake(script)
    async with StreamingSession(gw.url, keepalive_s=0.1):
        await wait_for(
            lambda: gw.conns and [m["type"] for m in gw.conns[0].texts].count("keepalive") >= 3,
            "three keepalives",
            timeout_s=10,
        )
    assert not gw.conns[0].audio


async def test_resume_resends_exactly_from_next_seq(fake: Callable[..., FakeGateway]) -> None:
    """After a drop, the SDK resumes with its last final, drops what the server says it
    has (next_seq), re-sends the rest in order, then carries on with new frames; a final
    replayed on the new connection is not delivered twice."""
    audio = frames(14)
    first_batch = threading.Event()

    async def script(conn: FakeConn) -> None:
        if conn.index == 0:
            await conn.start_session()
            while len(conn.audio) < 10:
                await conn.recv()
            await conn.ws.send(json.dumps({"type": "ack", "seq": 3}))
            await conn.ws.send(json.dumps(final(0)))
            first_batch.set()
            await conn.ws.close(1012, "draining")
            return
        resume = await conn.expect_resume()
        assert resume["last_result_id"] == 0
        await conn.resumed(6)
        await conn.ws.send(json.dumps(final(0)))  # a replay the SDK must drop
        while True:
            msg = await conn.recv()
            if isinstance(msg, str) and json.loads(msg)["type"] == "close_stream":
                break
        await conn.ws.send(json.dumps(final(1)))
        await conn.ws.send(closed(2))
        await conn.ws.close(1000, "session closed")

    gw = fake(script)
    got: list[Transcript | Closed] = []
    async with StreamingSession(gw.url, backoff_s=0.01, max_backoff_s=0.01) as session:
        for frame in audio[:10]:
            await session.send_audio(frame)
        await asyncio.to_thread(first_batch.wait, 10)
        for frame in audio[10:]:
            await session.send_audio(frame)
        await session.close_stream()
        got = [r async for r in session.results()]
    assert gw.conns[1].audio == audio[6:]
    assert [r.result_id for r in got if isinstance(r, Transcript)] == [0, 1]
    assert isinstance(got[-1], Closed) and session.reconnects == 1


def final(result_id: int) -> dict[str, Any]:
    return {
        "type": "transcript",
        "result_id": result_id,
        "is_final": True,
        "start": 0.0,
        "end": 1.0,
        "text": f"final {result_id}",
        "words": [],
    }


def closed(finals: int) -> str:
    return json.dumps(
        {
            "type": "session.closed",
            "reason": "client_closed",
            "audio_seconds": 1.0,
            "final_results": finals,
        }
    )


def rollback_script(next_seq: int) -> Script:
    """Connection 0 acks 10 frames then drops; the resume says the service has only
    `next_seq` frames (it lost acknowledged ones), then acks whatever comes."""

    async def script(conn: FakeConn) -> None:
        if conn.index == 0:
            await conn.start_session()
            while len(conn.audio) < 10:
                await conn.recv()
            await conn.ws.send(json.dumps({"type": "ack", "seq": 9}))
            await conn.ws.close(1012, "storage temporarily unavailable")
            return
        await conn.expect_resume()
        await conn.resumed(next_seq)
        await serve_audio(conn)

    return script


async def test_acknowledged_frames_the_service_lost_are_sent_again(
    fake: Callable[..., FakeGateway],
) -> None:
    """If a resume reports a next_seq at or below an acknowledged frame (Redis lost writes
    in a crash), the SDK re-sends those frames from the acknowledged audio it retains."""
    gw = fake(rollback_script(7))
    audio = frames(10)
    async with StreamingSession(gw.url, backoff_s=0.01, max_backoff_s=0.01) as session:
        for frame in audio:
            await session.send_audio(frame)
        await wait_for(lambda: len(gw.conns) == 2 and len(gw.conns[1].audio) == 3, "re-sent")
    assert gw.conns[1].audio == audio[7:]
    assert session.rewound_frames == 3 and session.reconnects == 1


async def test_lost_acknowledged_frames_not_retained_end_the_session(
    fake: Callable[..., FakeGateway],
) -> None:
    """Without retained audio (retain_acked_s=0) the same rollback ends the session with
    `audio_lost` rather than numbering later frames wrongly."""
    gw = fake(rollback_script(7))
    async with StreamingSession(
        gw.url, backoff_s=0.01, max_backoff_s=0.01, retain_acked_s=0
    ) as session:
        for frame in frames(10):
            await session.send_audio(frame)
        with pytest.raises(SessionError) as caught:
            async for _ in session.results():
                pass
    assert caught.value.code == "audio_lost"
    assert len(gw.conns) == 2 and not gw.conns[1].audio


async def test_audio_is_buffered_while_disconnected_up_to_the_limit(
    fake: Callable[..., FakeGateway],
) -> None:
    """While the gateway refuses reconnects, send_audio keeps accepting frames without
    blocking, up to max_buffered_frames (then AudioBufferFull, the frame not taken); once
    the link is back every buffered frame arrives after session.resumed, in order."""
    let_in = threading.Event()

    async def script(conn: FakeConn) -> None:
        if conn.index == 0:
            await conn.start_session()
            await conn.ws.close(1012, "draining")
            return
        await conn.expect_resume()
        await conn.resumed(0)
        await serve_audio(conn)

    gw = fake(script, http_status=lambda i: None if i == 0 or let_in.is_set() else 503)
    audio = frames(6)
    async with StreamingSession(
        gw.url, max_buffered_frames=5, max_reconnects=1000, backoff_s=0.01, max_backoff_s=0.02
    ) as session:
        await wait_for(lambda: gw.attempts >= 2, "a refused reconnect attempt")
        assert not session.connected
        async with asyncio.timeout(5):  # buffering never waits for the connection
            seqs = [await session.send_audio(frame) for frame in audio[:5]]
        assert seqs == [0, 1, 2, 3, 4] and session.unacked_frames == 5
        with pytest.raises(AudioBufferFull, match="max_buffered_frames=5"):
            await session.send_audio(audio[5])
        let_in.set()
        await wait_for(lambda: session.acked_seq == 4, "acks for the buffered frames")
        assert await session.send_audio(audio[5]) == 5
        await wait_for(lambda: session.acked_seq == 5, "the ack of the sixth frame")
    assert gw.conns[1].audio == audio


async def test_a_dead_link_is_noticed_and_the_session_resumed(
    service_factory: ServiceFactory,
) -> None:
    """A link that silently drops every byte (no FIN, no RST) is noticed by the SDK's
    pings; it reconnects once the link works again and the session ends complete."""
    svc = await service_factory()
    proxy = TcpProxy(svc.gateway.port)
    await proxy.start()
    try:
        audio = fixture("s2.wav").frames(100)
        async with StreamingSession(
            proxy.url(svc.url),
            ping_interval_s=0.2,
            ping_timeout_s=0.3,
            backoff_s=0.05,
            open_timeout_s=1.0,
        ) as session:
            for frame in audio[:20]:
                await session.send_audio(frame)
            await wait_for(lambda: session.acked_seq == 19, "acks of the first frames")
            proxy.blackhole()
            await wait_for(lambda: not session.connected, "the SDK noticing the dead link")
            for frame in audio[20:]:
                await session.send_audio(frame)
            proxy.restore()
            await session.close_stream()
            results = [r async for r in session.results()]
        assert session.reconnects >= 1
        assert session.acked_seq == len(audio) - 1
        finals = [r.result_id for r in results if isinstance(r, Transcript) and r.is_final]
        assert isinstance(results[-1], Closed) and results[-1].final_results == len(finals)
        assert finals == list(range(len(finals)))
    finally:
        await proxy.close()


# --- cleanup ---------------------------------------------------------------------------


async def test_aclose_leaves_no_task_or_socket_after_success_or_failure(
    fake: Callable[..., FakeGateway],
) -> None:
    """After aclose() - following a normal end, a fatal error, and a reconnect loop that
    was still running - none of the SDK's tasks is left and the server sees no open
    connection."""

    async def script(conn: FakeConn) -> None:
        if conn.index == 0:  # session A: normal end
            await conn.start_session()
            await conn.recv()  # close_stream
            await conn.ws.send(closed(0))
            await conn.ws.close(1000, "session closed")
        elif conn.index == 1:  # session B: fatal close
            await conn.start_session()
            await conn.ws.close(4403, "no")
        elif conn.index == 2:  # session C: dropped; its resumes hang until aclose
            await conn.start_session()
            await conn.ws.close(1012, "draining")
        else:
            await conn.expect_resume()
            await conn.ws.wait_closed()  # never answers: the SDK is mid-resume

    gw = fake(script)
    before = asyncio.all_tasks()
    a = StreamingSession(gw.url)
    await a.connect()
    await a.close_stream()
    assert [type(r) for r in [r async for r in a.results()]] == [Closed]
    await a.aclose()
    b = StreamingSession(gw.url)
    await b.connect()
    with pytest.raises(SessionError):
        async for _ in b.results():
            pass
    await b.aclose()
    c = StreamingSession(gw.url, backoff_s=0.01, max_backoff_s=0.01, open_timeout_s=30)
    await c.connect()
    await wait_for(lambda: gw.attempts >= 4, "a resume attempt in progress")
    await c.aclose()
    await c.aclose()  # idempotent
    await wait_for(lambda: not asyncio.all_tasks() - before, "every SDK task to finish")
    for s in (a, b, c):
        assert s._ws is None or s._ws.state is State.CLOSED
    await wait_for(lambda: gw.open == 0, "the server to see every connection closed")
    with pytest.raises(SessionError):
        await c.send_audio(b"\0\0")


async def test_the_example_in_docs_client_md_runs(
    service_factory: ServiceFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The runnable example of docs/client.md, taken from the page as it is, streams a WAV
    file to a service found through up.json and prints its finals and summary."""
    svc = await service_factory()
    (tmp_path / "up.json").write_text(json.dumps({"url": svc.url, "cafile": None}))
    clip = fixture("s1.wav")
    wav = tmp_path / "short.wav"
    with wave.open(str(wav), "wb") as w:  # the first 1.5 s: the example streams in real time
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(clip.sample_rate)
        w.writeframes(clip.data[: clip.bytes_per_second * 3 // 2])
    page = (Path(__file__).parents[2] / "docs" / "client.md").read_text()
    code = re.findall(r"```python\n(.*?)```", page, re.S)[0]
    namespace: dict[str, Any] = {"__name__": "docs_client_example"}
    exec(compile(code, "docs/client.md", "exec"), namespace)
    assert await namespace["main"](str(wav), str(tmp_path)) == 0
    out = capsys.readouterr().out
    assert re.search(r"^\d+ finals, 1\.5s audio, 0 reconnect\(s\)$", out, re.M), out


@pytest.mark.parametrize(
    ("setting", "value"),
    [
        ("max_reconnects", -1),
        ("backoff_s", 0.0),
        ("max_buffered_frames", 0),
        ("keepalive_s", 0.0),
        ("retain_acked_s", -0.001),
        ("collect_after_limit_s", -0.001),
    ],
)
def test_bad_sdk_settings_are_refused_and_their_edges_taken(setting: str, value: float) -> None:
    """Each of the SDK's checked settings just past its edge raises ValueError naming it;
    at the edge (0 where 0 is allowed, 1 frame, 1 ms) the session is built."""
    url = "ws://127.0.0.1:9/v1/listen"  # never connected: only the settings are checked
    with pytest.raises(ValueError, match=setting):
        StreamingSession(url, **cast(dict[str, Any], {setting: value}))
    edge = {
        "max_reconnects": 0,
        "backoff_s": 0.001,
        "max_buffered_frames": 1,
        "keepalive_s": 0.001,
        "retain_acked_s": 0.0,
        "collect_after_limit_s": 0.0,
    }[setting]
    session = StreamingSession(url, **cast(dict[str, Any], {setting: edge}))
    if setting == "retain_acked_s":
        assert session._retain_bytes == 0
    else:
        assert getattr(session, setting) == edge
