"""`streamscribe loadtest` for real: an in-process gateway and worker (null engine), a real
Valkey, real WebSockets and TLS, the command's own argument parsing."""

from __future__ import annotations

import io
import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from shared.cli import build_parser, main
from shared.loadstats import LoadReport
from shared.loadtest import Options
from tests.conftest import FIXTURES, ServiceFactory
from tests.helpers import hget

S1, S2, S1_STEREO = (str(FIXTURES / n) for n in ("s1.wav", "s2.wav", "s1_8k_stereo.wav"))


def parse(*argv: str) -> Any:
    return build_parser().parse_args(["loadtest", "--no-progress", *argv])


async def run_cli(*argv: str) -> tuple[int, str, str]:
    from shared.loadtest import loadtest_main

    out, err = io.StringIO(), io.StringIO()
    code = await loadtest_main(parse(*argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_consistent(report: LoadReport) -> None:
    assert report.completed == report.sessions_total and report.all_completed
    assert report.failed == report.unfinished == 0
    assert report.errors_by_close_code == {} and report.error_messages == {}
    assert report.anomalies == {}
    assert report.frames_sent == report.frames_acked > 0
    assert report.finals_received == report.finals_reported > 0
    assert report.metrics["ack_latency_s"].count == report.frames_sent
    assert report.metrics["final_lag_s"].count == report.finals_received
    assert report.metrics["completion_s"].count == report.sessions_total
    assert report.metrics["connect_s"].count == report.sessions_total
    for s in report.per_session:
        assert s.status == "completed" and s.close_code == 1000
        assert s.frames_sent == s.frames_acked
        assert s.finals_received == s.finals_reported
        assert s.audio_s_reported is not None
        assert s.audio_s_reported == pytest.approx(s.audio_s_sent, abs=0.01)


async def test_five_sessions_complete_and_add_up(
    service_factory: ServiceFactory, tmp_path: Path
) -> None:
    """Five sessions at pace 0 over two files all complete; frames sent == frames acked,
    finals received == finals reported in session.closed; the JSON is written and parses
    back into the same report the table was printed from."""
    svc = await service_factory()
    out_json = tmp_path / "load.json"
    code, table, _ = await run_cli(
        "--url", svc.url, "--sessions", "5", "--pace", "0", "--audio", S1, S2,
        "--json", str(out_json),
    )  # fmt: skip
    assert code == 0, table
    report = LoadReport.from_dict(json.loads(out_json.read_text()))
    check_consistent(report)
    assert report.sessions_total == 5
    assert [s.audio for s in report.per_session] == ["s1.wav", "s2.wav"] * 2 + ["s1.wav"]
    assert len({s.session_id for s in report.per_session}) == 5
    assert report.wer is not None and report.wer.sessions == 5  # both files have a .txt
    assert "sessions: 5 completed, 0 failed, 0 unfinished (of 5)" in table
    assert report.render_table() == table


async def test_paced_looped_run_with_ramp(service_factory: ServiceFactory) -> None:
    """At 8x real time with a ramp and --duration-s, each session loops its file to whole
    copies and the stereo 8 kHz file is sent as declared; the generator reports its own
    send delay for every frame."""
    from shared.loadtest import load_clip, prepare, run_load

    svc = await service_factory()
    args = parse(
        "--url", svc.url, "--sessions", "3", "--pace", "8", "--ramp-s", "0.3",
        "--duration-s", "10", "--audio", S1, S1_STEREO, "--no-interim",
    )  # fmt: skip
    options, clips = prepare(args)
    report, recorder = await run_load(options, clips)
    check_consistent(report)
    one = load_clip(S1, 100)
    for s in report.per_session:
        assert s.audio_s_sent == pytest.approx(2 * one.duration_s, abs=0.01)  # 2 copies >= 10 s
        assert s.interims_received == 0
    assert report.metrics["send_delay_s"].count == report.frames_sent
    assert report.metrics["first_interim_s"].count == 0
    # the looped reference is the text repeated
    ref = (FIXTURES / "s1.txt").read_text().strip()
    assert recorder.sessions[0].reference == f"{ref} {ref}"


async def test_tls_with_dev_certificate(
    service_factory: ServiceFactory, dev_cert: tuple[Path, Path], tmp_path: Path
) -> None:
    """Over wss:// the run trusts the dev certificate given with --cafile, and --plot
    writes a PNG."""
    pytest.importorskip("matplotlib")
    svc = await service_factory(tls=True)
    assert svc.url.startswith("wss://")
    png = tmp_path / "load.png"
    code, table, err = await run_cli(
        "--url", svc.url, "--cafile", str(dev_cert[0]), "--sessions", "2", "--pace", "0",
        "--audio", S2, "--plot", str(png),
    )  # fmt: skip
    assert code == 0, table + err
    assert "2 completed, 0 failed" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_tls_without_trust_fails_every_session(
    service_factory: ServiceFactory,
) -> None:
    """Without the CA the certificate check fails: exit 1, failures reported, no hang."""
    svc = await service_factory(tls=True)
    code, table, _ = await run_cli("--url", svc.url, "--sessions", "2", "--audio", S1)
    assert code == 1
    assert "sessions: 0 completed, 2 failed, 0 unfinished (of 2)" in table
    assert "no connection: 2" in table
    assert "SSLCertVerificationError" in table


async def test_wrong_api_key_is_reported_by_close_code(service_factory: ServiceFactory) -> None:
    """A refused key shows up as close code 4401 and error message `unauthorized`."""
    svc = await service_factory(api_keys=("right-key",))
    code, table, _ = await run_cli(
        "--url", svc.url, "--api-key", "wrong", "--sessions", "2", "--audio", S1
    )
    assert code == 1
    assert "errors by close code: 4401: 2" in table
    assert "error messages: unauthorized: 2" in table


async def test_language_reaches_the_gateway(service_factory: ServiceFactory) -> None:
    """`--language de` is sent with every session: an English-only service (tiny.en)
    refuses each one with 4400, a multilingual one (base) serves them all."""
    english_only = await service_factory()
    code, table, _ = await run_cli(
        "--url", english_only.url, "--sessions", "2", "--pace", "0", "--audio", S1,
        "--language", "de",
    )  # fmt: skip
    assert code == 1, table
    assert "sessions: 0 completed, 2 failed, 0 unfinished (of 2)" in table
    assert "4400" in table
    multilingual = await service_factory(model="base")
    from shared.loadtest import prepare, run_load

    args = parse(
        "--url", multilingual.url, "--sessions", "2", "--pace", "0", "--audio", S1,
        "--language", "de",
    )  # fmt: skip
    report, _ = await run_load(*prepare(args))
    check_consistent(report)
    assert report.run.language == "de"


async def test_high_share_reaches_the_gateway_per_lane(
    service_factory: ServiceFactory, redis: aioredis.Redis
) -> None:
    """--high-share 0.5 opens every second session with priority=high: the gateway stores
    that priority with each session, and the report gives each lane its own counts."""
    from shared import keys
    from shared.loadtest import prepare, run_load

    svc = await service_factory()
    args = parse(
        "--url", svc.url, "--sessions", "4", "--pace", "0", "--audio", S1, "--high-share", "0.5"
    )  # fmt: skip
    report, _ = await run_load(*prepare(args))
    check_consistent(report)
    assert [s.priority for s in report.per_session] == ["normal", "high"] * 2
    for s in report.per_session:
        assert s.session_id is not None
        stored = await hget(redis, keys.meta(keys.SessionId(s.session_id)), "priority")
        assert stored is not None and stored.decode() == s.priority
    assert list(report.lanes) == ["high", "normal"]
    firsts = sum(lane.first_interim.count for lane in report.lanes.values())
    assert firsts == report.metrics["first_interim_s"].count
    for lane in report.lanes.values():
        assert (lane.sessions, lane.completed, lane.failed, lane.overloaded) == (2, 2, 0, 0)
        assert lane.final_lag.count == report.finals_received // 2
    table = report.render_table()
    assert "0.5 of sessions priority=high" in table
    assert any(line.split()[:4] == ["high", "2", "2", "0"] for line in table.splitlines())


async def test_high_priority_refused_for_a_key_shows_in_its_lane(
    service_factory: ServiceFactory,
) -> None:
    """With API keys, priority=high needs a key listed in high_priority_keys: for any other
    key the high lane's sessions fail with 4400 and the normal lane's complete."""
    svc = await service_factory(api_keys=("plain",), high_priority_keys=())
    code, table, _ = await run_cli(
        "--url", svc.url, "--api-key", "plain", "--sessions", "4", "--pace", "0",
        "--audio", S1, "--high-share", "0.5",
    )  # fmt: skip
    assert code == 1, table
    assert "sessions: 2 completed, 2 failed, 0 unfinished (of 4)" in table
    assert "errors by close code: 4400: 2" in table
    rows = {
        row[0]: row[1:6]
        for row in (line.split() for line in table.splitlines())
        if row[:1] in (["high"], ["normal"])
    }
    assert rows["high"] == ["2", "0", "2", "0", "0"]
    assert rows["normal"] == ["2", "2", "0", "0", "0"]


async def test_without_audio_the_built_in_samples_are_streamed(
    service_factory: ServiceFactory,
) -> None:
    """No --audio: the four sample utterances shipped with the worker are streamed, with
    their texts as references, and stderr says that they are synthetic speech."""
    svc = await service_factory()
    code, table, err = await run_cli("--url", svc.url, "--sessions", "5", "--pace", "0")
    assert code == 0, table + err
    assert "built-in sample utterances (synthetic speech" in err
    assert "  audio: c1.wav, c2.wav, c3.wav, c4.wav\n" in table
    assert "sessions: 5 completed, 0 failed" in table
    assert "WER: " in table and "over 5 completed session(s)" in table


def test_refused_connection_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    """Against a closed loopback port every session fails and the exit code is 1."""
    url = f"ws://127.0.0.1:{closed_port()}/v1/listen"
    code = main(["loadtest", "--no-progress", "--url", url, "--sessions", "3", "--audio", S1])
    assert code == 1
    out = capsys.readouterr().out
    assert "sessions: 0 completed, 3 failed, 0 unfinished (of 3)" in out
    assert "ConnectionRefusedError" in out


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """`loadtest --help` documents every flag of the command."""
    with pytest.raises(SystemExit) as exc:
        main(["loadtest", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--url", "--sessions", "--audio", "--pace", "--ramp-s", "--duration-s",
        "--drain-timeout-s", "--frame-ms", "--no-interim", "--max-unacked-frames",
        "--open-timeout-s", "--insecure", "--cafile", "--api-key", "--json", "--plot",
        "--no-progress", "--state-dir", "--tick-ms", "--language", "--high-share",
    ):  # fmt: skip
        assert flag in text, flag
    assert "loadtest" in build_parser().format_help()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sessions", "0"], "--sessions must be at least 1"),
        (["--pace", "-1"], "--pace must be >= 0"),
        (["--duration-s", "0"], "--duration-s must be > 0"),
        (["--tick-ms", "-0.5"], "--tick-ms must be 0..100"),
        (["--tick-ms", "100.5"], "--tick-ms must be 0..100"),
        (["--url", "http://127.0.0.1:1/v1/listen"], "--url must be ws:// or wss://"),
        (["--json", "/nonexistent-dir/x.json"], "no such directory"),
        (["--language", "German"], "--language must be an ISO 639 code"),
        (["--high-share", "-0.01"], "--high-share must be 0..1"),
        (["--high-share", "1.01"], "--high-share must be 0..1"),
        (["--high-share", "nan"], "--high-share must be 0..1"),
    ],
)
def test_usage_errors_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad flag values are usage errors: a message naming the flag, exit code 2."""
    url = ["--url", "ws://127.0.0.1:1/v1/listen"] if "--url" not in argv else []
    assert main(["loadtest", *url, "--audio", S1, *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("tick_ms", [0.0, 100.0])
def test_tick_at_its_edges_is_accepted(tick_ms: float) -> None:
    options = Options(url="ws://127.0.0.1:1/v1/listen", sessions=1, audio=(S1,), tick_ms=tick_ms)
    assert options.tick_ms == tick_ms


@pytest.mark.parametrize(
    ("sessions", "share", "high"),
    [
        (8, 0.0, []),
        (8, 0.25, [3, 7]),
        (3, 1 / 3, [2]),
        (10, 0.7, [1, 2, 4, 5, 7, 8, 9]),
        (4, 1.0, [0, 1, 2, 3]),
        (5, 0.1, []),  # floor(0.5): no session
    ],
)
def test_high_share_picks_floor_of_sessions_spread_evenly(
    sessions: int, share: float, high: list[int]
) -> None:
    """--high-share F makes floor(N x F) sessions high priority, spread through the ramp;
    0 and 1 are allowed; only high sessions name a priority in their URL."""
    options = Options(
        url="ws://127.0.0.1:1/v1/listen", sessions=sessions, audio=(S1,), high_share=share
    )
    lanes = [options.priority(i) for i in range(sessions)]
    assert [i for i, lane in enumerate(lanes) if lane == "high"] == high
    assert set(lanes) <= {"high", "normal"}
    from shared.loadtest import load_clip

    clip = load_clip(S1, 100)
    assert "priority=high" in options.session_url(clip, "high")
    assert "priority" not in options.session_url(clip, "normal")


def test_unreadable_audio_and_missing_up_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file that is not a WAV, or no --url and no running `up`, exit 2 with a message."""
    bogus = tmp_path / "x.wav"
    bogus.write_bytes(b"not a wav")
    assert main(["loadtest", "--url", "ws://127.0.0.1:1/", "--audio", str(bogus)]) == 2
    assert "not a RIFF/WAVE file" in capsys.readouterr().err
    assert main(["loadtest", "--state-dir", str(tmp_path), "--audio", S1]) == 2
    assert "no running `streamscribe up`" in capsys.readouterr().err


def test_plot_without_matplotlib_names_the_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """--plot with matplotlib missing stops before any session starts, naming the fix."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    argv = ["loadtest", "--url", "ws://127.0.0.1:1/", "--audio", S1, "--plot"]
    assert main([*argv, str(tmp_path / "p.png")]) == 2
    assert "pip install matplotlib" in capsys.readouterr().err


class Recorder:
    """A `MessageHandler` that keeps what it is given; raises on the message 'boom'."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self.messages: list[str | bytes] = []

    def __call__(self, ws: object, raw: str | bytes) -> None:
        if raw == "boom":
            raise RuntimeError("handler bug")
        self.messages.append(raw)


async def test_callback_connection_joins_fragments_and_keeps_order() -> None:
    """The load generator's connection hands over whole messages, in order, fragmented
    or not, text as str and binary as bytes; invalid UTF-8 in a text message stays bytes;
    pings still work; a handler that raises ends that connection with its error kept."""
    import functools
    from typing import cast

    from websockets.asyncio.client import ClientConnection, connect
    from websockets.asyncio.server import ServerConnection, serve

    from shared.loadtest import CallbackConnection

    async def server(ws: ServerConnection) -> None:
        await ws.send("one")
        await ws.send(["tw", "o"])  # one message in two frames
        await ws.send(b"\x00\x01")
        await ws.send([b"\x02", b"\x03"])
        await ws.send("three")
        ws.protocol.send_text(b"\xff\xfe")  # not UTF-8: websockets would fail it
        ws.send_data()  # flush the raw frame
        await ws.ping()
        await ws.send(await ws.recv())  # echoes the client's message (boom)

    async with serve(server, "127.0.0.1", 0) as srv:
        port = srv.sockets[0].getsockname()[1]
        rec = Recorder()
        factory = cast("type[ClientConnection]", functools.partial(CallbackConnection, rec))
        ws = await connect(f"ws://127.0.0.1:{port}", create_connection=factory)
        await ws.send("boom")
        await ws.wait_closed()
    assert rec.messages == ["one", "two", b"\x00\x01", b"\x02\x03", "three", b"\xff\xfe"]
    assert isinstance(rec.error, RuntimeError) and str(rec.error) == "handler bug"


async def test_callback_connection_cuts_text_frames_itself_and_leaves_the_rest() -> None:
    """Once open, the load generator's connection cuts frames itself: each unfragmented
    text message goes to the handler without websockets' parser, every other frame
    (binary, fragments, close) through websockets, all in order, even when the bytes
    arrive a few at a time. A frame over `max_size` still ends the connection with 1009
    before the handler sees it. (No compression, as the load generator connects.)"""
    import asyncio
    import functools
    from typing import cast

    from websockets.asyncio.client import ClientConnection, connect
    from websockets.asyncio.server import ServerConnection, serve
    from websockets.frames import Frame, Opcode

    from shared.loadtest import CallbackConnection

    frames = [
        Frame(Opcode.TEXT, b'{"type":"ack","seq":0}'),
        Frame(Opcode.TEXT, "é".encode() * 100),  # 200 bytes: a 16-bit length
        Frame(Opcode.BINARY, b"\x01\x02"),
        Frame(Opcode.TEXT, b"fr", fin=False),
        Frame(Opcode.CONT, b"ag", fin=True),
        Frame(Opcode.TEXT, b"last"),
    ]
    wire = b"".join(f.serialize(mask=False, extensions=[]) for f in frames)
    too_big = Frame(Opcode.TEXT, b"x" * 300).serialize(mask=False, extensions=[])

    async def server(ws: ServerConnection) -> None:
        payload = too_big if await ws.recv() == "big" else wire
        for i in range(0, len(payload), 7):  # a few bytes at a time
            ws.transport.write(payload[i : i + 7])
            await asyncio.sleep(0)  # let each piece go out on its own if it will
        await ws.wait_closed() if payload is too_big else await ws.close()

    async with serve(server, "127.0.0.1", 0) as srv:
        port = srv.sockets[0].getsockname()[1]
        rec = Recorder()
        factory = cast("type[ClientConnection]", functools.partial(CallbackConnection, rec))
        ws = await connect(f"ws://127.0.0.1:{port}", create_connection=factory, compression=None)
        await ws.send("go")
        await ws.wait_closed()
        conn = cast("CallbackConnection", ws)
        assert rec.messages == ['{"type":"ack","seq":0}', "é" * 100, b"\x01\x02", "frag", "last"]
        assert (conn.direct, conn.slow_frames) == (3, 4)  # 3 fragments/binary + the close

        big = Recorder()
        factory = cast("type[ClientConnection]", functools.partial(CallbackConnection, big))
        ws = await connect(
            f"ws://127.0.0.1:{port}", create_connection=factory, compression=None, max_size=100
        )
        await ws.send("big")
        await ws.wait_closed()
        assert big.messages == []
        assert ws.protocol.close_sent is not None and ws.protocol.close_sent.code == 1009
