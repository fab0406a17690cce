"""Versioned, tagged msgpack envelopes for stream entries and pub/sub messages.

Encoded and decoded here only. Every envelope is a msgpack map with `v` (format version)
and `t` (tag); an unknown version or tag, or a malformed body, raises `EnvelopeError`.
Stream entries carry the envelope in field `m`, next to a few plain fields (`t`, `seq`,
`rid`) that exist only so an operator can read entries with `redis-cli XRANGE`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgpack

from shared.errors import EnvelopeError

VERSION = 1
FIELD = b"m"

ControlKind = Literal["finalize", "close"]
# `failed` is internal: a dead-lettered session. Clients get `error` (internal) + 1011
# instead of `session.closed`, whose reasons are the other four (protocol.md).
CloseReason = Literal["client_closed", "idle_timeout", "max_duration", "abandoned", "failed"]
CLOSE_REASONS: tuple[str, ...] = (
    "client_closed",
    "idle_timeout",
    "max_duration",
    "abandoned",
    "failed",
)


@dataclass(frozen=True, slots=True)
class AudioChunk:
    """One client audio frame as stored: raw bytes in the session's declared format."""

    seq: int
    pcm: bytes


@dataclass(frozen=True, slots=True)
class Control:
    """A client's `finalize` or end of stream, ordered with the audio around it."""

    kind: ControlKind
    reason: CloseReason | None = None


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A new session for some worker to claim."""

    session_id: str


@dataclass(frozen=True, slots=True)
class Word:
    word: str
    start: float
    end: float
    probability: float


@dataclass(frozen=True, slots=True)
class Transcript:
    result_id: int
    is_final: bool
    start: float
    end: float
    text: str
    words: tuple[Word, ...] = field(default_factory=tuple)
    #: The publishing owner's fencing epoch (internal: not sent to clients; 0 = unknown).
    epoch: int = 0


@dataclass(frozen=True, slots=True)
class Closed:
    reason: CloseReason
    audio_seconds: float
    final_results: int


@dataclass(frozen=True, slots=True)
class Replaced:
    """Published on a session's channel when a resume attaches connection `conn`."""

    conn: str


Envelope = AudioChunk | Control | Dispatch | Transcript | Closed | Replaced


def _pack(body: dict[str, Any]) -> bytes:
    body["v"] = VERSION
    return msgpack.packb(body, use_bin_type=True)  # type: ignore[no-any-return]


def _msgpack_uint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x100:
        return b"\xcc" + bytes((n,))
    if n < 0x10000:
        return b"\xcd" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\xce" + n.to_bytes(4, "big")
    return b"\xcf" + n.to_bytes(8, "big")


def _msgpack_bin_header(size: int) -> bytes:
    if size < 0x100:
        return b"\xc4" + bytes((size,))
    if size < 0x10000:
        return b"\xc5" + size.to_bytes(2, "big")
    return b"\xc6" + size.to_bytes(4, "big")


#: An audio envelope's bytes after its samples: the `v` field.
AUDIO_TAIL = b"\xa1v" + _msgpack_uint(VERSION)


def audio_head(seq: int, size: int) -> bytes:
    """An audio envelope's bytes before its `size` bytes of samples:
    `audio_head(seq, len(pcm)) + pcm + AUDIO_TAIL == encode(AudioChunk(seq, pcm))`, so
    the gateway can write the samples into its Redis buffer without copying them into an
    envelope first (tests/unit/test_envelope.py checks the identity)."""
    if seq < 0:
        raise ValueError(f"seq must be >= 0, got {seq}")
    return (
        b"\x84\xa1t\xa5audio\xa3seq" + _msgpack_uint(seq) + b"\xa3pcm" + _msgpack_bin_header(size)
    )


def encode(item: Envelope) -> bytes:
    if isinstance(item, AudioChunk):
        return _pack({"t": "audio", "seq": item.seq, "pcm": item.pcm})
    if isinstance(item, Control):
        return _pack({"t": "control", "kind": item.kind, "reason": item.reason})
    if isinstance(item, Dispatch):
        return _pack({"t": "dispatch", "sid": item.session_id})
    if isinstance(item, Transcript):
        words = [[w.word, w.start, w.end, w.probability] for w in item.words]
        return _pack(
            {
                "t": "transcript",
                "rid": item.result_id,
                "final": item.is_final,
                "start": item.start,
                "end": item.end,
                "text": item.text,
                "words": words,
                "ep": item.epoch,
            }
        )
    if isinstance(item, Closed):
        return _pack(
            {
                "t": "closed",
                "reason": item.reason,
                "audio_s": item.audio_seconds,
                "finals": item.final_results,
            }
        )
    if isinstance(item, Replaced):
        return _pack({"t": "replaced", "conn": item.conn})
    raise TypeError(f"cannot encode {type(item).__name__}")


def decode(data: bytes) -> Envelope:
    try:
        body = msgpack.unpackb(data, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise EnvelopeError(f"not a msgpack envelope: {exc}") from None
    if not isinstance(body, dict):
        raise EnvelopeError("envelope is not a map")
    if body.get("v") != VERSION:
        raise EnvelopeError(f"unknown envelope version {body.get('v')!r}")
    tag = body.get("t")
    try:
        if tag == "audio":
            if not isinstance(body["pcm"], bytes):
                raise EnvelopeError("audio envelope pcm is not bytes")
            return AudioChunk(seq=int(body["seq"]), pcm=body["pcm"])
        if tag == "control":
            if body["kind"] not in ("finalize", "close"):
                raise EnvelopeError(f"unknown control kind {body['kind']!r}")
            return Control(kind=body["kind"], reason=body.get("reason"))
        if tag == "dispatch":
            return Dispatch(session_id=str(body["sid"]))
        if tag == "transcript":
            return Transcript(
                result_id=int(body["rid"]),
                is_final=bool(body["final"]),
                start=float(body["start"]),
                end=float(body["end"]),
                text=str(body["text"]),
                words=tuple(
                    Word(str(w), float(s), float(e), float(p)) for w, s, e, p in body["words"]
                ),
                epoch=int(body.get("ep", 0)),
            )
        if tag == "closed":
            return Closed(
                reason=body["reason"],
                audio_seconds=float(body["audio_s"]),
                final_results=int(body["finals"]),
            )
        if tag == "replaced":
            return Replaced(conn=str(body["conn"]))
    except (KeyError, TypeError, ValueError, OverflowError) as exc:  # int(inf): overflow
        raise EnvelopeError(f"malformed {tag!r} envelope: {exc!r}") from None
    raise EnvelopeError(f"unknown envelope tag {tag!r}")


def decode_fields(fields: Sequence[bytes]) -> Envelope:
    """Decode a stream entry given as its flat field list (field, value, ...), as XREAD
    returns it before any reply callback."""
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == FIELD:
            return decode(fields[i + 1])
    raise EnvelopeError("stream entry has no 'm' field")


def decode_entry(fields: dict[bytes, bytes]) -> Envelope:
    """Decode a stream entry's field map (as redis-py returns it, bytes keys)."""
    try:
        return decode(fields[FIELD])
    except KeyError:
        raise EnvelopeError("stream entry has no 'm' field") from None
