"""Unit tests for shared/envelope.py: versioned, tagged msgpack envelopes."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from shared.envelope import (
    AUDIO_TAIL,
    FIELD,
    VERSION,
    AudioChunk,
    Closed,
    Control,
    Dispatch,
    Envelope,
    Replaced,
    Transcript,
    Word,
    audio_head,
    decode,
    decode_entry,
    decode_fields,
    encode,
)
from shared.errors import EnvelopeError

SID = "0123456789abcdef0123456789abcdef"

EVERY_TYPE: list[Envelope] = [
    AudioChunk(7, b"\x00\x01\xff\xfe"),
    AudioChunk(0, b""),
    Control("finalize"),
    Control("close", "client_closed"),
    Control("close", "idle_timeout"),
    Dispatch(SID),
    Transcript(
        2,
        True,
        1.5,
        2.75,
        "héllo world",
        (Word("héllo", 1.5, 2.0, 0.875), Word("world", 2.1, 2.75, 0.5)),
    ),
    Transcript(3, False, 0.0, 0.25, "par"),
    Transcript(4, True, 0.0, 0.25, "fenced", epoch=7),
    Closed("abandoned", 61.25, 4),
    Closed("failed", 3.0, 1),
    Replaced("conn-1"),
]


def pack(body: dict[str, Any]) -> bytes:
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


@pytest.mark.parametrize("item", EVERY_TYPE, ids=lambda v: type(v).__name__)
def test_every_envelope_type_round_trips(item: Envelope) -> None:
    """decode(encode(x)) == x for every envelope type."""
    assert decode(encode(item)) == item


@pytest.mark.parametrize("item", EVERY_TYPE, ids=lambda v: type(v).__name__)
def test_every_envelope_carries_version_and_tag(item: Envelope) -> None:
    """Each encoded envelope is a msgpack map with v == VERSION and a string tag t."""
    body = msgpack.unpackb(encode(item), raw=False)
    assert body["v"] == VERSION == 1
    assert isinstance(body["t"], str)


def test_audio_bytes_are_stored_as_msgpack_bin() -> None:
    """Audio travels as binary, so it decodes back to bytes, not text."""
    body = msgpack.unpackb(encode(AudioChunk(1, b"\xff\x00")), raw=False)
    assert body["pcm"] == b"\xff\x00"


@pytest.mark.parametrize("seq", [0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**40])
@pytest.mark.parametrize("size", [0, 1, 255, 256, 3200, 65535, 65536, 70000])
def test_audio_head_and_tail_frame_the_samples_as_encode_does(seq: int, size: int) -> None:
    pcm = bytes(range(256)) * (size // 256) + bytes(size % 256)
    assert audio_head(seq, size) + pcm + AUDIO_TAIL == encode(AudioChunk(seq, pcm))


def test_audio_head_refuses_a_negative_seq() -> None:
    with pytest.raises(ValueError, match="seq"):
        audio_head(-1, 10)


def test_encoding_something_else_is_a_type_error() -> None:
    """encode refuses values that are not envelope types."""
    with pytest.raises(TypeError):
        encode("not an envelope")  # type: ignore[arg-type]


@pytest.mark.parametrize("version", [0, 2, None, "1"])
def test_unknown_version_is_rejected(version: object) -> None:
    """An envelope whose v is not 1 raises EnvelopeError naming the version."""
    body: dict[str, Any] = {"t": "dispatch", "sid": SID}
    if version is not None:
        body["v"] = version
    with pytest.raises(EnvelopeError, match="version"):
        decode(pack(body))


@pytest.mark.parametrize("tag", ["audo", "", None, 5])
def test_unknown_tag_is_rejected(tag: object) -> None:
    """An envelope with an unknown or missing tag raises EnvelopeError naming the tag."""
    with pytest.raises(EnvelopeError, match="tag"):
        decode(pack({"v": 1, "t": tag}))


@pytest.mark.parametrize(
    "body",
    [
        {"t": "audio", "pcm": b"x"},
        {"t": "audio", "seq": "x", "pcm": b"x"},
        {"t": "control"},
        {"t": "control", "kind": "pause"},
        {"t": "dispatch"},
        {"t": "transcript", "rid": 0, "final": True, "start": 0, "end": 1, "text": "a"},
        {
            "t": "transcript",
            "rid": 0,
            "final": True,
            "start": 0,
            "end": 1,
            "text": "a",
            "words": [["a", 0, 1]],
        },
        {
            "t": "transcript",
            "rid": 0,
            "final": True,
            "start": "x",
            "end": 1,
            "text": "a",
            "words": [],
        },
        {"t": "closed", "reason": "client_closed", "audio_s": 1.0},
        {"t": "replaced"},
    ],
)
def test_malformed_body_is_rejected(body: dict[str, Any]) -> None:
    """A known tag with missing or mistyped fields raises EnvelopeError, nothing else."""
    with pytest.raises(EnvelopeError):
        decode(pack({"v": 1, **body}))


def test_audio_with_integer_pcm_is_rejected() -> None:
    """An audio envelope whose pcm is a number, not bytes, is malformed."""
    with pytest.raises(EnvelopeError):
        decode(pack({"v": 1, "t": "audio", "seq": 0, "pcm": 3}))


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x81", b"\x92\x01", b"RIFF\x00\x00", b"\xa3ab"])
def test_bytes_that_are_not_msgpack_are_rejected(data: bytes) -> None:
    """Empty, truncated, invalid or trailing-garbage bytes raise EnvelopeError."""
    with pytest.raises(EnvelopeError):
        decode(data)


@pytest.mark.parametrize("value", [[1, 2], "text", 5, None])
def test_msgpack_that_is_not_a_map_is_rejected(value: object) -> None:
    """Valid msgpack that is not a map raises EnvelopeError."""
    with pytest.raises(EnvelopeError, match="not a map"):
        decode(msgpack.packb(value))


def test_decode_entry_reads_the_m_field() -> None:
    """decode_entry decodes the envelope in field b'm' and ignores the operator fields."""
    item = AudioChunk(4, b"\x01\x02")
    assert decode_entry({b"t": b"audio", b"seq": b"4", FIELD: encode(item)}) == item


def test_decode_entry_without_m_field_is_rejected() -> None:
    """A stream entry without field m raises EnvelopeError saying so."""
    with pytest.raises(EnvelopeError, match="'m'"):
        decode_entry({b"t": b"audio"})


def test_decode_entry_with_text_keys_is_rejected() -> None:
    """A field map with str keys (decode_responses=True) is not silently accepted."""
    with pytest.raises(EnvelopeError):
        decode_entry({"m": encode(Dispatch(SID))})  # type: ignore[dict-item]


def test_decode_entry_with_garbage_in_m_is_rejected() -> None:
    """A stream entry whose m field is not an envelope raises EnvelopeError."""
    with pytest.raises(EnvelopeError):
        decode_entry({FIELD: b"\xc1"})


def test_decode_fields_reads_the_m_field_of_a_flat_list() -> None:
    """decode_fields takes XREAD's flat (field, value, ...) list; m may be anywhere, and
    a value that happens to equal b'm' is not taken for the field."""
    item = AudioChunk(4, b"\x01\x02")
    assert decode_fields([b"seq", b"4", FIELD, encode(item)]) == item
    assert decode_fields([FIELD, encode(item), b"seq", b"4"]) == item
    assert decode_fields([b"t", FIELD, FIELD, encode(item)]) == item


@pytest.mark.parametrize("fields", [[], [b"seq", b"4"], [b"t", FIELD], [FIELD]])
def test_decode_fields_without_m_field_is_rejected(fields: list[bytes]) -> None:
    with pytest.raises(EnvelopeError, match="'m'"):
        decode_fields(fields)


@pytest.mark.parametrize(
    "body",
    [
        {"v": 1, "t": "audio", "seq": float("inf"), "pcm": b""},
        {"v": 1, "t": "closed", "reason": "x", "audio_s": 1.0, "finals": float("-inf")},
    ],
)
def test_an_infinite_number_where_a_whole_one_belongs_is_an_envelope_error(
    body: dict[str, object],
) -> None:
    """int(inf) raises OverflowError, which once escaped decode (hypothesis found it)."""
    with pytest.raises(EnvelopeError, match="malformed"):
        decode(msgpack.packb(body))
