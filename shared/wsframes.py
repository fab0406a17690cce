"""WebSocket framing shared by the gateway and the load generator: where a frame's payload
lies in a buffer (`frame_bounds`), and whether websockets' parser stands between frames so
that framing may be taken over from it (`parser_at_boundary`).

Both sides cut the frames of their busiest message (the gateway: each client's audio; the
load generator: each ack) themselves and hand every other frame to websockets whole, which
parses, checks and answers it as it always does (see `gateway/wsconn.py`).
"""

from __future__ import annotations

from typing import Any

from websockets.protocol import Protocol, State


def frame_bounds(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """Where the frame that starts at `pos` has its payload: (payload start, payload
    end), or None if `buf` does not yet hold its whole header. The payload end may lie
    past `len(buf)` (the frame is not complete yet); a masked frame's key is the 4
    bytes before the payload start (RFC 6455, 5.2)."""
    avail = len(buf) - pos
    if avail < 2:
        return None
    second = buf[pos + 1]
    length = second & 0x7F
    head = 2
    if length == 126:
        head = 4
    elif length == 127:
        head = 10
    if second & 0x80:
        head += 4
    if avail < head:
        return None
    if length == 126:
        length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
    elif length == 127:
        length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
    return pos + head, pos + head + length


#: What the framing reads of websockets' protocol (websockets >= 15).
_PROTOCOL_ATTRIBUTES = ("max_message_size", "max_fragment_size", "current_size", "reader")


def parser_at_boundary(protocol: Protocol) -> bool:
    """Whether websockets' parser holds nothing: no bytes, no events not yet taken, and
    it waits at the top of its loop for a new frame, not inside one (a client may send
    bytes right behind its handshake, which the parser starts on at once). Also False
    with an extension (compression), whose frames only websockets can read. Anything
    unexpected in websockets' internals (an older version) also says False: framing then
    stays with websockets, which is only slower."""
    if not all(hasattr(protocol, a) for a in _PROTOCOL_ATTRIBUTES):
        return False  # an older websockets: its limits and state are named otherwise
    if protocol.extensions or protocol.reader.buffer or protocol.events:
        return False
    gen: Any = getattr(protocol, "parser", None)
    while (inner := getattr(gen, "gi_yieldfrom", None)) is not None:
        gen = inner
    code = getattr(gen, "gi_code", None)
    return getattr(code, "co_name", None) == "at_eof"


def framing_state(protocol: Protocol) -> bool | None:
    """For a connection that may cut its frames itself: None while the handshake runs (ask
    again with the next bytes), then, once open, `parser_at_boundary` (decided once: from
    then on websockets only ever gets whole frames, so it stays at a boundary)."""
    if protocol.state is not State.OPEN:
        return None
    return parser_at_boundary(protocol)


def frame_limit(protocol: Protocol) -> int | None:
    """The largest frame payload websockets would take (`max_size`, and
    `max_fragment_size` where set): a frame over it goes to websockets as soon as its
    header is in, to be refused there (1009) before its payload is buffered."""
    limit: int | None = protocol.max_message_size
    if protocol.max_fragment_size is not None:
        limit = min(protocol.max_fragment_size, limit or protocol.max_fragment_size)
    return limit
