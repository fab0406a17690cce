"""`frame_bounds` (shared/wsframes.py) cuts frames as websockets' own parser does, and
`parser_at_boundary` says when the gateway may take framing over from websockets."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from shared.wsframes import frame_bounds, parser_at_boundary


def wire(size: int, *, mask: bool, opcode: Opcode = Opcode.BINARY, fin: bool = True) -> bytes:
    return Frame(opcode, bytes(range(256)) * (size // 256) + bytes(size % 256), fin).serialize(
        mask=mask, extensions=[]
    )


@pytest.mark.parametrize("size", [0, 1, 125, 126, 3200, 65535, 65536, 70000])
@pytest.mark.parametrize("mask", [True, False])
def test_bounds_of_every_length_encoding(size: int, mask: bool) -> None:
    data = wire(size, mask=mask)
    head = len(data) - size
    assert head == (2 if size < 126 else 4 if size < 65536 else 10) + (4 if mask else 0)
    assert frame_bounds(data, 0) == (head, len(data))
    # Behind other bytes, the same frame at its offset.
    assert frame_bounds(b"xyz" + data, 3) == (3 + head, 3 + len(data))


@pytest.mark.parametrize("size", [5, 300, 70000])
def test_incomplete_header_is_none_and_incomplete_payload_ends_past_the_buffer(size: int) -> None:
    data = wire(size, mask=True)
    head = len(data) - size
    for cut in range(head):
        assert frame_bounds(data[:cut], 0) is None, cut
    for cut in (head, head + 1, len(data) - 1):
        start, end = frame_bounds(data[:cut], 0) or (0, 0)
        assert (start, end) == (head, len(data))
        assert end > cut


def test_frames_in_a_row_are_cut_at_their_boundaries() -> None:
    frames = [wire(n, mask=True) for n in (0, 10, 200, 3200)]
    frames.insert(2, wire(4, mask=True, opcode=Opcode.TEXT))
    buf = b"".join(frames)
    pos, cut = 0, []
    while pos < len(buf):
        bounds = frame_bounds(buf, pos)
        assert bounds is not None
        cut.append(buf[pos : bounds[1]])
        pos = bounds[1]
    assert cut == frames


REQUEST = (
    b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def opened(extra: bytes = b"") -> ServerProtocol:
    """A server protocol after its handshake; `extra`: bytes the client sent right behind
    its request, which websockets' parser starts on when the connection opens."""
    protocol = ServerProtocol()
    protocol.receive_data(REQUEST + extra)
    request = protocol.events_received()[0]  # then any whole frame that followed it
    assert isinstance(request, Request)
    protocol.send_response(protocol.accept(request))
    return protocol


def test_a_fresh_connection_is_at_a_boundary() -> None:
    assert parser_at_boundary(opened())


@pytest.mark.parametrize("cut", [1, 2, 5, 8])
def test_part_of_a_frame_behind_the_handshake_is_not(cut: int) -> None:
    # The parser took these bytes out of its buffer and waits inside the frame.
    assert not parser_at_boundary(opened(wire(3, mask=True)[:cut]))


def test_a_whole_frame_behind_the_handshake_was_websockets_own() -> None:
    # websockets parsed it with the request, before this connection's framing began.
    assert parser_at_boundary(opened(wire(3, mask=True)))


def test_events_not_yet_taken_are_not_a_boundary() -> None:
    protocol = opened()
    protocol.receive_data(wire(3, mask=True))
    assert not parser_at_boundary(protocol)
    protocol.events_received()
    assert parser_at_boundary(protocol)


def test_whole_frames_keep_it_at_a_boundary_and_a_partial_one_does_not() -> None:
    protocol = opened()
    protocol.receive_data(wire(3200, mask=True) + wire(5, mask=True, opcode=Opcode.TEXT))
    protocol.events_received()
    assert parser_at_boundary(protocol)
    protocol.receive_data(wire(3200, mask=True)[:100])
    assert not parser_at_boundary(protocol)


def test_an_older_websockets_keeps_its_own_framing() -> None:
    protocol = opened()
    del protocol.max_fragment_size  # websockets 14 named its limits otherwise
    assert not parser_at_boundary(protocol)
