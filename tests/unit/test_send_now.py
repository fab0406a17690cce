"""`gateway.connection.send_now`: when an ack may skip `ws.send`'s machinery. The
decision alone, on a stand-in connection (the real path runs in every integration test),
and the frame it writes, against websockets' own framing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from gateway.connection import send_now, text_frame


@dataclass
class Transport:
    size: int = 0
    high: int = 65536
    written: list[bytes] = field(default_factory=list)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def get_write_buffer_size(self) -> int:
        return self.size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self.high // 4, self.high)


@dataclass
class Protocol:
    state: State = State.OPEN
    extensions: list[object] = field(default_factory=list)
    writes: list[bytes] = field(default_factory=list)


@dataclass
class Ws:
    protocol: Protocol = field(default_factory=Protocol)
    transport: Transport = field(default_factory=Transport)
    send_in_progress: Any = None


def test_an_open_idle_connection_gets_the_frame_at_once() -> None:
    ws = Ws()
    assert send_now(ws, '{"type":"ack","seq":3}')  # type: ignore[arg-type]
    assert ws.transport.written == [b'\x81\x16{"type":"ack","seq":3}']


@pytest.mark.parametrize(
    "ws",
    [
        Ws(protocol=Protocol(state=State.CLOSING)),  # closing: ws.send raises properly
        Ws(send_in_progress=object()),  # a fragmented message is being sent
        Ws(transport=Transport(size=65536)),  # at the high-water mark: back-pressure
        Ws(protocol=Protocol(extensions=[object()])),  # compression: websockets frames it
        Ws(protocol=Protocol(writes=[b"pong"])),  # websockets' own bytes must go first
    ],
    ids=["closing", "fragmented", "buffer-full", "extension", "pending-writes"],
)
def test_otherwise_the_caller_must_await_ws_send(ws: Ws) -> None:
    assert not send_now(ws, "x")  # type: ignore[arg-type]
    assert ws.transport.written == []


def test_without_the_fragment_attribute_it_never_takes_the_shortcut() -> None:
    class Old:  # websockets < 15 has no `send_in_progress`
        protocol = Protocol()
        transport = Transport()

    assert not send_now(Old(), "x")  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_is_websockets_framing(size: int) -> None:
    data = b"x" * size
    assert text_frame(data) == Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])
