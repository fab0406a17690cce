"""`frame_bounds` (gateway/wsconn.py) cuts frames as websockets' own parser does."""

from __future__ import annotations

import pytest
from websockets.frames import Frame, Opcode

from gateway.wsconn import frame_bounds


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
